#!/usr/bin/env bash
# End to end: a fleet of real processes on separate network hosts, found by DNS.
#
# Builds a small network out of Linux network namespaces on one bridge
# (fo-br0, subnet 10.213.7.0/24; nothing is given an address outside the
# namespaces): fo-dns runs dnsmasq, fo-pipe the pipeline, fo-p1..fo-p3 one
# processor each (1 unit thread), fo-cli the client. The pipeline is given
# --processors dns:///procs.fanout.test:50052 and its namespace's own
# /etc/netns/fo-pipe/resolv.conf, so it looks the name up through the system
# resolver (getaddrinfo) every second. During a run of ~20 s:
#   - p3 is added to dnsmasq's hosts file (SIGHUP): it must join and get work;
#   - p2's link is cut (its bridge port set down), so it vanishes without
#     closing any connection: its in-flight records must be retried elsewhere.
# The run must succeed with every record exactly once. Prints a summary
# (per-processor counts, retries, wall time, timeline of join and cut).
#
# Needs root and `ip netns`; installs dnsmasq-base (and iproute2) with apt-get
# when missing. Builds the binaries (cargo build --release --bins) when the
# folder lacks them. Everything it creates is removed on exit, pass or fail.
# Usage: tests/e2e-fleet.sh [target/release]   (the folder holding the binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}

SUBNET=10.213.7.0/24
NET=10.213.7
BR=fo-br0
DNS_NAME=procs.fanout.test
PORT_PIPE=50051
PORT_PROC=50052
ROUNDS=500000          # digest rounds per unit (~25 ms per unit here)
UNITS=2                # units per record
TARGET_WALL=20         # seconds the main run should last (records sized from a warm-up run)
JOIN_SHARE=4           # p3 is added to DNS once 1/JOIN_SHARE of the records are done
RUN_LIMIT=120          # seconds the client may take at most

# namespace, last address byte
declare -A host_ip=([fo-dns]=2 [fo-cli]=5 [fo-pipe]=10 [fo-p1]=11 [fo-p2]=12 [fo-p3]=13)
namespaces=(fo-dns fo-cli fo-pipe fo-p1 fo-p2 fo-p3)
ip_of() { echo "$NET.${host_ip[$1]}"; }

say() { echo "e2e-fleet: $*"; }
die() { echo "e2e-fleet: FAIL: $*" >&2; exit 1; }

# ---- prerequisites --------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, a bridge, dnsmasq)"

apt_install() { # apt_install PACKAGE...: install, with `apt-get update` only when needed
  export DEBIAN_FRONTEND=noninteractive
  say "installing $* (apt-get)"
  apt-get install -y -q "$@" >/dev/null 2>&1 && return 0
  apt-get update -q >/dev/null 2>&1 || true
  apt-get install -y -q "$@" >/dev/null || die "cannot install $* with apt-get"
}
PATH="$PATH:/usr/sbin:/sbin"
command -v ip >/dev/null || apt_install iproute2
command -v dnsmasq >/dev/null || apt_install dnsmasq-base
command -v dnsmasq >/dev/null || die "dnsmasq not found after installing dnsmasq-base"
command -v python3 >/dev/null || apt_install python3
for tool in timeout flock getent; do command -v "$tool" >/dev/null || die "$tool not found"; done

for b in fanout fanout-pipeline fanout-processor; do
  if [ ! -x "$bin/$b" ]; then
    say "$bin/$b missing: cargo build --release --bins"
    if [ "$(basename "$bin")" = release ]; then
      CARGO_TARGET_DIR=$(dirname "$bin") cargo build --release --bins
    else
      cargo build --release --bins && bin=target/release
    fi
    break
  fi
done
bin=$(cd "$bin" && pwd)

# One run at a time on this machine (the names below are fixed).
exec 9>/tmp/fanout-e2e-fleet.lock
flock -w 150 9 || die "another e2e-fleet run holds /tmp/fanout-e2e-fleet.lock"

