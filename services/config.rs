//! Configuration of both servers: command-line flags, each with an env var.
//!
//! The structs are plain data too, so the demo and tests build them in code
//! (`ProcessorConfig::default()`, `PipelineConfig::new(urls)`).

use crate::error::Error;
use clap::{Args, Parser};
use std::time::Duration;

const MIB: usize = 1024 * 1024;

/// Settings of `fanout-processor`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "fanout-processor",
    version,
    about = "Serves fanout.v1.RecordProcessor: processes one record per call with the `digest` workload."
)]
pub struct ProcessorConfig {
    /// Log line format on stderr: `text`, or `json` (one object per line,
    /// with run id, record id and attempt as fields).
    #[arg(long, env = "FANOUT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
    /// Address to listen on; port 0 picks a free one (the startup line shows it).
    #[arg(long, env = "FANOUT_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: String,
    /// Name this instance reports in responses [default: the bound address].
    #[arg(long, env = "FANOUT_PROCESSOR_NAME")]
    pub name: Option<String>,
    /// Units processed at once across all records [default: the number of cores].
    #[arg(long, env = "FANOUT_UNIT_THREADS")]
    pub unit_threads: Option<usize>,
    /// Most units one record may have (more is INVALID_ARGUMENT).
    #[arg(long, env = "FANOUT_MAX_UNITS_PER_RECORD", default_value_t = 10_000)]
    pub max_units_per_record: usize,
    /// Largest request message accepted, in bytes.
    #[arg(long, env = "FANOUT_MAX_MESSAGE_BYTES", default_value_t = 4 * MIB)]
    pub max_message_bytes: usize,
    /// Records worked on at once; a pipeline keeps at most this many calls in
    /// flight here (it reads it from `Describe`). Far above the unit threads
    /// by default so that tiny records keep the threads busy despite the
    /// round trip; for heavy records, fewer (down to the unit threads) keep
    /// each record's time from dispatch close to its own work
    /// [default: 32 x unit threads].
    #[arg(long, env = "FANOUT_SLOTS")]
    pub slots: Option<usize>,
    /// Records allowed to wait for a slot (several pipelines sharing this
    /// processor); beyond it a record is refused at once with
    /// RESOURCE_EXHAUSTED marked not started [default: the slots].
    #[arg(long, env = "FANOUT_QUEUE")]
    pub queue: Option<usize>,
    /// Bytes that requests being decoded and worked on may hold in all (64
    /// per byte of each request: what prost's decoding can take); a request
    /// that does not fit is refused with RESOURCE_EXHAUSTED marked not
    /// started.
    #[arg(long, env = "FANOUT_MEMORY_BUDGET", default_value_t = 1024 * MIB)]
    pub memory_budget: usize,
    /// Largest `params.rounds` the digest workload accepts (more is
    /// INVALID_ARGUMENT naming this flag).
    #[arg(long, env = "FANOUT_MAX_ROUNDS", default_value_t = crate::workload::digest::DEFAULT_MAX_ROUNDS)]
    pub max_rounds: u64,
    /// Opt-in fast path for workloads whose units are all tiny: a record
    /// whose units are expected (from recent units' durations, across all
    /// params) to take less than this in all runs on the async worker instead
    /// of the unit threads, saving two thread handoffs. A unit much slower
    /// than the recent ones would then block an async worker and could not be
    /// cancelled, so leave it at 0 (off) unless every unit is cheap.
    #[arg(long, env = "FANOUT_INLINE_BUDGET", default_value = "0s", value_parser = humantime::parse_duration)]
    pub inline_budget: Duration,
    /// Client connection limits and timeouts.
    #[command(flatten)]
    pub connections: ConnectionLimits,
    /// Bearer tokens and reflection.
    #[command(flatten)]
    pub access: crate::auth::AccessArgs,
    /// TLS (and mTLS) for clients.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// On SIGINT/SIGTERM, how long in-flight calls may take to finish.
    #[arg(long, env = "FANOUT_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Prometheus metrics.
    #[command(flatten)]
    pub metrics: crate::metrics::MetricsArgs,
}

impl Default for ProcessorConfig {
    /// The documented defaults (env vars are not read).
    fn default() -> Self {
        defaults(&["fanout-processor"])
    }
}

