//! Tracing set-up for the binaries: `RUST_LOG` filters (default `info`),
//! events go to stderr so stdout stays for output.

use tracing_subscriber::EnvFilter;

/// Installs a stderr `fmt` subscriber filtered by `RUST_LOG` (default
/// `default_filter`). Safe to call twice (the second call does nothing).
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
