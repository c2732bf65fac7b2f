//! `fanout-pipeline`: serves `fanout.v1.Pipeline` over the processors named
//! by `--processors` until SIGINT/SIGTERM.

use clap::Parser;
use fanout::config::PipelineConfig;
use fanout::server;

// mimalloc: measurably less time in malloc/free than glibc's arenas when
// async workers and unit threads hand buffers to each other (fanout bench).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = PipelineConfig::parse();
    fanout::telemetry::init("info", cfg.log_format);
    let running = server::start_pipeline(&cfg).await?;
    // The one line scripts and tests read: the address actually bound.
    println!("fanout-pipeline listening on {}", running.addr);
    server::reload_tls_on_sighup(&running);
    let stop = running.stop_token();
    tokio::spawn(async move {
        server::shutdown_signal().await;
        stop.cancel();
    });
    running.wait().await?;
    Ok(())
}
