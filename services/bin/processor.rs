//! `fanout-processor`: serves `fanout.v1.RecordProcessor` with the `digest`
//! workload until SIGINT/SIGTERM.

use clap::Parser;
use fanout::config::ProcessorConfig;
use fanout::server;
use fanout::workload::Digest;

// mimalloc: measurably less time in malloc/free than glibc's arenas when
// async workers and unit threads hand buffers to each other (fanout bench).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = ProcessorConfig::parse();
    fanout::telemetry::init("info", cfg.log_format);
    let (running, _stats) = server::start_processor(&cfg, Digest::with_max_rounds(cfg.max_rounds)).await?;
    // The one line scripts and tests read: the address actually bound.
    println!("fanout-processor listening on {}", running.addr);
    server::reload_tls_on_sighup(&running);
    let stop = running.stop_token();
    tokio::spawn(async move {
        server::shutdown_signal().await;
        stop.cancel();
    });
    running.wait().await?;
    Ok(())
}
