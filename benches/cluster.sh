#!/usr/bin/env bash
# Cluster-mode benchmark: one coordinator and 1, 2 and 4 workers on this machine, inputs
# from the local store (the page cache), output to a local directory.
#
#   benches/cluster.sh [DIR] [WORKER_COUNTS]
#
# Uses the synthetic set of benches/e2e.sh (written into DIR if missing). For each worker
# count prints the wall time, GB/s of input, the coordinator's own CPU seconds and the
# time from the last task's report to the committed checkpoint. MERGEFLEET_BIN runs another
# build of the binary (to compare two builds, interleaved). Needs /usr/bin/time
# (Debian package `time`).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/mergefleet-bench}
COUNTS=${2:-"1 2 4"}
cargo build --release -q --bin mergefleet --example synth
BIN=${MERGEFLEET_BIN:-$PWD/target/release/mergefleet}
[ -f "$DIR/model_stock.yml" ] || target/release/examples/synth "$DIR" >/dev/null
in_bytes=$(cat "$DIR"/base/*.safetensors "$DIR"/ft?/*.safetensors | wc -c)   # warms the cache
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
cores=$(nproc)
echo "input $(calc "$in_bytes/1e9") GB, $cores cores"
for n in $COUNTS; do
  out="$DIR/cluster-out-$n"
  rm -rf "$out"
  port=$((7400 + n))
  threads=$(( cores / n )); [ "$threads" -ge 1 ] || threads=1
  sync
  start=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o "$DIR/coord-time-$n" \
    "$BIN" coordinator "$DIR/model_stock.yml" "$out" --listen "127.0.0.1:$port" --insecure --linger 2s \
    > "$DIR/coord-$n.out" 2> "$DIR/coord-$n.log" &
  coord=$!
  for i in $(seq "$n"); do
    RUST_LOG=warn "$BIN" worker --coordinator "http://127.0.0.1:$port" --name "w$i" --threads "$threads" \
      > /dev/null 2> "$DIR/worker-$n-$i.log" &
  done
  wait "$coord"
  end=$(date +%s.%N)
  wait
  wall=$(calc "$end - $start")
  read -r user sys < "$DIR/coord-time-$n"
  commit=$(sed -E 's/.*; ([0-9.]+) s from the last task.*/\1/' "$DIR/coord-$n.out")
  echo "workers $n (threads $threads each): $wall s, $(calc "$in_bytes/$wall/1e9") GB/s of input; coordinator CPU $(calc "$user + $sys") s; last task -> commit $commit s"
  rm -rf "$out"
done
