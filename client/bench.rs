//! `fanout bench`: how close a run comes to what the hardware allows.
//!
//! Every figure stands beside a baseline measured in the same run, because
//! these machines are shared and noisy: ratios are what we compare.
//!
//! - efficiency: CPU-bound digest units through pipeline and processor, vs
//!   the same units on plain OS threads (one per core, no network).
//! - overhead: 1-unit, 0-round records, vs a bare no-op unary call per record
//!   at the same concurrency.
//! - latency: a 1-record run, one after another, vs a bare unary call.
//! - scale: one run of 100,000 records; the pipeline runs in a child process
//!   so its peak RSS can be read from /proc.
//! - many-runs: 200 concurrent runs of 500 records (pipeline in a child
//!   process), vs one run of the same 100,000 records over the same fleet:
//!   what isolation between runs costs.
//! - fleet: 1-unit, 0-round records over fleets of 1, 8 and 64 processor
//!   instances (pipeline in a child process), same records and concurrency
//!   for each: what picking an instance costs as the fleet grows.
//! - metrics: the overhead figure (one processor) with `--metrics-listen`
//!   on the pipeline and the processor vs without, in turns; each metrics
//!   listener is scraped at the end to show it counted every record.
//! - tracing: the overhead run through a pipeline and a processor in child
//!   processes, untraced vs exporting spans to a local OTLP sink at the
//!   default sampling: what tracing costs.
//! - tls: the overhead scenario's records through one processor with TLS on
//!   both hops (mTLS to the processor, throwaway certificates), vs the same
//!   stack in plaintext, measured in turns: what encryption costs.

use crate::input::generated_records;
use crate::procs::{KillOnDrop, Proc, cpu_seconds, peak_rss_mib};
use crate::session;
use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use fanout::config::{PipelineConfig, ProcessorConfig};
use fanout::convert::{code_name, json_to_struct, struct_to_json};
use fanout::domain::JsonMap;
use fanout::pipeline::balancer::PROCESSOR_SERVICE;
use fanout::proto::record_processor_client::RecordProcessorClient;
use fanout::proto::record_processor_server::{RecordProcessor, RecordProcessorServer};
use fanout::proto::{self, pipeline_client::PipelineClient, run_event::Event};
use fanout::server::{self, Running};
use fanout::workload::Digest;
use fanout::workload::digest::{default_unit_count, unit_value};
use futures::StreamExt;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Which scenarios to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// CPU-bound parallel efficiency vs plain threads.
    Efficiency,
    /// Records/s with trivial work vs bare unary calls.
    Overhead,
    /// p50/p99 of a 1-record run vs a bare unary call.
    Latency,
    /// 100,000 records in one run: rate and the pipeline's peak memory.
    Scale,
    /// Many concurrent runs vs one run of as many records in all.
    ManyRuns,
    /// Records/s over fleets of 1, 8 and 64 instances vs the smallest fleet.
    Fleet,
    /// Tiny records several per processor call (`max_batch_size`) vs bare
    /// unary calls.
    Batching,
    /// `fanout run` streaming an NDJSON file of 100,000 and 1,000,000
    /// records: every record accounted for, and the peak memory of the
    /// pipeline and of the client.
    Stream,
    /// The overhead figure with Prometheus metrics on vs off.
    Metrics,
    /// The overhead run with spans exported over OTLP (default sampling) vs
    /// the same run untraced.
    Tracing,
    /// The overhead scenario's records with TLS on both hops (mTLS to the
    /// processor) vs plaintext, measured in turns.
    Tls,
}

/// Flags of `fanout bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Scenarios to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "efficiency,overhead,latency,scale,many-runs,fleet,batching,stream"
    )]
    scenarios: Vec<Scenario>,
    /// efficiency: seconds one thread needs for all units (sets `rounds`).
    #[arg(long, default_value_t = 5.0)]
    work_seconds: f64,
    /// efficiency: records in the run.
    #[arg(long, default_value_t = 200)]
    efficiency_records: usize,
    /// overhead: records in the run (and bare calls in the baseline).
    #[arg(long, default_value_t = 20_000)]
    overhead_records: usize,
    /// overhead: records in flight (and bare calls in flight).
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// latency: runs (and bare calls), one after another.
    #[arg(long, default_value_t = 1_000)]
    latency_runs: usize,
    /// scale: records in the one run.
    #[arg(long, default_value_t = 100_000)]
    scale_records: usize,
    /// many-runs: runs started at once, each on its own connection.
    #[arg(long, default_value_t = 200)]
    many_runs: usize,
    /// many-runs: records in each of those runs.
    #[arg(long, default_value_t = 500)]
    many_runs_records: usize,
    /// fleet: processor instances in each fleet, comma-separated; the
    /// smallest is the baseline of the others.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    fleet_sizes: Vec<usize>,
    /// fleet: records in each run (the same for every fleet size).
    #[arg(long, default_value_t = 20_000)]
    fleet_records: usize,
    /// fleet: records in flight (the same for every fleet size).
    #[arg(long, default_value_t = 256)]
    fleet_concurrency: u32,
    /// batching: records per processor call, comma-separated (1 = no batching).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch_sizes: Vec<u32>,
    /// batching: records in each run.
    #[arg(long, default_value_t = 200_000)]
    batching_records: usize,
    /// stream: records in each streamed run, comma-separated; the 1,000,000
    /// run carries the memory targets.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    stream_records: Vec<usize>,
    /// Repetitions of each measurement (efficiency, overhead, latency,
    /// many-runs, fleet); each figure is the median, each ratio the median of ratios
    /// taken against the baseline measured just before it.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One line of the table.
#[derive(Debug, Serialize)]
struct Figure {
    scenario: &'static str,
    name: String,
    value: f64,
    unit: &'static str,
    baseline: Option<f64>,
    ratio: Option<f64>,
    /// Lowest and highest of the paired ratios behind `ratio`.
    ratio_range: Option<(f64, f64)>,
    target: Option<String>,
    met: Option<bool>,
}

#[derive(Default)]
struct Table(Vec<Figure>);

impl Table {
    fn add(&mut self, scenario: &'static str, name: impl Into<String>, value: f64, unit: &'static str) {
        let name = name.into();
        eprintln!("  {scenario:<10} {name:<52} {value:>12.3} {unit}");
        self.0.push(Figure {
            scenario,
            name,
            value,
            unit,
            baseline: None,
            ratio: None,
            ratio_range: None,
            target: None,
            met: None,
        });
    }

    /// Adds a figure with its baseline. `ratios` are the paired ratios (one
    /// per repetition, each against the baseline measured just before),
    /// oriented so that higher is better; the figure's ratio is their median.
    #[allow(clippy::too_many_arguments)]
    fn compare(
        &mut self,
        scenario: &'static str,
        name: impl Into<String>,
        value: f64,
        baseline: f64,
        unit: &'static str,
        ratios: &mut [f64],
        target: impl FnOnce(f64) -> Option<(String, bool)>,
    ) {
        self.add(scenario, name, value, unit);
        let ratio = median(ratios);
        let target = target(ratio);
        let f = self.0.last_mut().expect("just added");
        f.baseline = Some(baseline);
        f.ratio = Some(ratio);
        f.ratio_range = Some((ratios[0], ratios[ratios.len() - 1]));
        f.met = target.as_ref().map(|(_, met)| *met);
        f.target = target.map(|(t, _)| t);
    }

    /// Sets a target on the last figure added.
    fn target(&mut self, target: &str, met: bool) {
        let f = self.0.last_mut().expect("a figure to set the target of");
        f.target = Some(target.to_owned());
        f.met = Some(met);
    }