probe_ns=fo-probe-$$
if ! { ip netns add "$probe_ns" && ip netns exec "$probe_ns" ip link set lo up; } 2>/dev/null; then
  ip netns del "$probe_ns" 2>/dev/null || true
  die "network namespaces are not supported here (ip netns add/exec failed)"
fi
ip netns del "$probe_ns"

# ---- teardown (also of a run killed before its trap ran) ------------------
tmp=
pids=()
created_netns_dir=0
teardown() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 20); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
  for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  # A namespace outlives its name while orphaned TCP sockets in it still
  # retransmit (those to and from the cut p2), and its veth with it: delete
  # the root-side ends (and so their peers) explicitly.
  for ns in "${namespaces[@]}"; do ip link del "fo-${ns#fo-}-h" 2>/dev/null || true; done
  ip link del "$BR" 2>/dev/null || true
  for ns in "${namespaces[@]}"; do rm -rf "/etc/netns/$ns"; done
  [ "$created_netns_dir" -eq 1 ] && rmdir /etc/netns 2>/dev/null || true
  [ -n "$tmp" ] && rm -rf "$tmp"
  return 0
}
show_logs() {
  [ -n "$tmp" ] && [ -d "$tmp" ] || return 0
  local f
  for f in pipeline.err dnsmasq.log client.err p1.err p2.err p3.err; do
    [ -s "$tmp/$f" ] || continue
    echo "---- $f (last 60 lines)" >&2
    sed 's/\x1b\[[0-9;]*m//g' "$tmp/$f" | grep -v 'record started\|record done\|record finished\|joined=0 left=0' | tail -n 60 >&2 || true
  done
}
on_exit() {
  local rc=$?
  [ "$rc" -ne 0 ] && show_logs
  teardown
  exit "$rc"
}
# Leftovers of an earlier run that was killed (the lock says none is running).
for ns in "${namespaces[@]}"; do
  for p in $(ip netns pids "$ns" 2>/dev/null || true); do kill -KILL "$p" 2>/dev/null || true; done
done
teardown
trap on_exit EXIT
trap 'exit 130' INT TERM

# The test subnet must not overlap anything this host routes or owns.
python3 - "$SUBNET" <<'PY' || die "subnet $SUBNET overlaps an existing route or address (ip route); change SUBNET"
import ipaddress, subprocess, sys
test = ipaddress.ip_network(sys.argv[1])
out = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True, text=True).stdout
out += subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
for line in out.splitlines():
    for word in line.replace("inet ", "").split():
        if word[0].isdigit() and "." in word:
            try:
                net = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            if net.prefixlen > 0 and net.overlaps(test):
                print(f"overlap: {line.strip()}", file=sys.stderr)
                sys.exit(1)
PY

tmp=$(mktemp -d /tmp/fanout-e2e-fleet.XXXXXX)
chmod 755 "$tmp"

