//! `fanout load`: abuse scenarios against a fleet of fanout binaries, the
//! source of BENCHMARKS.md's "Load and abuse, before and after" table.
//!
//! For each scenario it starts, from the release binaries in `--bin-dir`,
//! two `fanout-processor --unit-threads 1` and one `fanout-pipeline` over
//! both, all on loopback port 0 with their other flags at their defaults,
//! drives the scenario, and kills them. It speaks only gRPC and passes only
//! flags every version has, so the same command measures the binaries of an
//! older commit ("before") and of this one ("after"). The children inherit
//! the environment, so a `FANOUT_*` variable sets a flag a version knows
//! (`FANOUT_MAX_ROUNDS` for (d)) and is ignored by one that does not.
//!
//! - a: 200 concurrent runs of 500 records, `rounds = 1`, one connection each.
//! - b: one run of 4096 records × 10,000 units at `max_in_flight` 4096.
//! - c: 20 clients that start a run and never read its stream.
//! - d: one record at `rounds = 1e12`, `record_timeout` 2s.
//!
//! The servers' logs (RUST_LOG=warn) go to `load-proc0.log`,
//! `load-proc1.log` and `load-pipeline.log` in the temporary directory.

use crate::procs::{self, Proc, kib_field, peak_rss_mib};
use crate::session;
use anyhow::{Context, Result, anyhow, ensure};
use clap::{Args, ValueEnum};
use fanout::convert::{code_name, duration_to_proto, json_to_struct};
use fanout::proto::{self, pipeline_client::PipelineClient, run_event::Event};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// Which scenario to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// 200 concurrent runs × 500 records, rounds = 1, default options.
    A,
    /// One run of 4096 records × 10,000 units, max_in_flight 4096, record_timeout 5s.
    B,
    /// 20 clients open a run and never read it; normal runs and health meanwhile.
    C,
    /// One record at rounds = 1e12, record_timeout 2s; processor CPU afterwards.
    D,
    /// a, b, c and d in turn, each on a fresh fleet.
    All,
}

/// Flags of `fanout load`.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Directory holding the `fanout-processor` and `fanout-pipeline` binaries
    /// to start (e.g. target/release, or an older commit's).
    #[arg(long, value_name = "DIR")]
    bin_dir: PathBuf,
    /// Scenario to drive.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
}

/// Runs the scenario(s) of `args`, each on a fresh fleet. Returns the exit code.
pub async fn load(args: LoadArgs) -> Result<i32> {
    let scenarios = match args.scenario {
        Scenario::All => vec![Scenario::A, Scenario::B, Scenario::C, Scenario::D],
        one => vec![one],
    };
    for (i, scenario) in scenarios.into_iter().enumerate() {
        if i > 0 {
            println!();
        }
        let fleet = Fleet::start(&args.bin_dir).await?;
        serving(&fleet.url()).await?;
        match scenario {
            Scenario::A => scenario_a(&fleet).await?,
            Scenario::B => scenario_b(&fleet).await?,
            Scenario::C => scenario_c(&fleet).await?,
            // All is expanded above.
            Scenario::D | Scenario::All => scenario_d(&fleet).await?,
        }
    }
    Ok(0)
}

// ------------------------------------------------------------------ fleet

/// Starts `bin` with `args`, its stderr to the file `log`, and waits
/// (bounded) for its `... listening on ADDR` line.
async fn spawn(bin: &Path, args: &[&str], log: &Path) -> Result<Proc> {
    let log_file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stderr(Stdio::from(log_file)).env("RUST_LOG", "warn");
    Proc::spawn(cmd, &format!("{} (log: {})", bin.display(), log.display())).await
}

/// Two processors of one unit thread and a pipeline over both.
struct Fleet {
    pipeline: Proc,
    processors: Vec<Proc>,
}

