//! Tracing set-up for the binaries: `RUST_LOG` filters (default `info`),
//! events go to stderr so stdout stays for output, as text or as JSON lines
//! (`--log-format`).

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the event's
    /// fields at the top level (`message`, `record_id`, ...), and `spans`,
    /// the enclosing spans with theirs (`run_id` of the run, `record_id` and
    /// `attempt` of a record on a processor).
    Json,
}

/// Installs a stderr subscriber in `format`, filtered by `RUST_LOG` (default
/// `default_filter`). Safe to call twice (the second call does nothing).
pub fn init(default_filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(false).with_span_list(true).try_init()
        }
    };
}