/// Parses `args` with every env var ignored: the documented defaults, for
/// configs built in code (a library must not pick up, or exit on, a stray
/// `FANOUT_*` variable).
fn defaults<T: Parser>(args: &[&str]) -> T {
    let cmd = T::command().mut_args(|a| a.env(None::<&'static str>));
    let matches = cmd.try_get_matches_from(args).expect("the defaults parse");
    T::from_arg_matches(&matches).expect("the defaults convert")
}

/// `Err` naming `flag` when `value` is zero.
fn at_least_one(value: u64, flag: &str) -> Result<(), Error> {
    if value == 0 { Err(Error::Config(format!("{flag} must be at least 1"))) } else { Ok(()) }
}

impl ProcessorConfig {
    /// Checks the settings that must be non-zero.
    pub fn validate(&self) -> Result<(), Error> {
        at_least_one(self.max_units_per_record as u64, "--max-units-per-record")?;
        at_least_one(self.memory_budget as u64, "--memory-budget")?;
        at_least_one(self.max_message_bytes as u64, "--max-message-bytes")
    }

    /// Unit threads, defaulting to the machine's cores.
    pub fn unit_threads(&self) -> usize {
        self.unit_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }

    /// Slots and queue, defaults applied.
    pub fn capacity(&self) -> crate::processor::Capacity {
        let slots = self.slots.unwrap_or(32 * self.unit_threads()).max(1);
        crate::processor::Capacity { slots, queue: self.queue.unwrap_or(slots) }
    }
}

/// Settings of `fanout-pipeline`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "fanout-pipeline",
    version,
    about = "Serves fanout.v1.Pipeline: fans runs of records out over RecordProcessor instances."
)]
pub struct PipelineConfig {
    /// Log line format on stderr: `text`, or `json` (one object per line,
    /// with run id, record id and attempt as fields).
    #[arg(long, env = "FANOUT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::telemetry::LogFormat,
    /// Address to listen on; port 0 picks a free one (the startup line shows it).
    #[arg(long, env = "FANOUT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Processors, comma-separated: `http://HOST:PORT` (or `HOST:PORT`), or
    /// `dns:///NAME:PORT`. Every address of a name is an instance (a
    /// Kubernetes headless Service), looked up again every
    /// --resolve-interval.
    #[arg(long, env = "FANOUT_PROCESSORS", value_delimiter = ',', required = true)]
    pub processors: Vec<String>,
    /// How often processor names are looked up again (also within a second
    /// of a transport failure).
    #[arg(long, env = "FANOUT_RESOLVE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub resolve_interval: Duration,
    /// HTTP/2 keepalive pings to processors, every this often [default: off].
    /// Lost processors are found by health probes instead: grpc-go servers
    /// and Envoy answer pings more often than every 5 minutes with GOAWAY.
    #[arg(long, env = "FANOUT_HTTP2_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Option<Duration>,
    /// Per-run limits and defaults.
    #[command(flatten)]
    pub limits: RunLimits,
    /// Time allowed to open a connection to a processor, and for a health
    /// probe's answer: an instance that gives none in this time is lost, and
    /// its in-flight records are retried elsewhere.
    #[arg(long, env = "FANOUT_CONNECT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// How often each processor's health is checked.
    #[arg(long, env = "FANOUT_HEALTH_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,
    /// First retry delay ceiling; doubles per attempt; each delay is random in [ceiling/2, ceiling].
    #[arg(long, env = "FANOUT_BACKOFF_BASE", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub backoff_base: Duration,
    /// Longest retry delay.
    #[arg(long, env = "FANOUT_BACKOFF_MAX", default_value = "2s", value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
    /// Largest `Run` request accepted, in bytes (bigger is rejected before decoding).
    #[arg(long, env = "FANOUT_MAX_MESSAGE_BYTES", default_value_t = 8 * MIB)]
    pub max_message_bytes: usize,
    /// Most runs in progress at once; one more is refused with
    /// RESOURCE_EXHAUSTED naming this flag.
    #[arg(long, env = "FANOUT_MAX_CONCURRENT_RUNS", default_value_t = 1000)]
    pub max_concurrent_runs: usize,
    /// Bytes that accepted runs' requests may hold in all (about the encoded
    /// request plus a few hundred bytes per record), and that requests being
    /// received may take while decoding; a run that does not fit is refused
    /// with RESOURCE_EXHAUSTED naming this flag.
    #[arg(long, env = "FANOUT_RUN_MEMORY_BUDGET", default_value_t = 1024 * MIB)]
    pub run_memory_budget: usize,
    /// How often a run sends a `progress` event (counts so far), which also
    /// keeps proxies from closing a stream that is quiet during long records
    /// (nginx closes after 60 s of silence by default).
    #[arg(long, env = "FANOUT_PROGRESS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub progress_interval: Duration,
    /// A run whose client takes no event for this long (its stream's flow
    /// control window stays full) is cancelled and logged.
    #[arg(long, env = "FANOUT_STALLED_CLIENT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stalled_client_timeout: Duration,
    /// Client connection limits and timeouts.
    #[command(flatten)]
    pub connections: ConnectionLimits,
    /// Bearer tokens and reflection.
    #[command(flatten)]
    pub access: crate::auth::AccessArgs,
    /// The token sent to processors.
    #[command(flatten)]
    pub processor_token: crate::auth::ProcessorTokenArgs,
    /// Distributed tracing.
    #[command(flatten)]
    pub trace: crate::otel::TraceArgs,
    /// TLS (and mTLS) for clients.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// TLS to processors.
    #[command(flatten)]
    pub processor_tls: crate::tls::ProcessorTlsArgs,
    /// On SIGINT/SIGTERM, how long runs may take to finish before they are
    /// cancelled (and report CANCELLED).
    #[arg(long, env = "FANOUT_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Prometheus metrics.
    #[command(flatten)]
    pub metrics: crate::metrics::MetricsArgs,
}