impl Fleet {
    /// Starts the fleet from the binaries in `bin_dir`.
    async fn start(bin_dir: &Path) -> Result<Self> {
        let processor = bin_dir.join("fanout-processor");
        let pipeline = bin_dir.join("fanout-pipeline");
        for bin in [&processor, &pipeline] {
            ensure!(bin.is_file(), "no {} (build it with cargo build --release --bins)", bin.display());
        }
        let tmp = std::env::temp_dir();
        let mut processors = Vec::new();
        for i in 0..2 {
            let args = ["--listen", "127.0.0.1:0", "--unit-threads", "1"];
            processors.push(spawn(&processor, &args, &tmp.join(format!("load-proc{i}.log"))).await?);
        }
        let urls: Vec<String> = processors.iter().map(|p| format!("http://{}", p.addr)).collect();
        let joined = urls.join(",");
        let args = ["--listen", "127.0.0.1:0", "--processors", &joined];
        let pipeline = spawn(&pipeline, &args, &tmp.join("load-pipeline.log")).await?;
        eprintln!(
            "fleet: pipeline {} (pid {}), processors {:?} (pids {:?})",
            pipeline.addr,
            pipeline.pid(),
            urls,
            processors.iter().map(Proc::pid).collect::<Vec<_>>()
        );
        Ok(Self { pipeline, processors })
    }

    /// The pipeline's URL.
    fn url(&self) -> String {
        format!("http://{}", self.pipeline.addr)
    }

    /// The processors' pids.
    fn processor_pids(&self) -> Vec<u32> {
        self.processors.iter().map(Proc::pid).collect()
    }

    /// Peak RSS of each server, for printing.
    fn rss(&self) -> String {
        let procs: Vec<String> =
            self.processors.iter().map(|p| format!("{:.1}", vm_hwm_mib(p.pid()))).collect();
        format!("pipeline {:.1} MiB, processors {} MiB", vm_hwm_mib(self.pipeline.pid()), procs.join(" / "))
    }
}

// ------------------------------------------------------------------ /proc

/// Peak resident set size of a process in MiB (VmHWM), NaN if unreadable.
fn vm_hwm_mib(pid: u32) -> f64 {
    peak_rss_mib(pid).unwrap_or(f64::NAN)
}

/// The machine's MemAvailable in KiB, `f64::MAX` if unreadable.
fn mem_available_kib() -> f64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    kib_field(&meminfo, "MemAvailable:").unwrap_or(f64::MAX)
}

/// CPU seconds a process has used so far (0 if unreadable).
fn cpu_seconds(pid: u32) -> f64 {
    procs::cpu_seconds(pid).unwrap_or(0.0)
}

// ------------------------------------------------------------------ runs

/// `n` records `rec-00000`, `rec-00001`, …, with `attributes.units` when given.
fn records(n: usize, units: Option<u32>) -> Vec<proto::Record> {
    (0..n)
        .map(|i| {
            let mut attributes = serde_json::Map::new();
            if let Some(u) = units {
                attributes.insert("units".into(), u.into());
            }
            proto::Record { id: format!("rec-{i:05}"), attributes: Some(json_to_struct(attributes)) }
        })
        .collect()
}

/// A run of `records`, with `params.rounds` when given.
fn request(
    records: Vec<proto::Record>,
    rounds: Option<serde_json::Value>,
    options: proto::RunOptions,
) -> proto::RunRequest {
    let mut params = serde_json::Map::new();
    if let Some(r) = rounds {
        params.insert("rounds".into(), r);
    }
    proto::RunRequest {
        run_id: String::new(),
        records,
        unit_mode: 0,
        params: Some(json_to_struct(params)),
        options: Some(options),
    }
}

/// What one run came to, as the client saw it.
#[derive(Default, Debug)]
struct Outcome {
    accepted: bool,
    /// Run refused, or stream broken: code and message.
    error: Option<String>,
    status: String,
    succeeded: u64,
    failed: u64,
    retries: u64,
    /// (code, message) of each failed record.
    failures: Vec<(String, String)>,
    wall: Duration,
}

impl Outcome {
    /// The one-line summary both the normal runs and (d) print.
    fn line(&self) -> String {
        format!(
            "accepted {} status {} error {:?} succeeded {} FAILED {} retries {} wall {:.3} s",
            self.accepted,
            self.status,
            self.error,
            self.succeeded,
            self.failed,
            self.retries,
            self.wall.as_secs_f64()
        )
    }
}

