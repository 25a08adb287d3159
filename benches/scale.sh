#!/usr/bin/env bash
# 671B-class scale benchmark: plan time and memory, coordinator memory, task message sizes.
#
#   benches/scale.sh [DIR] [RUNS]
#
# Writes a DeepSeek-V3-class set into DIR (default /tmp/mergefleet-671b; kept): base + 2
# fine-tunes, 91,991 tensors in 163 files each, as sparse files (about 60 MB on disk for
# 4.1 TB of apparent size). Then prints, with the release build:
#   - `mergefleet plan`: wall time and peak RSS (RUNS times; targets: < 2 s, < 500 MB);
#   - the coordinator: peak RSS once it has planned, prepared the 275 output files
#     (sparse) and is serving, and its `status` answer;
#   - the largest and mean task message (from the scale test, which asserts a bound);
#   - a 120B-class frankenmerge (DIR-frankenmerge: two Llama-2-70B-layout models, sparse, and
#     Goliath-120B's passthrough stack of them): `plan` wall time and peak RSS, and what it
#     reads and writes;
#   - the control plane under load (examples/fleet_load.rs): a real coordinator and WORKERS
#     (default 256) simulated workers over gRPC on loopback that lease, heartbeat and report
#     every task without moving data: completions per second, the coordinator's CPU seconds
#     and peak RSS over the whole run, journal size and save times, last report to commit.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/mergefleet-671b}
RUNS=${2:-3}
cargo build --release -q --bin mergefleet --example synth --example fleet_load
BIN=target/release/mergefleet
[ -f "$DIR/model_stock.yml" ] || target/release/examples/synth "$DIR" --deepseek-sparse --fine-tunes 2 >/dev/null
echo "set: $(du -sh "$DIR" | cut -f1) on disk, $(du -sh --apparent-size "$DIR" | cut -f1) apparent"

for i in $(seq "$RUNS"); do
  /usr/bin/time -f "plan: %e s wall, %M KB peak RSS" "$BIN" plan "$DIR/model_stock.yml" 2>&1 >/dev/null | tail -1
done
"$BIN" plan "$DIR/model_stock.yml" | grep -E "^(tensors|tasks|bytes)"

FM="$DIR-frankenmerge"
[ -f "$FM/frankenmerge.yml" ] || target/release/examples/synth "$FM" --frankenmerge-sparse >/dev/null
for i in $(seq "$RUNS"); do
  /usr/bin/time -f "frankenmerge plan: %e s wall, %M KB peak RSS" "$BIN" plan "$FM/frankenmerge.yml" 2>&1 >/dev/null | tail -1
done
"$BIN" plan "$FM/frankenmerge.yml" | grep -E "^(tensors|tasks|bytes|output file model-00001)|slice 8"

OUT="$DIR/out"
rm -rf "$OUT"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
LOG="$DIR/coordinator.log"
t0=$(date +%s.%N)
"$BIN" coordinator "$DIR/model_stock.yml" "$OUT" --listen "127.0.0.1:$PORT" --insecure >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$OUT"' EXIT
until grep -q "coordinator listening" "$LOG"; do
  kill -0 $PID 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.05
done
t1=$(date +%s.%N)
echo "coordinator: serving after $(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }") s; $(grep -E 'VmHWM|VmRSS' /proc/$PID/status | tr -s ' \n' ' ')"
"$BIN" status --coordinator "http://127.0.0.1:$PORT" | head -4
kill -TERM $PID; wait $PID || true

cargo test -q --test tests -- scale::plan_671b_class_layout --nocapture 2>/dev/null | grep "task messages"

rm -rf "$DIR/load-out"   # this script's own scratch output, left by an interrupted run
target/release/examples/fleet_load "$BIN" "$DIR/model_stock.yml" "$DIR/load-out" --workers "${WORKERS:-256}"