    fn print(&self) {
        println!(
            "{:<10} | {:<52} | {:>12} | {:<9} | {:>12} | {:>7} | {:<13} | {:<14} | met",
            "scenario", "figure", "value", "unit", "baseline", "ratio", "ratio range", "target"
        );
        println!("{}", "-".repeat(157));
        for f in &self.0 {
            let opt = |v: Option<f64>, p: usize| v.map_or(String::new(), |v| format!("{v:.p$}"));
            let range = f.ratio_range.map_or(String::new(), |(lo, hi)| format!("{lo:.3}-{hi:.3}"));
            println!(
                "{:<10} | {:<52} | {:>12.3} | {:<9} | {:>12} | {:>7} | {:<13} | {:<14} | {}",
                f.scenario,
                f.name,
                f.value,
                f.unit,
                opt(f.baseline, 3),
                opt(f.ratio, 3),
                range,
                f.target.clone().unwrap_or_default(),
                f.met.map_or("", |m| if m { "yes" } else { "NO" })
            );
        }
    }
}

/// Entry point of `fanout bench`.
pub async fn bench(args: BenchArgs) -> Result<i32> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "fanout bench: {cores} cores, {} release build; scenarios {:?}",
        if cfg!(debug_assertions) { "NOT a" } else { "a" },
        args.scenarios
    );
    let mut table = Table::default();
    for s in &args.scenarios {
        eprintln!("== {s:?}");
        match s {
            Scenario::Efficiency => efficiency(&args, cores, &mut table).await?,
            Scenario::Overhead => overhead(&args, &mut table).await?,
            Scenario::Latency => latency(&args, &mut table).await?,
            Scenario::Scale => scale(&args, &mut table).await?,
            Scenario::ManyRuns => many_runs(&args, &mut table).await?,
            Scenario::Fleet => fleet(&args, &mut table).await?,
            Scenario::Batching => batching(&args, &mut table).await?,
            Scenario::Stream => stream(&args, &mut table).await?,
            Scenario::Metrics => metrics(&args, &mut table).await?,
            Scenario::Tracing => tracing_cost(&args, &mut table).await?,
            Scenario::Tls => tls(&args, &mut table).await?,
        }
    }
    println!();
    table.print();
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "machine": { "cores": cores, "os": std::env::consts::OS, "arch": std::env::consts::ARCH },
            "figures": table.0,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(0)
}

// ---------------------------------------------------------------- servers

/// A processor that does nothing: the ceiling for one unary call per record.
struct Noop;

#[tonic::async_trait]
impl RecordProcessor for Noop {
    async fn process_record(
        &self,
        request: tonic::Request<proto::ProcessRecordRequest>,
    ) -> Result<tonic::Response<proto::ProcessRecordResponse>, tonic::Status> {
        let id = request.into_inner().record.map(|r| r.id).unwrap_or_default();
        Ok(tonic::Response::new(proto::ProcessRecordResponse { record_id: id, ..Default::default() }))
    }

    async fn process_batch(
        &self,
        request: tonic::Request<proto::ProcessBatchRequest>,
    ) -> Result<tonic::Response<proto::ProcessBatchResponse>, tonic::Status> {
        let results = (request.into_inner().records.into_iter())
            .map(|r| proto::BatchItem {
                outcome: Some(proto::batch_item::Outcome::Processed(proto::ProcessRecordResponse {
                    record_id: r.id,
                    ..Default::default()
                })),
            })
            .collect();
        Ok(tonic::Response::new(proto::ProcessBatchResponse { results }))
    }

    async fn describe(
        &self,
        _request: tonic::Request<proto::DescribeRequest>,
    ) -> Result<tonic::Response<proto::DescribeResponse>, tonic::Status> {
        // As many slots as the bench keeps calls in flight: the no-op server
        // stands for a fleet with no capacity limit.
        Ok(tonic::Response::new(proto::DescribeResponse {
            name: "noop".into(),
            slots: fanout::config::RunLimits::default().max_in_flight_limit as u32,
            max_batch_size: fanout::domain::MAX_BATCH_SIZE as u32,
            ..Default::default()
        }))
    }
}

async fn start_noop() -> Result<(String, tokio_util::sync::CancellationToken)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = tokio_util::sync::CancellationToken::new();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|c| {
        if let Ok(c) = &c {
            let _ = c.set_nodelay(true);
        }
        c
    });
    let signal = stop.clone().cancelled_owned();
    // Health too, so a pipeline can use it as a processor.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status(PROCESSOR_SERVICE, tonic_health::ServingStatus::Serving).await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(RecordProcessorServer::new(Noop))
            .serve_with_incoming_shutdown(incoming, signal),
    );
    Ok((url, stop))
}

async fn start_processors(n: usize) -> Result<Vec<Running>> {
    start_processors_with(n, Duration::ZERO).await
}

async fn start_processors_with(n: usize, inline_budget: Duration) -> Result<Vec<Running>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let cfg =
            ProcessorConfig { listen: "127.0.0.1:0".into(), inline_budget, ..ProcessorConfig::default() };
        out.push(server::start_processor(&cfg, Digest::default()).await?.0);
    }
    Ok(out)
}

/// A pipeline over `n` fresh in-process digest processors, and a client.
struct Stack {
    processors: Vec<Running>,
    pipeline: Running,
    client: PipelineClient<Channel>,
}

impl Stack {
    async fn start(n: usize) -> Result<Self> {
        Self::over(start_processors(n).await?, Vec::new()).await
    }

    /// A pipeline over `processors` plus any `extra` endpoint URLs.
    async fn over(processors: Vec<Running>, extra: Vec<String>) -> Result<Self> {
        let mut cfg = PipelineConfig::new(processors.iter().map(Running::url).chain(extra));
        cfg.listen = "127.0.0.1:0".into();
        cfg.limits.max_records = usize::MAX;
        let pipeline = server::start_pipeline(&cfg).await?;
        let client = session::connect(&pipeline.url()).await?;
        Ok(Self { processors, pipeline, client })
    }

    async fn stop(self) -> Result<()> {
        drop(self.client);
        self.pipeline.shutdown().await?;
        for p in self.processors {
            p.shutdown().await?;
        }
        Ok(())
    }
}

fn params(rounds: u64) -> JsonMap {
    let mut p = JsonMap::new();
    p.insert("rounds".into(), rounds.into());
    p
}

fn one_unit_records(n: usize) -> Vec<proto::Record> {
    let mut attributes = JsonMap::new();
    attributes.insert("units".into(), 1.into());
    let attributes = Some(json_to_struct(attributes));
    (0..n).map(|i| proto::Record { id: format!("rec-{i:06}"), attributes: attributes.clone() }).collect()
}

fn request(
    records: Vec<proto::Record>,
    rounds: u64,
    mode: proto::UnitMode,
    max_in_flight: u32,
    summary_only: bool,
) -> proto::RunRequest {
    proto::RunRequest {
        run_id: String::new(),
        records,
        unit_mode: mode as i32,
        params: Some(json_to_struct(params(rounds))),
        options: Some(proto::RunOptions { max_in_flight, summary_only, ..Default::default() }),
    }
}

/// The longest one measured run may take before the bench gives up.
const RUN_BOUND: Duration = Duration::from_secs(600);