/// Runs `req` and follows its stream to the report, or to its end or
/// failure. Unbounded in time: callers put a timeout around it.
async fn run_once(client: &mut PipelineClient<Channel>, req: proto::RunRequest) -> Outcome {
    let t = Instant::now();
    let mut out = Outcome::default();
    let mut stream = match client.run(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            out.error = Some(format!("Run refused: {}: {}", code_name(s.code()), s.message()));
            out.wall = t.elapsed();
            return out;
        }
    };
    out.accepted = true;
    loop {
        match stream.message().await {
            Ok(Some(ev)) => match ev.event {
                Some(Event::Record(r)) => {
                    if r.status() == proto::RecordStatus::Succeeded {
                        out.succeeded += 1;
                    } else {
                        out.failed += 1;
                        let e = r.error.unwrap_or_default();
                        out.failures.push((e.code_name, e.message));
                    }
                }
                Some(Event::Report(rep)) => {
                    out.status = format!("{:?}", rep.status());
                    out.retries = rep.summary.map_or(0, |s| s.retries);
                    break;
                }
                _ => {}
            },
            Ok(None) => {
                out.error = Some("stream ended before the report".into());
                break;
            }
            Err(s) => {
                out.error = Some(format!("stream failed: {}: {}", code_name(s.code()), s.message()));
                break;
            }
        }
    }
    out.wall = t.elapsed();
    out
}

/// The `n` most frequent (code, message) pairs, messages compared with their
/// digit runs replaced by `#`; each with its count and one example.
fn top(failures: impl Iterator<Item = (String, String)>, n: usize) -> Vec<(usize, String)> {
    let mut counts: HashMap<String, (usize, String)> = HashMap::new();
    for (code, msg) in failures {
        let mut norm = String::new();
        let mut last_digit = false;
        for c in msg.chars() {
            if c.is_ascii_digit() {
                if !last_digit {
                    norm.push('#');
                }
                last_digit = true;
            } else {
                norm.push(c);
                last_digit = false;
            }
        }
        counts.entry(format!("{code}: {norm}")).or_insert_with(|| (0, msg)).0 += 1;
    }
    let mut v: Vec<(usize, String)> =
        counts.into_iter().map(|(k, (c, example))| (c, format!("{k}\n        e.g. {example}"))).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    v.truncate(n);
    v
}

/// Prints the three most frequent failures.
fn print_top(failures: impl Iterator<Item = (String, String)>) {
    for (c, m) in top(failures, 3) {
        println!("    {c:>7} × {m}");
    }
}

// ------------------------------------------------------------------ scenarios

/// (a) 200 concurrent runs of 500 records, each on its own connection.
async fn scenario_a(fleet: &Fleet) -> Result<()> {
    let (runs, per_run) = (200usize, 500usize);
    let url = fleet.url();
    let mut clients = Vec::new();
    for _ in 0..runs {
        clients.push(session::connect(&url).await?);
    }
    println!(
        "(a) {runs} concurrent runs × {per_run} records, rounds = 1, default options, one connection per run"
    );
    let t = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let req = request(records(per_run, None), Some(1.into()), proto::RunOptions::default());
                run_once(&mut c, req).await
            })
        })
        .collect();
    let all = tokio::time::timeout(Duration::from_secs(600), futures::future::join_all(tasks))
        .await
        .map_err(|_| anyhow!("(a) did not finish in 10 minutes"))?;
    let wall = t.elapsed();
    let outs: Vec<Outcome> = all.into_iter().collect::<Result<_, _>>()?;
    let accepted = outs.iter().filter(|o| o.accepted).count();
    let succeeded: u64 = outs.iter().map(|o| o.succeeded).sum();
    let failed: u64 = outs.iter().map(|o| o.failed).sum();
    let retries: u64 = outs.iter().map(|o| o.retries).sum();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outs {
        *statuses.entry(o.error.clone().unwrap_or_else(|| o.status.clone())).or_default() += 1;
    }
    let mut walls: Vec<f64> = outs.iter().map(|o| o.wall.as_secs_f64()).collect();
    walls.sort_by(f64::total_cmp);
    let at = |i: usize| walls.get(i).copied().unwrap_or(f64::NAN);
    let (min, median, max) = (at(0), at(walls.len() / 2), at(walls.len().saturating_sub(1)));
    println!("  runs accepted        {accepted} / {runs}");
    println!("  run outcomes         {statuses:?}");
    println!("  records succeeded    {succeeded}");
    println!("  records FAILED       {failed}   (retries {retries})");
    print_top(outs.iter().flat_map(|o| o.failures.iter().cloned()));
    println!(
        "  wall                 {:.3} s (run walls: min {min:.2} s, median {median:.2} s, max {max:.2} s)",
        wall.as_secs_f64()
    );
    println!(
        "  aggregate            {:.0} records/s accounted ({:.0} succeeded/s)",
        (succeeded + failed) as f64 / wall.as_secs_f64(),
        succeeded as f64 / wall.as_secs_f64()
    );
    println!("  peak RSS (VmHWM)     {}", fleet.rss());
    Ok(())
}

