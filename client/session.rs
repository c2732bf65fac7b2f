//! Driving one run: send the request, follow the stream with a progress bar,
//! return the report.

use anyhow::{Context, Result, anyhow, bail};
use fanout::proto::pipeline_client::PipelineClient;
use fanout::proto::{self, RecordStatus, run_event::Event};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use tonic::transport::Channel;

/// Connects to a pipeline at `url` (`http://host:port` or `host:port`).
pub async fn connect(url: &str) -> Result<PipelineClient<Channel>> {
    let url = fanout::pipeline::balancer::normalize_url(url);
    let channel = Channel::from_shared(url.clone())
        .with_context(|| format!("pipeline URL {url:?}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to the pipeline at {url}"))?;
    Ok(PipelineClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// Runs `request` and follows its events to the report. Shows a progress
/// bar on stderr when `progress` is set and stderr is a terminal. When the
/// pipeline left the per-record results out of the report (it would not
/// have fit in one 4 MiB message), they are put back from the `record`
/// events, in input order, so the report is whole either way.
pub async fn run(
    client: &mut PipelineClient<Channel>,
    request: proto::RunRequest,
    progress: bool,
    output: Option<&std::path::Path>,
) -> Result<proto::RunReport> {
    let mut output = match output {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let total = request.records.len() as u64;
    let keep = !request.options.as_ref().is_some_and(|o| o.summary_only);
    let mut results = Vec::new();
    let mut stream = client
        .run(request)
        .await
        .map_err(|s| anyhow!("Run failed: {}: {}", fanout::convert::code_name(s.code()), s.message()))?
        .into_inner();
    let bar = progress_bar(total, progress);
    let mut failed = 0u64;
    let report = loop {
        let event = stream
            .message()
            .await
            .map_err(|s| {
                anyhow!("run stream failed: {}: {}", fanout::convert::code_name(s.code()), s.message())
            })?
            .context("the pipeline closed the stream before the report")?;
        match event.event {
            Some(Event::Started(s)) => bar.set_prefix(s.run_id),
            Some(Event::Record(r)) => {
                if r.status() != RecordStatus::Succeeded {
                    failed += 1;
                    bar.set_message(format!("{failed} failed"));
                }
                bar.inc(1);
                if let Some(out) = &mut output {
                    serde_json::to_writer(&mut *out, &crate::render::result_json(&r))?;
                    out.write_all(b"\n")?;
                }
                if keep {
                    results.push(r);
                }
            }
            Some(Event::Report(r)) => break r,
            // The bar counts records itself; progress keeps the stream alive.
            Some(Event::Progress(_)) => {}
            None => bail!("the pipeline sent an empty event"),
        }
    };
    bar.finish_and_clear();
    if let Some(mut out) = output {
        out.flush().context("writing the results file")?;
    }
    let mut report = report;
    if report.results_omitted {
        results.sort_by_key(|r| r.index);
        report.results = results;
        report.results_omitted = false;
    }
    Ok(report)
}

fn progress_bar(total: u64, wanted: bool) -> ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {bar:30.cyan/blue} {pos}/{len} records {msg} [{elapsed_precise}, {per_sec}, eta {eta}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// The process exit code for a run's status: 0 only when it succeeded.
pub fn exit_code(report: &proto::RunReport) -> i32 {
    match report.status() {
        proto::RunStatus::Succeeded => 0,
        proto::RunStatus::PartiallyFailed => 3,
        proto::RunStatus::Failed => 4,
        proto::RunStatus::Cancelled => 5,
        proto::RunStatus::Unspecified => 1,
    }
}