/// Runs `req`, checks every record succeeded, returns the report and wall time.
async fn timed_run(
    client: &mut PipelineClient<Channel>,
    req: proto::RunRequest,
) -> Result<(proto::RunReport, Duration)> {
    let n = req.records.len() as u64;
    let t = Instant::now();
    let report = tokio::time::timeout(RUN_BOUND, session::run(client, req))
        .await
        .with_context(|| format!("a run of {n} records took over {RUN_BOUND:?}"))??;
    let wall = t.elapsed();
    let s = report.summary.unwrap_or_default();
    ensure!(
        s.total_records_processed == n && s.records_succeeded == n,
        "run did not account for every record: {s:?}"
    );
    Ok((report, wall))
}

// ------------------------------------------------------------- efficiency

async fn efficiency(args: &BenchArgs, cores: usize, table: &mut Table) -> Result<()> {
    let ids: Vec<String> = (0..args.efficiency_records).map(|i| format!("rec-{i:05}")).collect();
    let units: Vec<(usize, String)> = ids
        .iter()
        .enumerate()
        .flat_map(|(r, id)| (0..default_unit_count(id)).map(move |i| (r, format!("{id}/{i}"))))
        .collect();
    // Calibrate: time per SHA-256 round on one thread.
    let t = Instant::now();
    std::hint::black_box(unit_value(b"calibrate", 200_000));
    let per_round = t.elapsed().as_secs_f64() / 200_000.0;
    let rounds = (args.work_seconds / (units.len() as f64 * per_round)).round().max(1.0) as u64;
    eprintln!(
        "  {} records, {} units, {:.1} ns/round, rounds = {rounds}",
        ids.len(),
        units.len(),
        per_round * 1e9
    );

    let mut stack = Stack::start(1).await?;
    // Warm the connections so the figure is the run, not the first dial.
    timed_run(&mut stack.client, request(one_unit_records(4), 0, proto::UnitMode::Parallel, 0, true)).await?;
    let variants = [
        ("PARALLEL, 64 in flight", proto::UnitMode::Parallel, 0, Some(0.95)),
        ("SEQUENTIAL, 64 in flight", proto::UnitMode::Sequential, 0, None),
        ("PARALLEL, 1 in flight (layer 2 alone)", proto::UnitMode::Parallel, 1, None),
    ];
    let mut baselines = vec![Vec::new(); variants.len()];
    let mut walls = vec![Vec::new(); variants.len()];
    let mut ratios = vec![Vec::new(); variants.len()];
    for _ in 0..args.repeat.max(1) {
        for (v, (_, mode, in_flight, _)) in variants.iter().enumerate() {
            // The baseline runs right before each fanout run: a paired ratio.
            let (baseline, xor) = threads_baseline(&units, ids.len(), rounds, cores);
            baselines[v].push(baseline);
            let req = request(generated_records(ids.len()), rounds, *mode, *in_flight, false);
            let (report, wall) = timed_run(&mut stack.client, req).await?;
            for r in &report.results {
                let out = struct_to_json(r.output.clone().unwrap_or_default());
                let want = format!("{:016x}", xor[r.index as usize]);
                if out.get("xor_digest").and_then(|v| v.as_str()) != Some(want.as_str()) {
                    bail!("record {} digest differs from the baseline's", r.record_id);
                }
            }
            walls[v].push(wall.as_secs_f64());
            ratios[v].push(baseline / wall.as_secs_f64());
        }
    }
    let all: Vec<f64> = baselines.iter().flatten().copied().collect();
    table.add("efficiency", format!("baseline: {cores} plain threads, wall"), median(&mut all.clone()), "s");
    for (v, (name, _, _, target)) in variants.iter().enumerate() {
        table.compare(
            "efficiency",
            format!("fanout {name}: wall"),
            median(&mut walls[v]),
            median(&mut baselines[v]),
            "s",
            &mut ratios[v],
            |r| target.map(|t| (format!(">= {t}"), r >= t)),
        );
    }
    stack.stop().await
}

/// The floor: the same units on plain OS threads, one per core, pulling
/// units off a shared counter. Returns the wall time and each record's XOR.
fn threads_baseline(units: &[(usize, String)], records: usize, rounds: u64, cores: usize) -> (f64, Vec<u64>) {
    let t = Instant::now();
    let next = AtomicUsize::new(0);
    let mut xor = vec![0u64; records];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..cores)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    while let Some((r, input)) = units.get(next.fetch_add(1, Ordering::Relaxed)) {
                        mine.push((*r, unit_value(input.as_bytes(), rounds)));
                    }
                    mine
                })
            })
            .collect();
        for h in handles {
            for (r, v) in h.join().expect("baseline thread") {
                xor[r] ^= v;
            }
        }
    });
    (t.elapsed().as_secs_f64(), xor)
}

/// The median (sorts `v`).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

// --------------------------------------------------------------- overhead

async fn bare_calls(url: &str, n: usize, concurrency: usize) -> Result<Duration> {
    let client = RecordProcessorClient::new(Channel::from_shared(url.to_owned())?.connect().await?);
    let params = Some(json_to_struct(params(0)));
    let records = one_unit_records(n);
    let t = Instant::now();
    let mut calls = futures::stream::iter(records)
        .map(|record| {
            let mut c = client.clone();
            let req = proto::ProcessRecordRequest {
                run_id: "bench".into(),
                record: Some(record),
                unit_mode: proto::UnitMode::Parallel as i32,
                params: params.clone(),
                attempt: 1,
            };
            async move { c.process_record(req).await }
        })
        .buffer_unordered(concurrency);
    while let Some(r) = calls.next().await {
        r?;
    }
    Ok(t.elapsed())
}

