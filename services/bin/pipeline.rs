//! `fanout-pipeline`: serves `fanout.v1.Pipeline` over the processors named
//! by `--processors` until SIGINT/SIGTERM.

use clap::Parser;
use fanout::config::PipelineConfig;
use fanout::server;
use fanout::telemetry::TraceExport;
use std::io::Write;
use std::time::Duration;

// mimalloc: measurably less time in malloc/free than glibc's arenas when
// async workers and unit threads hand buffers to each other (fanout bench).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Longest wait on exit for buffered spans to reach the collector.
const TRACE_FLUSH: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = PipelineConfig::parse();
    // Spans go to a collector only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let export = TraceExport::from_env("fanout-pipeline");
    let telemetry = fanout::telemetry::init_with_traces("info", cfg.log_format, export)?;
    let running = server::start_pipeline(&cfg).await?;
    // Signals are handled from here on, before the address is announced:
    // SIGINT/SIGTERM drain and stop, SIGHUP reloads.
    server::reload_tls_on_sighup(&running);
    let stop = running.stop_token();
    let signalled = server::shutdown_signal();
    tokio::spawn(async move {
        signalled.await;
        stop.cancel();
    });
    // The one line scripts and tests read: the address actually bound.
    println!("fanout-pipeline listening on {}", running.addr);
    if let Some(at) = running.metrics_addr {
        // A reader may have closed stdout after the line above: not an error.
        let _ = writeln!(std::io::stdout(), "fanout-pipeline metrics on {at}");
    }
    let served = running.wait().await;
    telemetry.shutdown(TRACE_FLUSH).await;
    Ok(served?)
}