/// (b) One run of 4096 records × 10,000 units, all in flight at once. Gives
/// up after 300 s, or sooner when the machine's available memory falls
/// under 4 GiB (the old processors queued every unit).
async fn scenario_b(fleet: &Fleet) -> Result<()> {
    println!(
        "(b) one run: 4096 records × attributes.units = 10000, rounds = 1, max_in_flight = 4096, record_timeout = 5s"
    );
    let mut c = session::connect(&fleet.url()).await?;
    let opts = proto::RunOptions {
        max_in_flight: 4096,
        record_timeout: Some(duration_to_proto(Duration::from_secs(5))),
        ..Default::default()
    };
    let req = request(records(4096, Some(10_000)), Some(1.into()), opts);
    let t = Instant::now();
    let cpu0: Vec<f64> = fleet.processor_pids().into_iter().map(cpu_seconds).collect();
    let guard = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let avail_kib = mem_available_kib();
            if avail_kib < 4.0 * 1024.0 * 1024.0 {
                return avail_kib;
            }
        }
    };
    let bounded = async {
        tokio::select! {
            o = tokio::time::timeout(Duration::from_secs(300), run_once(&mut c, req)) => Ok(o),
            kib = guard => Err(kib),
        }
    };
    let res = match bounded.await {
        Ok(r) => r,
        Err(kib) => {
            println!(
                "  GAVE UP at {:.0} s: MemAvailable down to {:.1} GiB; RSS now {}",
                t.elapsed().as_secs_f64(),
                kib / 1_048_576.0,
                fleet.rss()
            );
            return Ok(());
        }
    };
    match res {
        Ok(o) => {
            println!("  accepted {}  error {:?}  status {}", o.accepted, o.error, o.status);
            println!("  records succeeded {}  FAILED {}  (retries {})", o.succeeded, o.failed, o.retries);
            print_top(o.failures.into_iter());
            println!("  wall {:.3} s", o.wall.as_secs_f64());
        }
        Err(_) => println!("  GAVE UP after {:.0} s (run not finished)", t.elapsed().as_secs_f64()),
    }
    let cpu: Vec<String> = fleet
        .processor_pids()
        .into_iter()
        .zip(cpu0)
        .map(|(pid, c0)| format!("{:.1}", cpu_seconds(pid) - c0))
        .collect();
    println!("  processor CPU during the run: {} s", cpu.join(" / "));
    println!("  peak RSS (VmHWM) {}", fleet.rss());
    Ok(())
}

/// A run of 50 records at default rounds and options, bounded to 180 s; prints its outcome.
async fn normal_run(url: &str, label: &str) -> Result<()> {
    let mut c = session::connect(url).await?;
    let req = request(records(50, None), None, proto::RunOptions::default());
    match tokio::time::timeout(Duration::from_secs(180), run_once(&mut c, req)).await {
        Ok(o) => {
            println!("  {label}: {}", o.line());
            print_top(o.failures.into_iter());
        }
        Err(_) => println!("  {label}: no report within 180 s (gave up)"),
    }
    Ok(())
}

/// Waits (at most 10 s) until the pipeline at `url` reports
/// `fanout.v1.Pipeline` SERVING, which it does once a probe of a processor
/// has answered: before that a run would be refused.
async fn serving(url: &str) -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    tokio::time::timeout(Duration::from_secs(10), async {
        let ch = Endpoint::from_shared(url.to_owned())?.connect().await?;
        let req = HealthCheckRequest { service: fanout::server::PIPELINE_SERVICE.into() };
        let mut watch = HealthClient::new(ch).watch(req).await?.into_inner();
        while let Some(answer) = watch.message().await? {
            if answer.status() == ServingStatus::Serving {
                return Ok(());
            }
        }
        Err(anyhow!("the health watch ended"))
    })
    .await
    .map_err(|_| anyhow!("the pipeline at {url} was not SERVING within 10 s"))?
}