async fn overhead(args: &BenchArgs, table: &mut Table) -> Result<()> {
    let n = args.overhead_records;
    let c = args.concurrency;
    let (noop, stop) = start_noop().await?;
    bare_calls(&noop, 1_000, c as usize).await?; // warm-up
    let mut all_bares = Vec::new();
    // (name, digest processors, their inline budget, the no-op server instead)
    let opt_in = Duration::from_micros(50);
    let setups = [
        ("fanout, 1 processor".to_owned(), 1, Duration::ZERO, false),
        ("fanout, 3 processors".to_owned(), 3, Duration::ZERO, false),
        (format!("fanout, 1 processor, --inline-budget {opt_in:?} (opt-in)"), 1, opt_in, false),
        ("pipeline over the no-op server (no engine)".to_owned(), 0, Duration::ZERO, true),
    ];
    for (name, processors, inline, over_noop) in setups {
        let extra = if over_noop { vec![noop.clone()] } else { Vec::new() };
        let mut stack = Stack::over(start_processors_with(processors, inline).await?, extra).await?;
        timed_run(&mut stack.client, request(one_unit_records(1_000), 0, proto::UnitMode::Parallel, c, true))
            .await?;
        let (mut rates, mut bares, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.repeat.max(1) {
            let bare = n as f64 / bare_calls(&noop, n, c as usize).await?.as_secs_f64();
            let req = request(one_unit_records(n), 0, proto::UnitMode::Parallel, c, true);
            let (_, wall) = timed_run(&mut stack.client, req).await?;
            let rate = n as f64 / wall.as_secs_f64();
            bares.push(bare);
            rates.push(rate);
            ratios.push(rate / bare);
        }
        stack.stop().await?;
        all_bares.extend_from_slice(&bares);
        let is_target = processors == 1 && inline.is_zero();
        table.compare(
            "overhead",
            format!("{name}, {c} in flight"),
            median(&mut rates),
            median(&mut bares),
            "records/s",
            &mut ratios,
            |r| is_target.then(|| (">= 0.8".to_owned(), r >= 0.8)),
        );
    }
    stop.cancel();
    table.add(
        "overhead",
        format!("baseline: bare no-op unary calls, {c} in flight"),
        median(&mut all_bares),
        "calls/s",
    );
    Ok(())
}

// --------------------------------------------------------------- metrics

/// The `overhead` run (1-unit, 0-round records, one processor) on a stack
/// with metrics off and on a stack with them on, taking turns; each ratio
/// is on over the off run just before it. The stack with metrics is scraped
/// at the end: its pipeline must have counted every record it ran, and its
/// processor every call.
async fn metrics(args: &BenchArgs, table: &mut Table) -> Result<()> {
    let (n, c) = (args.overhead_records, args.concurrency);
    let mut stacks = Vec::new();
    for on in [false, true] {
        let listen = on.then(|| "127.0.0.1:0".to_owned());
        let cfg = ProcessorConfig { listen: "127.0.0.1:0".into(), ..ProcessorConfig::default() };
        let cfg = ProcessorConfig {
            metrics: fanout::metrics::MetricsArgs { metrics_listen: listen.clone() },
            ..cfg
        };
        let processor = server::start_processor(&cfg, Digest::default()).await?.0;
        let mut cfg = PipelineConfig::new([processor.url()]);
        cfg.listen = "127.0.0.1:0".into();
        cfg.limits.max_records = usize::MAX;
        cfg.metrics.metrics_listen = listen;
        let pipeline = server::start_pipeline(&cfg).await?;
        let client = session::connect(&pipeline.url()).await?;
        let mut stack = Stack { processors: vec![processor], pipeline, client };
        timed_run(&mut stack.client, request(one_unit_records(1_000), 0, proto::UnitMode::Parallel, c, true))
            .await?;
        stacks.push(stack);
    }
    let (mut offs, mut ons, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeat.max(1) {
        let mut rates = [0.0; 2];
        for (rate, stack) in rates.iter_mut().zip(&mut stacks) {
            let req = request(one_unit_records(n), 0, proto::UnitMode::Parallel, c, true);
            let (_, wall) = timed_run(&mut stack.client, req).await?;
            *rate = n as f64 / wall.as_secs_f64();
        }
        offs.push(rates[0]);
        ons.push(rates[1]);
        ratios.push(rates[1] / rates[0]);
    }
    let with = stacks.pop().context("the stack with metrics")?;
    let off = stacks.pop().context("the stack without")?;
    ensure!(off.pipeline.metrics_addr.is_none(), "metrics were on in the stack without them");
    let ran = (1_000 + n * args.repeat.max(1)) as f64;
    let pipe =
        scrape_sum(with.pipeline.metrics_addr.context("pipeline metrics")?, "fanout_records_total").await?;
    let proc_addr = with.processors[0].metrics_addr.context("processor metrics")?;
    let calls = scrape_sum(proc_addr, "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"fanout.v1.RecordProcessor\",grpc_method=\"ProcessRecord\",grpc_code=\"OK\"}").await?;
    ensure!(pipe == ran && calls == ran, "scraped {pipe} records and {calls} calls, not {ran}");
    off.stop().await?;
    with.stop().await?;
    table.compare(
        "metrics",
        format!("fanout, 1 processor, metrics on (scraped: {ran} records), {c} in flight"),
        median(&mut ons),
        median(&mut offs),
        "records/s",
        &mut ratios,
        |r| Some((">= 0.97".to_owned(), r >= 0.97)),
    );
    Ok(())
}

// -------------------------------------------------------------------- tls

/// The overhead scenario's 1-unit, 0-round records through a pipeline and
/// one digest processor, plaintext and then TLS on both hops (the client
/// and the pipeline presenting certificates: mTLS everywhere), each TLS
/// run paired with the plaintext run just before it.
async fn tls(args: &BenchArgs, table: &mut Table) -> Result<()> {
    let n = args.overhead_records;
    let c = args.concurrency;
    let certs = crate::certs::Throwaway::new()?;
    let mut plain = Stack::start(1).await?;
    let mut secure = {
        let mut cfg = ProcessorConfig { listen: "127.0.0.1:0".into(), ..ProcessorConfig::default() };
        certs.processor(&mut cfg);
        let processors = vec![server::start_processor(&cfg, Digest::default()).await?.0];
        let mut cfg = PipelineConfig::new(processors.iter().map(Running::url));
        cfg.listen = "127.0.0.1:0".into();
        cfg.limits.max_records = usize::MAX;
        certs.pipeline(&mut cfg);
        let pipeline = server::start_pipeline(&cfg).await?;
        let client = session::connect_tls(&pipeline.url(), &certs.client()).await?;
        Stack { processors, pipeline, client }
    };
    for stack in [&mut plain, &mut secure] {
        timed_run(&mut stack.client, request(one_unit_records(1_000), 0, proto::UnitMode::Parallel, c, true))
            .await?; // warm-up (and the TLS handshakes)
    }
    let (mut plains, mut tlss, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeat.max(1) {
        let rate = |wall: Duration| n as f64 / wall.as_secs_f64();
        let req = || request(one_unit_records(n), 0, proto::UnitMode::Parallel, c, true);
        let p = rate(timed_run(&mut plain.client, req()).await?.1);
        let t = rate(timed_run(&mut secure.client, req()).await?.1);
        plains.push(p);
        tlss.push(t);
        ratios.push(t / p);
    }
    plain.stop().await?;
    secure.stop().await?;
    table.compare(
        "tls",
        format!("fanout, 1 processor, mTLS both hops, {c} in flight"),
        median(&mut tlss),
        median(&mut plains),
        "records/s",
        &mut ratios,
        |_| None,
    );
    table.add(
        "tls",
        format!("baseline: the same in plaintext, {c} in flight"),
        median(&mut plains),
        "records/s",
    );
    Ok(())
}

/// Scrapes `/metrics` at `addr` once (HTTP/1.1, bounded in time): the
/// response, status line and headers included.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let text = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        // The listener caps a response's time, not its size: so does this.
        let mut text = String::new();
        s.take(64 << 20).read_to_string(&mut text).await?;
        anyhow::Ok(text)
    })
    .await
    .context("scraping metrics timed out")??;
    ensure!(text.starts_with("HTTP/1.1 200"), "scraping {addr}: {}", text.lines().next().unwrap_or(""));
    Ok(text)
}

/// Scrapes `/metrics` at `addr` and sums the samples whose name, or name
/// and labels, are `series`.
async fn scrape_sum(addr: std::net::SocketAddr, series: &str) -> Result<f64> {
    let text = scrape(addr).await?;
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((name, value)) = line.rsplit_once(' ')
            && (name == series || name.split('{').next() == Some(series))
        {
            sum += value.parse::<f64>().with_context(|| format!("sample {line:?}"))?;
        }
    }
    Ok(sum)
}

// --------------------------------------------------------------- batching