impl PipelineConfig {
    /// The documented defaults (env vars are not read), with these
    /// processor endpoints.
    pub fn new<S: Into<String>>(processors: impl IntoIterator<Item = S>) -> Self {
        let mut cfg: Self = defaults(&["fanout-pipeline", "--processors", "x"]);
        cfg.processors = processors.into_iter().map(Into::into).collect();
        cfg
    }

    /// Checks the settings that must be non-zero (a zero `max_in_flight`
    /// would never start a record).
    pub fn validate(&self) -> Result<(), Error> {
        let l = &self.limits;
        at_least_one(l.max_records as u64, "--max-records")?;
        at_least_one(l.default_max_in_flight as u64, "--default-max-in-flight")?;
        at_least_one(l.max_in_flight_limit as u64, "--max-in-flight-limit")?;
        at_least_one(l.default_max_attempts.into(), "--default-max-attempts")?;
        at_least_one(l.max_attempts_limit.into(), "--max-attempts-limit")?;
        at_least_one(self.max_message_bytes as u64, "--max-message-bytes")?;
        at_least_one(self.max_concurrent_runs as u64, "--max-concurrent-runs")?;
        at_least_one(self.run_memory_budget as u64, "--run-memory-budget")?;
        if self.resolve_interval.is_zero() || self.health_interval.is_zero() || self.connect_timeout.is_zero()
        {
            return Err(Error::Config(
                "--resolve-interval, --health-interval and --connect-timeout must be positive".into(),
            ));
        }
        if self.progress_interval.is_zero() {
            return Err(Error::Config("--progress-interval must be positive".into()));
        }
        if self.stalled_client_timeout.is_zero() {
            return Err(Error::Config("--stalled-client-timeout must be positive".into()));
        }
        if l.default_record_timeout.is_zero() {
            return Err(Error::Config("--default-record-timeout must be positive".into()));
        }
        Ok(())
    }
}

/// Per-run limits and the defaults of a run's options.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct RunLimits {
    /// Most records one run may have (more is INVALID_ARGUMENT).
    #[arg(long, env = "FANOUT_MAX_RECORDS", default_value_t = 100_000)]
    pub max_records: usize,
    /// Records in flight at once when a run does not say.
    #[arg(long, env = "FANOUT_DEFAULT_MAX_IN_FLIGHT", default_value_t = 64)]
    pub default_max_in_flight: usize,
    /// Largest `max_in_flight` a run may ask for.
    #[arg(long, env = "FANOUT_MAX_IN_FLIGHT_LIMIT", default_value_t = 4096)]
    pub max_in_flight_limit: usize,
    /// Attempts per record when a run does not say.
    #[arg(long, env = "FANOUT_DEFAULT_MAX_ATTEMPTS", default_value_t = 3)]
    pub default_max_attempts: u32,
    /// Largest `max_attempts` a run may ask for.
    #[arg(long, env = "FANOUT_MAX_ATTEMPTS_LIMIT", default_value_t = 10)]
    pub max_attempts_limit: u32,
    /// Time bound of each attempt when a run does not say.
    #[arg(long, env = "FANOUT_DEFAULT_RECORD_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub default_record_timeout: Duration,
}

impl Default for RunLimits {
    fn default() -> Self {
        PipelineConfig::new(Vec::<String>::new()).limits
    }
}

/// How a server treats client connections (both servers).
#[derive(Args, Debug, Clone, PartialEq)]
pub struct ConnectionLimits {
    /// A connection that has not sent the HTTP/2 preface and its first frame
    /// within this is closed; 0 disables the check.
    #[arg(long, env = "FANOUT_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// A connection with no open call for this long is closed; 0 keeps idle
    /// connections open.
    #[arg(long, env = "FANOUT_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Most calls open at once on one connection (HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS); a client queues the others.
    #[arg(long, env = "FANOUT_MAX_CONCURRENT_STREAMS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// A connection older than this is asked to close (HTTP/2 GOAWAY): its
    /// open calls finish, new ones go on a new connection. Moves clients
    /// onto rotated TLS certificates, and spreads them again behind L4 load
    /// balancers. 0 keeps connections for good.
    #[arg(long, env = "FANOUT_MAX_CONNECTION_AGE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ProcessorConfig::default().connections
    }
}

/// What tells one version of a file given by a flag from the next (TLS
/// files, token files), cheaply: modification time and length, and the
/// inode on Unix, for files replaced by a rename or a symlink swap, as
/// Kubernetes does with mounted Secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    /// The stamp of a file from its metadata.
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Self { modified: meta.modified().ok(), len: meta.len(), inode }
    }

    /// The stamp of the file at `path`; `None` when it cannot be read.
    pub(crate) fn at(path: &std::path::Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|m| Self::of(&m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_zero_limits_are_refused() {
        assert!(ProcessorConfig::default().validate().is_ok());
        let mut cfg = PipelineConfig::new(["127.0.0.1:1"]);
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.limits.default_max_in_flight, 64);
        cfg.limits.default_max_in_flight = 0;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("--default-max-in-flight"), "{err}");
    }
}
