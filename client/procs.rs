//! Servers in child processes, for `bench` and `load`: started with a bound
//! on their startup, killed on drop, and measured through /proc (peak RSS,
//! CPU time).

use anyhow::{Context, Result, anyhow, ensure};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// How long a server may take to print its startup line.
const STARTUP_BOUND: Duration = Duration::from_secs(10);

/// A child process, killed on drop, so a failed bench leaves nothing behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server in a child process, killed on drop, with the address it bound.
pub struct Proc {
    child: KillOnDrop,
    /// `HOST:PORT` from its startup line.
    pub addr: String,
}

impl Proc {
    /// Starts `cmd` (its arguments, environment and stderr already set) with
    /// stdout piped, and waits, at most [`STARTUP_BOUND`], for its `...
    /// listening on ADDR` line.
    pub async fn spawn(mut cmd: Command, what: &str) -> Result<Self> {
        let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("spawning {what}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        // From here on, a failure kills the child.
        let mut proc = Self { child: KillOnDrop(child), addr: String::new() };
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(STARTUP_BOUND, read)
            .await
            .map_err(|_| anyhow!("{what} printed no startup line in {STARTUP_BOUND:?}"))???;
        ensure!(line.contains("listening on"), "unexpected startup line from {what}: {line:?}");
        proc.addr = line.trim().rsplit(' ').next().context("no address in the startup line")?.to_owned();
        Ok(proc)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

/// Peak resident set size of a process, in MiB (VmHWM in /proc).
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    kib_field(&status, "VmHWM:").map(|kib| kib / 1024.0).context("no VmHWM in /proc status")
}

/// The value of a `NAME: N kB` line of a /proc file, in KiB.
pub fn kib_field(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system, over all its threads, gone ones included) a
/// process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name, in parentheses, may hold spaces: count from after it,
    // where field 3 (state) comes first; utime is field 14, stime 15.
    let (_, rest) = stat.rsplit_once(')').context("no command name in /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |field: usize| -> Result<f64> {
        Ok(fields.get(field - 3).context("short /proc stat")?.parse::<f64>()?)
    };
    Ok((ticks(14)? + ticks(15)?) / clk_tck())
}

/// Clock ticks per second of /proc's times (`getconf CLK_TCK`, else 100).
fn clk_tck() -> f64 {
    static HZ: OnceLock<f64> = OnceLock::new();
    *HZ.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().ok();
        out.and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
