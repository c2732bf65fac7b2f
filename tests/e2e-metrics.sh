#!/usr/bin/env bash
# End to end: the servers' Prometheus metrics, checked by Prometheus's own
# tools.
#
# Starts two `fanout-processor`s and a `fanout-pipeline` with
# --metrics-listen 127.0.0.1:0 (their bound addresses read from their
# stdout), and a real `prometheus` scraping the three every second (own
# config, temp storage, loopback only). Once it has scraped all three, runs
# `fanout run` over RECORDS records, FAILING of which fail (digest units 0,
# INVALID_ARGUMENT); then:
#   - `promtool check metrics` must find no problem in any of the three
#     scrapes;
#   - Prometheus's `sum(fanout_records_total)` must reach RECORDS, and
#     `sum(fanout_records_total{status="failed"})` FAILING (bounded wait);
#   - the README's Grafana queries (failed records per second and their
#     share, p99 record duration overall and by processor), verbatim, must
#     each give a positive number for every series.
# Prints a trimmed /metrics sample of the pipeline. Everything started is
# stopped on exit, pass or fail.
#
# Installs Debian's `prometheus` package (apt-get) when promtool or
# prometheus is missing. Builds the binaries when the folder lacks them.
# Usage: tests/e2e-metrics.sh [target/release]   (the folder holding the binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}

RECORDS=300
FAILING=7
ROUNDS=2000            # digest rounds per unit: a run of a few seconds
STARTUP_LIMIT=20       # seconds for a server's startup lines
SCRAPE_LIMIT=30        # seconds for Prometheus to see the targets / the counts
RUN_LIMIT=60           # seconds the client may take at most

say() { echo "e2e-metrics: $*"; }
die() { echo "e2e-metrics: FAIL: $*" >&2; exit 1; }

# ---- prerequisites --------------------------------------------------------
PATH="$PATH:/usr/sbin:/sbin"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  [ "$(id -u)" -eq 0 ] || die "promtool/prometheus missing, and installing them needs root"
  export DEBIAN_FRONTEND=noninteractive
  say "installing prometheus (apt-get)"
  if ! apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 || true
    apt-get install -y -q --no-install-recommends prometheus >/dev/null || die "cannot install prometheus with apt-get"
  fi
fi
command -v curl >/dev/null || die "curl is needed"
command -v python3 >/dev/null || die "python3 is needed (JSON of the Prometheus API)"
for b in fanout fanout-pipeline fanout-processor; do
  if [ ! -x "$bin/$b" ]; then
    say "$bin/$b missing: cargo build --release --bins"
    if [ "$bin" != target/release ]; then
      CARGO_TARGET_DIR=$(dirname "$bin") cargo build --release --bins
    else
      cargo build --release --bins
    fi
  fi
done