/// Tiny records (rounds 0, one unit) through one digest processor, several
/// per call, against the bare unary call rate of the no-op server measured
/// just before each run: batching is how a run beats one call per record.
async fn batching(args: &BenchArgs, table: &mut Table) -> Result<()> {
    let n = args.batching_records;
    let c = args.concurrency;
    let (noop, stop) = start_noop().await?;
    bare_calls(&noop, 1_000, c as usize).await?; // warm-up
    let mut stack = Stack::start(1).await?;
    let mut all_bares = Vec::new();
    for &size in &args.batch_sizes {
        let size = size.max(1);
        // Enough records in flight to keep `c` calls going at this size,
        // within what a run may ask for.
        let in_flight = (c * size).min(fanout::config::RunLimits::default().max_in_flight_limit as u32);
        let req = |n| {
            let mut r = request(one_unit_records(n), 0, proto::UnitMode::Parallel, in_flight, true);
            r.options.as_mut().expect("options").max_batch_size = size;
            r
        };
        timed_run(&mut stack.client, req(2_000)).await?;
        let (mut rates, mut bares, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.repeat.max(1) {
            let bare =
                c as f64 * 1_000.0 / bare_calls(&noop, c as usize * 1_000, c as usize).await?.as_secs_f64();
            let (_, wall) = timed_run(&mut stack.client, req(n)).await?;
            let rate = n as f64 / wall.as_secs_f64();
            bares.push(bare);
            rates.push(rate);
            ratios.push(rate / bare);
        }
        all_bares.extend_from_slice(&bares);
        table.compare(
            "batching",
            format!("max_batch_size {size}, {in_flight} in flight, 1 processor"),
            median(&mut rates),
            median(&mut bares),
            "records/s",
            &mut ratios,
            |r| (size == 32).then(|| (">= 3".to_owned(), r >= 3.0)),
        );
    }
    stack.stop().await?;
    stop.cancel();
    table.add(
        "batching",
        format!("baseline: bare no-op unary calls, {c} in flight"),
        median(&mut all_bares),
        "calls/s",
    );
    Ok(())
}

// ----------------------------------------------------------------- stream

/// A directory under the system's temporary one, removed with what it
/// holds on drop (a failed scenario leaves no input file behind).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `fanout run FILE` (this binary, in a child process) streaming an NDJSON
/// file of tiny records (rounds 0, one unit) to a pipeline in a child
/// process over two in-process processors; both children's peak RSS is
/// read from /proc (the client's sampled every 50 ms while it runs).
async fn stream(args: &BenchArgs, table: &mut Table) -> Result<()> {
    let dir = TempDir::new("fanout-bench-stream")?;
    let dir = &dir.0;
    for &n in &args.stream_records {
        let file = dir.join(format!("records-{n}.ndjson"));
        {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
            for i in 0..n {
                writeln!(out, r#"{{"id":"rec-{i:08}","attributes":{{"units":1}}}}"#)?;
            }
            out.flush()?;
        }
        let processors = start_processors(2).await?;
        // `--max-records` bounds `Run` only; a streamed run has no count limit.
        let pipeline = spawn_pipeline(&processors, 100_000).await?;
        let idle = peak_rss_mib(pipeline.pid())?;
        let exe = std::env::current_exe()?;
        let t = Instant::now();
        let mut client = KillOnDrop(
            Command::new(exe)
                .arg("run")
                .arg(&file)
                .args(["--pipeline", &pipeline.addr, "--params", r#"{"rounds": 0}"#, "--quiet"])
                .args(["--max-in-flight", "1024", "--batch-size", "32"])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting fanout run")?,
        );
        let stdout = client.0.stdout.take().context("client stdout")?;
        let reader = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s).map(|_| s)
        });
        let pid = client.0.id();
        let mut client_peak: f64 = 0.0;
        let deadline = Instant::now() + Duration::from_secs(1800);
        let status = loop {
            // VmHWM only grows: the last reading before exit is the peak.
            if let Ok(rss) = peak_rss_mib(pid) {
                client_peak = rss;
            }
            if let Some(status) = client.0.try_wait()? {
                break status;
            }
            ensure!(Instant::now() < deadline, "fanout run of {n} records took over 30 minutes");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let wall = t.elapsed();
        let printed = reader.await??;
        let pipeline_peak = peak_rss_mib(pipeline.pid())?;
        drop(pipeline);
        for p in processors {
            p.shutdown().await?;
        }
        std::fs::remove_file(&file)?; // about 50 MB per million records
        ensure!(status.success(), "fanout run of {n} records exited with {status}");
        let report: serde_json::Value = serde_json::from_str(&printed).context("the client's report")?;
        let done = report["summary"]["records_succeeded"].as_u64().unwrap_or_default();
        table.add(
            "stream",
            format!("{n} records: records/s, fanout run from NDJSON, batch 32"),
            n as f64 / wall.as_secs_f64(),
            "records/s",
        );
        table.add("stream", format!("{n} records: succeeded, as reported"), done as f64, "records");
        table.target(&format!("all {n}"), done == n as u64);
        table.add(
            "stream",
            format!("{n} records: pipeline peak RSS (idle {idle:.0} MiB)"),
            pipeline_peak,
            "MiB",
        );
        if n == 1_000_000 {
            table.target("<= 128 MiB", pipeline_peak <= 128.0);
        }
        table.add("stream", format!("{n} records: client peak RSS"), client_peak, "MiB");
        if n == 1_000_000 {
            table.target("<= 64 MiB", client_peak <= 64.0);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- latency

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

async fn latency(args: &BenchArgs, table: &mut Table) -> Result<()> {
    let n = args.latency_runs;
    let (noop, stop) = start_noop().await?;
    let mut client = RecordProcessorClient::new(Channel::from_shared(noop)?.connect().await?);
    let req = proto::ProcessRecordRequest {
        run_id: "bench".into(),
        record: one_unit_records(1).pop(),
        unit_mode: proto::UnitMode::Parallel as i32,
        params: Some(json_to_struct(params(0))),
        attempt: 1,
    };
    let mut stack = Stack::start(1).await?;
    // Blocks of bare calls and runs alternate, so drifts in machine load
    // fall on both; the first 50 of each kind warm up and are dropped.
    let (mut bare, mut runs) = (Vec::new(), Vec::new());
    let reps = args.repeat.max(1);
    for rep in 0..reps {
        let count = n.div_ceil(reps) + if rep == 0 { 50 } else { 0 };
        for _ in 0..count {
            let t = Instant::now();
            client.process_record(req.clone()).await?;
            bare.push(t.elapsed());
        }
        for _ in 0..count {
            let req = request(one_unit_records(1), 0, proto::UnitMode::Parallel, 0, false);
            let (_, wall) = timed_run(&mut stack.client, req).await?;
            runs.push(wall);
        }
    }
    stop.cancel();
    stack.stop().await?;
    let (bare, runs) = (sorted_after_warmup(bare, 50), sorted_after_warmup(runs, 50));
    let (b50, b99) = (percentile(&bare, 0.5), percentile(&bare, 0.99));
    let (r50, r99) = (percentile(&runs, 0.5), percentile(&runs, 0.99));
    // Percentiles pool every block, so there is one ratio each (bare/run,
    // higher is better, like every ratio here).
    table.compare(
        "latency",
        "Run of 1 record: p50 (baseline: bare call p50)",
        r50,
        b50,
        "µs",
        &mut [b50 / r50],
        |r| Some(("p50 <= 3x bare".to_owned(), r >= 1.0 / 3.0)),
    );
    table.compare(
        "latency",
        "Run of 1 record: p99 (baseline: bare call p99)",
        r99,
        b99,
        "µs",
        &mut [b99 / r99],
        |_| None,
    );
    Ok(())
}

fn sorted_after_warmup(mut v: Vec<Duration>, warmup: usize) -> Vec<Duration> {
    v.drain(..warmup);
    v.sort();
    v
}

// ------------------------------------------------------------------ scale

/// A pipeline in a child process (this binary, hidden subcommand) over
/// `processors`, accepting `Run`s of up to `max_records`, so that its own
/// peak memory and CPU time can be read; killed on drop.
async fn spawn_pipeline(processors: &[Running], max_records: usize) -> Result<Proc> {
    let urls: Vec<String> = processors.iter().map(Running::url).collect();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["serve-pipeline", "--listen", "127.0.0.1:0", "--max-records", &max_records.to_string()])
        .args(["--processors", &urls.join(",")])
        .stderr(Stdio::inherit());
    Proc::spawn(cmd, "the pipeline child").await
}

async fn scale(args: &BenchArgs, table: &mut Table) -> Result<()> {
    let n = args.scale_records;
    let processors = start_processors(1).await?;
    let child = spawn_pipeline(&processors, n).await?;
    let idle = peak_rss_mib(child.pid())?;
    let mut client = session::connect(&child.addr).await?;
    let req = request(one_unit_records(n), 0, proto::UnitMode::Parallel, 0, true);
    let (report, wall) = timed_run(&mut client, req).await?;
    let peak = peak_rss_mib(child.pid())?;
    drop(child);
    for p in processors {
        p.shutdown().await?;
    }
    let s = report.summary.unwrap_or_default();
    table.add(
        "scale",
        format!("{n} records in one run (summary_only)"),
        n as f64 / wall.as_secs_f64(),
        "records/s",
    );
    table.add("scale", "records accounted for", s.total_records_processed as f64, "records");
    table.add("scale", "pipeline peak RSS before the run", idle, "MiB");
    table.add("scale", "pipeline peak RSS (an absolute bound, no baseline)", peak, "MiB");
    table.target("<= 256 MiB", peak <= 256.0);
    Ok(())
}

// -------------------------------------------------------------- many-runs

/// The longest one batch of concurrent runs (or its one-run baseline) may
/// take before the scenario gives up.
const MANY_RUNS_BOUND: Duration = Duration::from_secs(600);

/// How one run ended, as its client saw it.
#[derive(Debug, Default)]
struct RunTally {
    /// The pipeline took the call (it did not answer with an error status).
    accepted: bool,
    /// The report said `SUCCEEDED`.
    succeeded: bool,
    records_succeeded: u64,
    /// Failed records, refused runs and broken streams, by code: how many,
    /// and the first message.
    failures: BTreeMap<String, (u64, String)>,
}

impl RunTally {
    fn note(&mut self, code: &str, message: &str) {
        self.failures.entry(code.to_owned()).or_insert_with(|| (0, message.to_owned())).0 += 1;
    }
}

/// Runs `req` to its report without failing on a refused run, a failed
/// record or a broken stream: each is counted instead.
async fn tally_run(mut client: PipelineClient<Channel>, req: proto::RunRequest) -> RunTally {
    let mut tally = RunTally::default();
    let mut stream = match client.run(req).await {
        Ok(response) => response.into_inner(),
        Err(s) => {
            tally.note(&format!("run refused: {}", code_name(s.code())), s.message());
            return tally;
        }
    };
    tally.accepted = true;
    loop {
        match stream.message().await {
            Ok(Some(event)) => match event.event {
                Some(Event::Record(r)) if r.status() == proto::RecordStatus::Succeeded => {
                    tally.records_succeeded += 1;
                }
                Some(Event::Record(r)) => {
                    let e = r.error.unwrap_or_default();
                    tally.note(&e.code_name, &e.message);
                }
                Some(Event::Report(r)) => {
                    tally.succeeded = r.status() == proto::RunStatus::Succeeded;
                    return tally;
                }
                Some(Event::Started(_) | Event::Progress(_)) | None => {}
            },
            Ok(None) => {
                tally.note("stream ended before the report", "");
                return tally;
            }
            Err(s) => {
                tally.note(&format!("stream broken: {}", code_name(s.code())), s.message());
                return tally;
            }
        }
    }
}

/// Starts `runs` runs of `records` generated records (`rounds = 1`, default
/// options) at once, each on its own connection to `addr`, and follows them
/// all to their reports. Returns each run's tally and the wall time from the
/// first call to the last report.
async fn concurrent_runs(addr: &str, runs: usize, records: usize) -> Result<(Vec<RunTally>, Duration)> {
    let mut calls = Vec::with_capacity(runs);
    for _ in 0..runs {
        let req = request(generated_records(records), 1, proto::UnitMode::Parallel, 0, false);
        calls.push((session::connect(addr).await?, req));
    }
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (client, req) in calls {
        set.spawn(tally_run(client, req));
    }
    let mut tallies = Vec::with_capacity(runs);
    // Dropping the set on timeout aborts the runs still going.
    tokio::time::timeout(MANY_RUNS_BOUND, async {
        while let Some(tally) = set.join_next().await {
            tallies.push(tally?);
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("{runs} runs of {records} records did not finish in {MANY_RUNS_BOUND:?}"))??;
    Ok((tallies, t.elapsed()))
}

async fn many_runs(args: &BenchArgs, table: &mut Table) -> Result<()> {
    let (runs, per_run) = (args.many_runs.max(1), args.many_runs_records.max(1));
    let total = runs * per_run;
    // Two processors of one unit thread each: a small fleet that 200 runs'
    // worth of default max_in_flight (64 each) would swamp many times over.
    let mut processors = Vec::new();
    for _ in 0..2 {
        let cfg = ProcessorConfig {
            listen: "127.0.0.1:0".into(),
            unit_threads: Some(1),
            ..ProcessorConfig::default()
        };
        processors.push(server::start_processor(&cfg, Digest::default()).await?.0);
    }
    // Two pipelines over the same processors, each in its own child process:
    // one takes the concurrent runs, the other the one-run baseline, so that
    // each one's peak RSS is its own.
    let many = spawn_pipeline(&processors, per_run).await?;
    let one = spawn_pipeline(&processors, total).await?;
    for child in [&many, &one] {
        // Warm-up: connections, and the pipeline's first look at its fleet.
        let (tallies, _) = concurrent_runs(&child.addr, 1, 100).await?;
        ensure!(tallies.iter().all(|t| t.succeeded), "warm-up run failed: {tallies:?}");
    }
    let idle = peak_rss_mib(many.pid())?;
    let (mut rates, mut baselines, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fewest_accepted, mut fewest_succeeded, mut failed) = (runs, runs, 0u64);
    let mut failures: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for _ in 0..args.repeat.max(1) {
        // The baseline runs right before each batch: a paired ratio.
        let (one_tally, one_wall) = concurrent_runs(&one.addr, 1, total).await?;
        let one_succeeded = one_tally.iter().map(|t| t.records_succeeded).sum::<u64>();
        let (tallies, wall) = concurrent_runs(&many.addr, runs, per_run).await?;
        let succeeded = tallies.iter().map(|t| t.records_succeeded).sum::<u64>();
        eprintln!(
            "  one run: {one_succeeded}/{total} records in {:.3} s; {runs} runs: {succeeded}/{total} in {:.3} s",
            one_wall.as_secs_f64(),
            wall.as_secs_f64()
        );
        fewest_accepted = fewest_accepted.min(tallies.iter().filter(|t| t.accepted).count());
        fewest_succeeded = fewest_succeeded.min(tallies.iter().filter(|t| t.succeeded).count());
        failed += total as u64 - succeeded;
        for (code, (n, message)) in tallies.iter().flat_map(|t| &t.failures) {
            failures.entry(code.clone()).or_insert_with(|| (0, message.clone())).0 += n;
        }
        // Succeeded records only: failing fast must not look like speed.
        let rate = succeeded as f64 / wall.as_secs_f64();
        let baseline = one_succeeded as f64 / one_wall.as_secs_f64();
        rates.push(rate);
        baselines.push(baseline);
        ratios.push(rate / baseline);
    }
    let (peak_many, peak_one) = (peak_rss_mib(many.pid())?, peak_rss_mib(one.pid())?);
    drop((many, one));
    for p in processors {
        p.shutdown().await?;
    }
    let mut top: Vec<_> = failures.into_iter().collect();
    top.sort_by_key(|(_, (n, _))| std::cmp::Reverse(*n));
    for (code, (n, message)) in top.iter().take(3) {
        eprintln!("  failed: {n} x {code}: {message}");
    }
    let reps = args.repeat.max(1);
    table.add(
        "many-runs",
        format!("{runs} runs x {per_run} records: accepted (fewest)"),
        fewest_accepted as f64,
        "runs",
    );
    table.target(&format!("all {runs}"), fewest_accepted == runs);
    table.add("many-runs", "runs SUCCEEDED (fewest of the repetitions)", fewest_succeeded as f64, "runs");
    table.target(&format!("all {runs}"), fewest_succeeded == runs);
    table.add(
        "many-runs",
        format!("records failed or unreported ({reps} x {total})"),
        failed as f64,
        "records",
    );
    table.target("0", failed == 0);
    table.compare(
        "many-runs",
        format!("{runs} concurrent runs (baseline: 1 run of {total})"),
        median(&mut rates),
        median(&mut baselines.clone()),
        "records/s",
        &mut ratios,
        |_| None,
    );
    table.add(
        "many-runs",
        format!("baseline: one run of {total} records"),
        median(&mut baselines),
        "records/s",
    );
    table.add("many-runs", "pipeline peak RSS before the runs", idle, "MiB");
    table.add("many-runs", format!("pipeline peak RSS, {runs} concurrent runs"), peak_many, "MiB");
    table.add("many-runs", format!("pipeline peak RSS, one run of {total} records"), peak_one, "MiB");
    Ok(())
}

// ------------------------------------------------------------------ fleet

/// The longest one fleet run may take before the scenario gives up.
const FLEET_RUN_BOUND: Duration = Duration::from_secs(300);

/// "1 instance", "8 instances".
fn instances(n: usize) -> String {
    format!("{n} instance{}", if n == 1 { "" } else { "s" })
}

/// One fleet size: its pipeline (a child process), a client of it, and its
/// measurements.
struct Fleet {
    size: usize,
    /// Its instances' addresses (`127.0.0.1:port`).
    addrs: Vec<String>,
    child: Proc,
    client: PipelineClient<Channel>,
    rates: Vec<f64>,
    /// Paired with the smallest fleet's rate of the same repetition.
    ratios: Vec<f64>,
    /// Paired with the next smaller fleet's rate of the same repetition.
    step_ratios: Vec<f64>,
    /// CPU µs per record: the pipeline child's, and the bench process's
    /// (the processors and the client).
    pipeline_cpu: Vec<f64>,
    rest_cpu: Vec<f64>,
    /// The most uneven spread seen: (fewest, most) records on one instance.
    spread: Option<(usize, usize)>,
}

/// Runs `n` records over this fleet once; returns records/s.
async fn fleet_run(f: &mut Fleet, n: usize, in_flight: u32) -> Result<f64> {
    let pid = f.child.pid();
    let (pipeline0, rest0) = (cpu_seconds(pid)?, cpu_seconds(std::process::id())?);
    // Results in the report (not summary_only): their `processor` field
    // gives the spread. That costs every fleet size the same.
    let req = request(one_unit_records(n), 0, proto::UnitMode::Parallel, in_flight, false);
    let (report, wall) = tokio::time::timeout(FLEET_RUN_BOUND, timed_run(&mut f.client, req))
        .await
        .with_context(|| format!("{n} records over {} took over {FLEET_RUN_BOUND:?}", instances(f.size)))??;
    let (pipeline1, rest1) = (cpu_seconds(pid)?, cpu_seconds(std::process::id())?);
    f.pipeline_cpu.push((pipeline1 - pipeline0) / n as f64 * 1e6);
    f.rest_cpu.push((rest1 - rest0) / n as f64 * 1e6);
    let mut per: BTreeMap<&str, usize> = f.addrs.iter().map(|a| (a.as_str(), 0)).collect();
    for r in &report.results {
        // A result names its instance by URL or by address, perhaps followed
        // by " (name)".
        let addr = r.processor.trim_start_matches("http://").split(' ').next().unwrap_or_default();
        *per.get_mut(addr).with_context(|| {
            format!("record {} came from {:?}, not an instance of the fleet", r.record_id, r.processor)
        })? += 1;
    }
    ensure!(report.results.len() == n, "{} results for {n} records", report.results.len());
    let (lo, hi) = (per.values().min().copied(), per.values().max().copied());
    let (lo, hi) = (lo.context("an empty fleet")?, hi.context("an empty fleet")?);
    // Keep the lowest fewest/most (cross-multiplied: no division by zero).
    if f.spread.is_none_or(|(l, h)| lo * h < l * hi) {
        f.spread = Some((lo, hi));
    }
    Ok(n as f64 / wall.as_secs_f64())
}

async fn fleet(args: &BenchArgs, table: &mut Table) -> Result<()> {
    let mut sizes = args.fleet_sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    ensure!(sizes.first().is_some_and(|&s| s >= 1), "--fleet-sizes: one or more sizes, each at least 1");
    let (n, c) = (args.fleet_records.max(1), args.fleet_concurrency.max(1));
    let largest = sizes[sizes.len() - 1];
    // The largest fleet's processors; each smaller fleet is the first of
    // them. One unit thread each (64 processors would otherwise start 128
    // on 2 cores), default slots (32 per unit thread).
    let mut processors = Vec::with_capacity(largest);
    for _ in 0..largest {
        let cfg = ProcessorConfig {
            listen: "127.0.0.1:0".into(),
            unit_threads: Some(1),
            ..ProcessorConfig::default()
        };
        processors.push(server::start_processor(&cfg, Digest::default()).await?.0);
    }
    // One pipeline per size, each in a child process: its runtime and CPU
    // are its own, not shared with 64 processors' servers, so its CPU per
    // record (the cost of choosing among more instances) can be read from
    // /proc, and a profiler can be pointed at it alone.
    let mut fleets = Vec::with_capacity(sizes.len());
    for &size in &sizes {
        let over = &processors[..size];
        // The warm-up run has at least 16 records per instance.
        let warm = n.max(16 * size);
        let child = spawn_pipeline(over, warm).await?;
        let client = session::connect(&child.addr).await?;
        let addrs = over.iter().map(|p| p.addr.to_string()).collect();
        eprintln!("  {}: pipeline (pid {}) on {}", instances(size), child.pid(), child.addr);
        let mut fleet = Fleet {
            size,
            addrs,
            child,
            client,
            rates: Vec::new(),
            ratios: Vec::new(),
            step_ratios: Vec::new(),
            pipeline_cpu: Vec::new(),
            rest_cpu: Vec::new(),
            spread: None,
        };
        // Warm-up, a twin of the measured runs: connections, the pipeline's
        // first look at its fleet and its memory are in place before the
        // figures (a first run measured up to a third slower). Its figures
        // are dropped.
        fleet_run(&mut fleet, warm, c).await?;
        fleet.pipeline_cpu.clear();
        fleet.rest_cpu.clear();
        fleet.spread = None;
        fleets.push(fleet);
    }
    for _ in 0..args.repeat.max(1) {
        // Smallest fleet first: every other ratio is paired with its rate
        // measured just before, in the same repetition.
        let (mut base, mut previous) = (None, None);
        for f in &mut fleets {
            let rate = fleet_run(f, n, c).await?;
            let base = *base.get_or_insert(rate);
            eprintln!(
                "  {:>13}: {rate:>7.0} records/s, {:.3} x {}; CPU per record: pipeline {:.1} µs, processors + client {:.1} µs",
                instances(f.size),
                rate / base,
                instances(sizes[0]),
                f.pipeline_cpu.last().copied().unwrap_or_default(),
                f.rest_cpu.last().copied().unwrap_or_default(),
            );
            f.rates.push(rate);
            f.ratios.push(rate / base);
            f.step_ratios.push(rate / previous.unwrap_or(rate));
            previous = Some(rate);
        }
    }
    let base_rate = median(&mut fleets[0].rates.clone());
    for k in 0..fleets.len() {
        let previous_rate = median(&mut fleets[k.saturating_sub(1)].rates.clone());
        let f = &mut fleets[k];
        let name = format!("{}, {c} in flight", instances(f.size));
        if k == 0 {
            table.add("fleet", format!("baseline: {name}"), median(&mut f.rates), "records/s");
            continue;
        }
        let is_target = f.size == largest;
        let rate = median(&mut f.rates);
        table.compare("fleet", name, rate, base_rate, "records/s", &mut f.ratios, |r| {
            is_target.then(|| (">= 0.9".to_owned(), r >= 0.9))
        });
        if k > 1 {
            // The smallest fleet may be short of slots for `c` in flight
            // (one processor has 32): the step from the size before shows
            // the cost of more instances alone.
            let before = fleets[k - 1].size;
            let f = &mut fleets[k];
            table.compare(
                "fleet",
                format!("{} (baseline: {before})", instances(f.size)),
                rate,
                previous_rate,
                "records/s",
                &mut f.step_ratios,
                |_| None,
            );
        }
    }
    for f in fleets.iter().filter(|f| f.size > 1) {
        let (lo, hi) = f.spread.unwrap_or_default();
        table.add(
            "fleet",
            format!("{}: fewest / most records on one ({lo} / {hi})", instances(f.size)),
            lo as f64 / hi.max(1) as f64,
            "min/max",
        );
    }
    for f in &mut fleets {
        table.add(
            "fleet",
            format!("{}: pipeline CPU per record", instances(f.size)),
            median(&mut f.pipeline_cpu),
            "µs",
        );
    }
    for f in &mut fleets {
        table.add(
            "fleet",
            format!("{}: processors + client CPU per record", instances(f.size)),
            median(&mut f.rest_cpu),
            "µs",
        );
    }
    drop(fleets);
    for p in processors {
        p.shutdown().await?;
    }
    Ok(())
}

// ---------------------------------------------------------------- tracing

/// A collector that only counts the spans it is sent: where the traced
/// half's servers export to.
#[derive(Clone, Default)]
struct SpanSink(std::sync::Arc<std::sync::atomic::AtomicU64>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService for SpanSink {
    async fn export(
        &self,
        request: tonic::Request<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse>,
        tonic::Status,
    > {
        let spans: usize = (request.into_inner().resource_spans.iter())
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(Default::default()))
    }
}

/// Starts the sink on a loopback port: its URL, its count, its stop.
async fn start_span_sink() -> Result<(String, SpanSink, tokio_util::sync::CancellationToken)> {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (sink, stop) = (SpanSink::default(), tokio_util::sync::CancellationToken::new());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    Ok((url, sink, stop))
}

/// A processor and a pipeline over it, each a child process of this binary
/// (hidden subcommands) with `otlp` as its OTLP endpoint, or with no
/// tracing at all; and a client.
async fn child_stack(
    otlp: Option<&str>,
    max_records: usize,
) -> Result<(Proc, Proc, PipelineClient<Channel>)> {
    let command = |args: &[&str]| -> Result<Command> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stderr(Stdio::inherit());
        if let Some(url) = otlp {
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", url);
        }
        Ok(cmd)
    };
    let processor =
        Proc::spawn(command(&["serve-processor", "--listen", "127.0.0.1:0"])?, "the processor child").await?;
    let url = format!("http://{}", processor.addr);
    let max = max_records.to_string();
    let args = ["serve-pipeline", "--listen", "127.0.0.1:0", "--processors", &url, "--max-records", &max];
    let pipeline = Proc::spawn(command(&args)?, "the pipeline child").await?;
    let client = session::connect(&pipeline.addr).await?;
    Ok((processor, pipeline, client))
}

/// What tracing costs: the overhead scenario's run (1-unit, 0-round
/// records, `--concurrency` in flight) through a pipeline and a processor
/// in child processes, untraced, and with both exporting spans to a local
/// OTLP sink at the default sampling (the client's sampled `traceparent`,
/// parent-based always-on, `--trace-attempts-per-run` 1000). Children,
/// because a process installs its tracing subscriber once: the two halves
/// differ only in `OTEL_EXPORTER_OTLP_ENDPOINT`. Ratio traced / untraced,
/// measured in turns.
async fn tracing_cost(args: &BenchArgs, table: &mut Table) -> Result<()> {
    let n = args.overhead_records;
    let c = args.concurrency;
    let (sink_url, sink, stop) = start_span_sink().await?;
    let (p0, q0, mut plain) = child_stack(None, n.max(1_000)).await?;
    let (p1, q1, mut traced) = child_stack(Some(&sink_url), n.max(1_000)).await?;
    // CPU time of a half's two servers: steadier than wall time on a busy machine.
    let cpu = |a: &Proc, b: &Proc| -> Result<f64> { Ok(cpu_seconds(a.pid())? + cpu_seconds(b.pid())?) };
    // What a client with a trace of its own sends.
    let parent = fanout::otel::Parent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None)
        .context("the bench's traceparent")?;
    let traced_run = async |client: &mut PipelineClient<Channel>, records: usize| -> Result<Duration> {
        let req = request(one_unit_records(records), 0, proto::UnitMode::Parallel, c, true);
        let outgoing = parent.outgoing().context("a traceparent to send")?;
        Ok(outgoing.scope(timed_run(client, req)).await?.1)
    };
    timed_run(&mut plain, request(one_unit_records(1_000), 0, proto::UnitMode::Parallel, c, true)).await?;
    traced_run(&mut traced, 1_000).await?;
    let (mut rates, mut bases, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_plain, mut cpu_traced, mut cpu_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeat.max(1) {
        let req = request(one_unit_records(n), 0, proto::UnitMode::Parallel, c, true);
        let before = cpu(&p0, &q0)?;
        let base = n as f64 / timed_run(&mut plain, req).await?.1.as_secs_f64();
        let plain_us = (cpu(&p0, &q0)? - before) * 1e6 / n as f64;
        let before = cpu(&p1, &q1)?;
        let rate = n as f64 / traced_run(&mut traced, n).await?.as_secs_f64();
        let traced_us = (cpu(&p1, &q1)? - before) * 1e6 / n as f64;
        bases.push(base);
        rates.push(rate);
        ratios.push(rate / base);
        cpu_plain.push(plain_us);
        cpu_traced.push(traced_us);
        cpu_ratios.push(plain_us / traced_us);
    }
    table.compare(
        "tracing",
        format!("traced (OTLP to a local sink, default sampling), {c} in flight"),
        median(&mut rates),
        median(&mut bases),
        "records/s",
        &mut ratios,
        |r| Some((">= 0.9".to_owned(), r >= 0.9)),
    );
    table.add("tracing", "baseline: the same run untraced", median(&mut bases), "records/s");
    table.compare(
        "tracing",
        "servers' CPU per record, traced (untraced / traced)",
        median(&mut cpu_traced),
        median(&mut cpu_plain),
        "us",
        &mut cpu_ratios,
        |_| None,
    );
    // Exported so far (the batch processor sends every 5 s or per 512 spans).
    table.add("tracing", "spans received by the sink", sink.0.load(Ordering::Relaxed) as f64, "spans");
    stop.cancel();
    Ok(())
}