/// The pipeline's health check, bounded to 10 s; prints the answer and its latency.
async fn health(url: &str, label: &str) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let ch = Endpoint::from_shared(url.to_owned())?.connect().await?;
        let resp = HealthClient::new(ch)
            .check(HealthCheckRequest { service: fanout::server::PIPELINE_SERVICE.into() })
            .await
            .map_err(|s| anyhow!("{}: {}", code_name(s.code()), s.message()))?;
        Ok::<_, anyhow::Error>(resp.into_inner().status().as_str_name().to_owned())
    })
    .await;
    let r = match r {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => format!("error {e}"),
        Err(_) => "no answer within 10 s".into(),
    };
    println!(
        "  {label}: health Check(fanout.v1.Pipeline) = {r} in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}

/// (c) 20 clients start a run of 2000 records and never read it, on tiny h2
/// windows; a normal run and a health check before, meanwhile, and once the
/// processors have gone idle (bounded to 120 s).
async fn scenario_c(fleet: &Fleet) -> Result<()> {
    let url = fleet.url();
    println!(
        "(c) 20 clients open Run(2000 records, rounds 1000) and never read (h2 windows: stream 1 KiB, connection 64 KiB)"
    );
    normal_run(&url, "before the stalled clients, normal 50-record run (default rounds and options)").await?;
    let t0 = Instant::now();
    let mut held = Vec::new();
    for _ in 0..20 {
        let ch = Endpoint::from_shared(url.clone())?
            .connect_timeout(Duration::from_secs(5))
            .initial_stream_window_size(1024)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .with_context(|| format!("connecting to the pipeline at {url}"))?;
        let mut c = PipelineClient::new(ch);
        let req = request(records(2000, None), Some(1000.into()), proto::RunOptions::default());
        match tokio::time::timeout(Duration::from_secs(10), c.run(req)).await {
            Ok(Ok(stream)) => held.push((c, stream)), // never polled
            Ok(Err(s)) => println!("  stalled client refused: {}: {}", code_name(s.code()), s.message()),
            Err(_) => println!("  stalled client: no response headers in 10 s"),
        }
    }
    println!("  {} stalled runs open after {:.2} s", held.len(), t0.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ((), n) = tokio::join!(health(&url, "t+1s"), normal_run(&url, "t+1s, normal 50-record run"));
    n?;
    // Wait (bounded) until the processors go idle: the stalled runs stopped.
    let pids = fleet.processor_pids();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
        if now - last < 0.1 || Instant::now() > deadline {
            println!(
                "  processors idle (< 0.1 CPU s per 2 s) at t+{:.1}s; processor CPU total {:.1} s",
                t0.elapsed().as_secs_f64(),
                now
            );
            break;
        }
        last = now;
    }
    let label = format!("t+{:.0}s (stalled runs blocked)", t0.elapsed().as_secs_f64());
    health(&url, &label).await;
    normal_run(&url, &format!("{label}, normal 50-record run")).await?;
    println!("  peak RSS (VmHWM) {}", fleet.rss());
    drop(held);
    Ok(())
}

/// (d) One record at `rounds = 1e12` with a 2 s record timeout, bounded to
/// 120 s; then the processors' CPU in the 10 s after the run ended.
async fn scenario_d(fleet: &Fleet) -> Result<()> {
    println!("(d) one record, params.rounds = 1e12, record_timeout = 2s, other options default");
    let mut c = session::connect(&fleet.url()).await?;
    let opts = proto::RunOptions {
        record_timeout: Some(duration_to_proto(Duration::from_secs(2))),
        ..Default::default()
    };
    let req = request(records(1, None), Some(serde_json::json!(1e12)), opts);
    let o = tokio::time::timeout(Duration::from_secs(120), run_once(&mut c, req))
        .await
        .map_err(|_| anyhow!("(d) no report in 120 s"))?;
    println!("  {}", o.line());
    for (code, msg) in &o.failures {
        println!("    {code}: {msg}");
    }
    let pids = fleet.processor_pids();
    let before: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let el = t.elapsed().as_secs_f64();
    for (i, (&p, b)) in pids.iter().zip(before).enumerate() {
        let used = cpu_seconds(p) - b;
        println!(
            "  processor {i}: {used:.2} CPU s (utime+stime) in the {el:.1} s after the run ended ({:.0} % of a core)",
            used / el * 100.0
        );
    }
    Ok(())
}