tmp=$(mktemp -d /tmp/fanout-e2e-metrics.XXXXXX)
pids=()
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$rc" -ne 0 ]; then
    for f in "$tmp"/*.log; do
      [ -f "$f" ] || continue
      echo "---- $f (last 30 lines)" >&2
      tail -n 30 "$f" >&2
    done
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT INT TERM

# wait_line FILE PATTERN: the last word of the first line of FILE matching
# PATTERN, waiting for it at most STARTUP_LIMIT seconds.
wait_line() {
  local deadline=$((SECONDS + STARTUP_LIMIT)) line
  while [ "$SECONDS" -lt "$deadline" ]; do
    line=$(grep -m1 -- "$2" "$1" 2>/dev/null || true)
    if [ -n "$line" ]; then echo "${line##* }"; return 0; fi
    sleep 0.1
  done
  die "no line matching '$2' in $1 within ${STARTUP_LIMIT}s"
}

# ---- servers --------------------------------------------------------------
start() { # start NAME EXE ARGS...: runs EXE in the background, stdout to NAME.out
  local name=$1 exe=$2
  shift 2
  RUST_LOG=warn "$bin/$exe" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 "$@" \
    >"$tmp/$name.out" 2>"$tmp/$name.log" &
  pids+=($!)
}
start p1 fanout-processor --unit-threads 1
start p2 fanout-processor --unit-threads 1
p1=$(wait_line "$tmp/p1.out" "listening on"); p1m=$(wait_line "$tmp/p1.out" "metrics on")
p2=$(wait_line "$tmp/p2.out" "listening on"); p2m=$(wait_line "$tmp/p2.out" "metrics on")
start pipe fanout-pipeline --processors "http://$p1,http://$p2"
pipe=$(wait_line "$tmp/pipe.out" "listening on"); pipem=$(wait_line "$tmp/pipe.out" "metrics on")
say "processors $p1 (metrics $p1m), $p2 (metrics $p2m); pipeline $pipe (metrics $pipem)"

# ---- prometheus -----------------------------------------------------------
prom_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: fanout
    static_configs:
      - targets: ["$pipem", "$p1m", "$p2m"]
EOF
promtool check config "$tmp/prometheus.yml" >/dev/null || die "promtool rejects the generated config"
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" >"$tmp/prometheus.log" 2>&1 &
pids+=($!)
api="http://127.0.0.1:$prom_port/api/v1"

# query PROMQL: the value of the first result, or "none".
query() {
  { curl -s --max-time 2 --get "$api/query" --data-urlencode "query=$1" 2>/dev/null || true; } | python3 -c '
import json, sys
try:
    r = json.load(sys.stdin)["data"]["result"]
    print(r[0]["value"][1] if r else "none")
except Exception:
    print("none")'
}

# poll WHAT PROMQL WANT: waits at most SCRAPE_LIMIT seconds for PROMQL to equal WANT.
poll() {
  local deadline=$((SECONDS + SCRAPE_LIMIT)) got=none
  while [ "$SECONDS" -lt "$deadline" ]; do
    got=$(query "$2")
    [ "$got" = "$3" ] && { say "$1: $2 = $got"; return 0; }
    sleep 0.5
  done
  die "$1: $2 is $got, not $3, after ${SCRAPE_LIMIT}s"
}
poll "prometheus scrapes the three servers" 'sum(up{job="fanout"})' 3

# ---- the run --------------------------------------------------------------
python3 - "$RECORDS" "$FAILING" >"$tmp/records.ndjson" <<'EOF'
import json, sys
n, failing = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    rec = {"id": f"rec-{i:04d}"}
    if i % (n // failing) == 0 and i // (n // failing) < failing:
        rec["attributes"] = {"units": 0}   # digest: INVALID_ARGUMENT, not retried
    print(json.dumps(rec))
EOF
say "run: $RECORDS records, $FAILING failing"
set +e
timeout "$RUN_LIMIT" "$bin/fanout" run --pipeline "http://$pipe" --params "{\"rounds\": $ROUNDS}" \
  "$tmp/records.ndjson" >"$tmp/report.json" 2>"$tmp/client.log"
rc=$?
set -e
# 3: PARTIALLY_FAILED, as expected with failing records.
[ "$rc" -eq 3 ] || die "fanout run exited $rc, not 3 (PARTIALLY_FAILED)"

# ---- promtool on each scrape ----------------------------------------------
for target in "$pipem" "$p1m" "$p2m"; do
  curl -sf --max-time 5 "http://$target/metrics" >"$tmp/scrape.txt" || die "cannot scrape $target"
  problems=$(promtool check metrics <"$tmp/scrape.txt" 2>&1) || die "promtool check metrics on $target: $problems"
  [ -z "$problems" ] || die "promtool check metrics on $target: $problems"
  say "promtool check metrics: $target clean ($(grep -vc '^#' "$tmp/scrape.txt") samples)"
done
curl -sf --max-time 5 "http://$pipem/metrics" >"$tmp/pipeline.txt"
[ "$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' "http://$pipem/")" = 404 ] || die "/ on the metrics port is not 404"
[ "$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' -X POST "http://$pipem/metrics")" = 405 ] || die "POST /metrics is not 405"

# ---- what prometheus saw --------------------------------------------------
poll "records" 'sum(fanout_records_total)' "$RECORDS"
poll "failed records" 'sum(fanout_records_total{status="failed"})' "$FAILING"
poll "runs" 'sum(fanout_runs_total{status="PARTIALLY_FAILED"})' 1
poll "attempts on the processors" \
  'sum(grpc_server_started_total{grpc_method="ProcessRecord"}) - sum(fanout_record_attempts_total)' 0
# values PROMQL: every series' value, space-separated ("none" without any).
values() {
  { curl -s --max-time 2 --get "$api/query" --data-urlencode "query=$1" 2>/dev/null || true; } | python3 -c '
import json, sys
try:
    r = json.load(sys.stdin)["data"]["result"]
    print(" ".join(x["value"][1] for x in r) if r else "none")
except Exception:
    print("none")'
}
# The README's queries ("Observe"), as written there: each series a positive number.
readme_query() { # readme_query WHAT PROMQL [SERIES]: SERIES (default 1) results expected
  local got
  got=$(values "$2")
  python3 -c '
import math, sys
vals, want = sys.argv[1].split(), int(sys.argv[2])
ok = len(vals) == want and all(math.isfinite(float(v)) and float(v) > 0 for v in vals)
sys.exit(0 if ok else 1)' "$got" "${3:-1}" 2>/dev/null || die "$1: $2 gives '$got', not ${3:-1} positive number(s)"
  say "$1 (Prometheus): $got"
}
readme_query "failed records per second" 'sum(rate(fanout_records_total{status="failed"}[5m]))'
readme_query "failed share" \
  'sum(rate(fanout_records_total{status="failed"}[5m])) / sum(rate(fanout_records_total[5m]))'
readme_query "p99 record duration (s)" \
  'histogram_quantile(0.99, sum by (le) (rate(fanout_record_duration_seconds_bucket[5m])))'
readme_query "p99 attempt duration by processor (s)" \
  'histogram_quantile(0.99, sum by (le, processor) (rate(fanout_record_attempt_duration_seconds_bucket[5m])))' 2

echo "---- pipeline /metrics (trimmed: no HELP/TYPE, no buckets, no zero gRPC series)"
grep -v '^#' "$tmp/pipeline.txt" | grep -v '_bucket' | grep -Ev '^grpc_server_(started_total|handling_seconds_(sum|count))\{.*\} 0(\.0)?$'
say "PASS"