# ---- the network ----------------------------------------------------------
ip link add "$BR" type bridge
ip link set "$BR" type bridge nf_call_iptables 0 nf_call_ip6tables 0 2>/dev/null || true
ip link set "$BR" up
for ns in "${namespaces[@]}"; do
  host=${ns#fo-}-h                      # root-side end, e.g. p2-h -> fo-p2-h
  ip netns add "$ns"
  ip link add "fo-$host" type veth peer name eth0 netns "$ns"
  ip link set "fo-$host" master "$BR" up
  ip -n "$ns" addr add "$(ip_of "$ns")/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
done
[ -d /etc/netns ] || created_netns_dir=1
mkdir -p /etc/netns/fo-pipe
printf 'nameserver %s\noptions timeout:1 attempts:2\n' "$(ip_of fo-dns)" >/etc/netns/fo-pipe/resolv.conf

# ---- DNS ------------------------------------------------------------------
hosts=$tmp/hosts
write_hosts() { # write_hosts NS...: the processors DNS answers
  local ns
  : >"$hosts.new"
  for ns in "$@"; do echo "$(ip_of "$ns") $DNS_NAME" >>"$hosts.new"; done
  chmod 644 "$hosts.new"
  mv "$hosts.new" "$hosts"
}
write_hosts fo-p1 fo-p2
ip netns exec fo-dns dnsmasq --keep-in-foreground --conf-file=/dev/null --user=root \
  --port=53 --listen-address="$(ip_of fo-dns)" --bind-interfaces \
  --no-resolv --no-hosts --addn-hosts="$hosts" --local-ttl=1 --local=/fanout.test/ \
  --log-queries --log-facility=- >"$tmp/dnsmasq.log" 2>&1 &
dnsmasq_pid=$!
pids+=("$dnsmasq_pid")
resolved() { ip netns exec fo-pipe getent ahostsv4 "$DNS_NAME" 2>/dev/null | awk '$2 == "STREAM" {print $1}' | sort | xargs; }
for _ in $(seq 1 50); do
  [ "$(resolved)" = "$(ip_of fo-p1) $(ip_of fo-p2)" ] && break
  kill -0 "$dnsmasq_pid" 2>/dev/null || die "dnsmasq exited"
  sleep 0.1
done
[ "$(resolved)" = "$(ip_of fo-p1) $(ip_of fo-p2)" ] \
  || die "fo-pipe does not resolve $DNS_NAME through dnsmasq (got '$(resolved)')"
say "dnsmasq in fo-dns ($(ip_of fo-dns)): $DNS_NAME -> $(resolved)"

# ---- the services ---------------------------------------------------------
# start NS NAME LOG BINARY ARGS...: runs a binary in a namespace, waits (5 s
# at most) for its "listening on" line.
start() {
  local ns=$1 name=$2 log=$3
  ip netns exec "$ns" env RUST_LOG=info,fanout=debug "$bin/$4" "${@:5}" >"$tmp/$name.out" 2>"$tmp/$log" &
  pids+=($!)
  for _ in $(seq 1 50); do
    grep -q "listening on" "$tmp/$name.out" && { say "$(head -n 1 "$tmp/$name.out") (in $ns)"; return; }
    kill -0 "${pids[-1]}" 2>/dev/null || die "$name exited at start"
    sleep 0.1
  done
  die "$name printed no 'listening on' line within 5 s"
}
for p in p1 p2 p3; do
  start "fo-$p" "$p" "$p.err" fanout-processor --listen "0.0.0.0:$PORT_PROC" --unit-threads 1 --name "$p"
done
start fo-pipe pipeline pipeline.err fanout-pipeline --listen "0.0.0.0:$PORT_PIPE" \
  --processors "dns:///$DNS_NAME:$PORT_PROC" --resolve-interval 1s

plog() { sed 's/\x1b\[[0-9;]*m//g' "$tmp/pipeline.err"; }
for _ in $(seq 1 100); do
  [ "$(plog | grep -c 'processor is up')" -ge 2 ] && break
  sleep 0.1
done
[ "$(plog | grep -c 'processor is up')" -ge 2 ] || die "the pipeline did not see p1 and p2 up within 10 s"
say "pipeline sees: $(plog | grep 'processor is up' | grep -o 'processor=[0-9.:]*' | xargs)"

pipeline_url=http://$(ip_of fo-pipe):$PORT_PIPE
# The client, from fo-cli (the pid of `ip netns exec` is the client's own: it execs).
client=(ip netns exec fo-cli timeout "$RUN_LIMIT" "$bin/fanout" run --pipeline "$pipeline_url"
  --params "{\"rounds\": $ROUNDS}" --max-in-flight 64 --quiet)

# ---- warm-up: sizes the main run to last about TARGET_WALL s --------------
python3 -c "import json
for i in range(32): print(json.dumps({'id': 'warm-%02d' % i, 'attributes': {'units': $UNITS}}))" >"$tmp/warm.ndjson"
t=$(date +%s.%N)
"${client[@]}" "$tmp/warm.ndjson" >"$tmp/warm.json" 2>"$tmp/client.err" || die "warm-up run failed (exit $?)"
warm=$(python3 -c "print($(date +%s.%N) - $t)")
records=$(python3 -c "print(max(150, min(4000, round($TARGET_WALL * 32 / $warm))))")
say "warm-up: 32 records in ${warm:0:5} s over p1+p2; main run: $records records x $UNITS units, rounds $ROUNDS"

python3 -c "import json
for i in range($records): print(json.dumps({'id': 'rec-%05d' % i, 'attributes': {'units': $UNITS}}))" >"$tmp/records.ndjson"

# ---- the main run, with a join and a cut ----------------------------------
t0=$(date +%s.%N)
"${client[@]}" --output "$tmp/results.ndjson" "$tmp/records.ndjson" >"$tmp/report.json" 2>"$tmp/client.err" &
client_pid=$!
pids+=("$client_pid")

# Events follow the run's own progress (its --output file, one line per
# finished record), not the clock: p3 joins once a quarter of the records are
# done, and p2's link is cut once p3 has finished records of its own and p2
# still has work in flight (some records remain).
done_count() { if [ -f "$tmp/results.ndjson" ]; then wc -l <"$tmp/results.ndjson"; else echo 0; fi; }
done_on() { if [ -f "$tmp/results.ndjson" ]; then grep -c "\"processor\":\"$1:" "$tmp/results.ndjson" || true; else echo 0; fi; }
wait_for() { # wait_for WHAT CONDITION...: polls until CONDITION holds, bounded by RUN_LIMIT
  local what=$1 deadline=$(( $(date +%s) + RUN_LIMIT )); shift
  until "$@"; do
    kill -0 "$client_pid" 2>/dev/null || die "the run ended before $what"
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out waiting for $what"
    sleep 0.1
  done
}
quarter_done() { [ "$(done_count)" -ge $(( records / JOIN_SHARE )) ]; }
p3_working() { [ "$(done_on "$(ip_of fo-p3)")" -ge 5 ]; }

wait_for "a quarter of the records" quarter_done
write_hosts fo-p1 fo-p2 fo-p3
kill -HUP "$dnsmasq_pid"
t_join=$(date +%s.%N)
say "+$(python3 -c "print(round($t_join - $t0, 1))")s: $(done_count) records done; p3 ($(ip_of fo-p3)) added to DNS (SIGHUP dnsmasq)"

wait_for "p3 to finish records" p3_working
[ "$(done_count)" -lt "$records" ] || die "the run finished before p2's link could be cut"
ip link set fo-p2-h down
t_cut=$(date +%s.%N)
say "+$(python3 -c "print(round($t_cut - $t0, 1))")s: $(done_count) records done, $(done_on "$(ip_of fo-p3)") on p3; p2's link cut (fo-p2-h down; p2 keeps running, its connections stay open)"

rc=0
wait "$client_pid" || rc=$?
t_end=$(date +%s.%N)
[ "$rc" -ne 124 ] || die "the client did not finish within $RUN_LIMIT s"
[ -s "$tmp/report.json" ] || die "the client printed no report (exit $rc)"

# ---- checks and summary ---------------------------------------------------
for p in p1 p2 p3; do sed 's/\x1b\[[0-9;]*m//g' "$tmp/$p.err" >"$tmp/$p.log"; done
plog >"$tmp/pipeline.log"
python3 - "$tmp" "$records" "$rc" "$t0" "$t_join" "$t_cut" "$t_end" "$(ip_of fo-p2)" "$(ip_of fo-p3)" <<'PY'
import collections, datetime, json, re, sys

tmp, records, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0, t_join, t_cut, t_end = map(float, sys.argv[4:8])
ip_p2, ip_p3 = sys.argv[8], sys.argv[9]
rep = json.load(open(f"{tmp}/report.json"))
# fanout run streams (RunStream): the report carries failures only; every
# result is in the --output file, one JSON object per line.
results = [json.loads(l) for l in open(f"{tmp}/results.ndjson") if l.strip()]
summary = rep.get("summary", {})
failures = []
def check(ok, what):
    if not ok:
        failures.append(what)

def stamp(line):  # tracing's RFC 3339 UTC timestamp -> seconds after t0
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z", line)
    if not m:
        return None
    s = m.group(1)
    if "." in s:
        head, frac = s.split(".")
        s = f"{head}.{frac[:6]}"
    fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in s else "%Y-%m-%dT%H:%M:%S"
    dt = datetime.datetime.strptime(s, fmt).replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp() - t0

def first(path, *needles):
    for line in open(path, errors="replace"):
        if all(n in line for n in needles):
            return stamp(line), line.strip()
    return None, None

def at(x):
    return "never" if x is None else f"+{x:5.2f}s"

per = collections.Counter(r.get("processor", "?") for r in results)
ids = collections.Counter(r.get("record_id") for r in results)
retried = [r for r in results if r.get("attempts", 0) >= 2]
p2_after_retry = [r["record_id"] for r in retried if r.get("processor", "").startswith(ip_p2 + ":")]
on_p3 = sum(n for p, n in per.items() if p.startswith(ip_p3 + ":"))

check(rc == 0, f"client exit {rc} (0 only when SUCCEEDED)")
check(rep.get("status") == "RUN_STATUS_SUCCEEDED", f"status {rep.get('status')}")
check(summary.get("records_failed", -1) == 0, f"records_failed {summary.get('records_failed')}")
check(len(results) == records, f"{len(results)} results for {records} records")
check(set(ids) == {f"rec-{i:05d}" for i in range(records)} and all(n == 1 for n in ids.values()),
      "not every record exactly once: " + str([i for i, n in ids.items() if n != 1][:5]))
check(all(r.get("status") == "RECORD_STATUS_SUCCEEDED" for r in results), "a record did not succeed")
check(on_p3 > 0, "p3 did no record after joining through DNS")
check(summary.get("retries", 0) > 0, "no retry: p2 had nothing in flight when its link was cut (run too short?)")
check(not p2_after_retry, f"retried records ended on the cut p2: {p2_after_retry[:5]}")

lost, lost_line = first(f"{tmp}/pipeline.log", "processor is down", f"processor={ip_p2}:")
joined, _ = first(f"{tmp}/pipeline.log", "processor joined", f"processor={ip_p3}:")
p3_up, _ = first(f"{tmp}/pipeline.log", "processor is up", f"processor={ip_p3}:")
p3_first, _ = first(f"{tmp}/p3.log", "record started", "rec-")
retry_first, _ = first(f"{tmp}/pipeline.log", "attempt failed; retrying", f"processor={ip_p2}:")
wall = rep.get("elapsed", "?")

print("---- e2e fleet summary")
print(f"run        {rep.get('run_id')}  {rep.get('status')}  client exit {rc}")
print(f"records    {len(results)} ({summary.get('records_succeeded')} succeeded, {summary.get('records_failed')} failed), "
      f"{summary.get('total_units_processed')} units, each id once: {all(n == 1 for n in ids.values())}")
print(f"wall       {wall} (pipeline), {t_end - t0:.2f}s (client process)")
print(f"retries    {summary.get('retries')}; records with attempts >= 2: {len(retried)}, "
      f"by final processor: {dict(collections.Counter(r['processor'] for r in retried))}")
print("records per processor (the one that finished each):")
for p, n in sorted(per.items()):
    print(f"  {p:28s} {n:5d}")
print("timeline (seconds after the run started):")
print(f"  {at(t_join - t0)}  p3 added to the hosts file, dnsmasq SIGHUP")
print(f"  {at(joined)}  pipeline: p3 joined (resolved), probing")
print(f"  {at(p3_up)}  pipeline: p3 up")
print(f"  {at(p3_first)}  p3: first record started")
print(f"  {at(t_cut - t0)}  p2's link cut")
print(f"  {at(lost)}  pipeline: p2 down{'' if not lost_line else ' (' + lost_line.split('reason=')[-1][:90] + ')'}")
print(f"  {at(retry_first)}  pipeline: first record retried away from p2")
print(f"  {at(t_end - t0)}  client finished")
if failures:
    print("FAILED checks:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print("e2e fleet: all checks passed")
PY
