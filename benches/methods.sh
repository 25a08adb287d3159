#!/usr/bin/env bash
# Every merge method on one real-size set, against the read floor.
#
#   benches/methods.sh [DIR] [RUNS]
#
# Writes the real-size synthetic set into DIR (default /tmp/mergefleet-methods; kept for
# later runs): base + 3 fine-tunes, bfloat16, hidden 2048, 1 layer, intermediate 5632,
# vocab 32000 (65.5M-element embeddings and head; 356 MB a model, 1.4 GB read). Then, for
# each method (with typical parameters, `dtype: bfloat16`, `--random-seed 0`), RUNS merges
# from the page cache, printing the median wall time, the read floor (`cat` of the inputs to
# /dev/null) and peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/mergefleet-methods}
RUNS=${2:-3}
cargo build --release -q --bin mergefleet --example synth
BIN=target/release/mergefleet
OUT=$(mktemp -d)   # the merges' output: never beside the user's DIR
trap 'rm -rf "$OUT"' EXIT
[ -f "$DIR/model_stock.yml" ] || target/release/examples/synth "$DIR" --layers 1 >/dev/null
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
. benches/methods.lib.sh
s=$(date +%s.%N); cat "$DIR"/*/model.safetensors >/dev/null; e=$(date +%s.%N)
echo "read floor: $(awk "BEGIN { printf \"%.2f\", $e - $s }") s for $(du -shc "$DIR"/*/model.safetensors | tail -1 | cut -f1)"
printf '%-16s %8s %10s\n' method median_s peak_rss
for spec in "${METHOD_SPECS[@]}"; do
  method=${spec%%|*}
  cfg=$(mktemp --suffix .yml); method_config "$DIR" "$spec" > "$cfg"
  times=(); rss=""
  for _ in $(seq "$RUNS"); do
    line=$("$BIN" merge "$cfg" "$OUT/merged" --overwrite --random-seed 0 2>/dev/null | grep merged)
    times+=("$(sed 's/.* in \([0-9.]*\) s.*/\1/' <<<"$line")")
    rss=$(sed 's/.*peak RSS //' <<<"$line")
  done
  printf '%-16s %8s %10s\n' "$method" "$(printf '%s\n' "${times[@]}" | median)" "$rss"
  rm -f "$cfg"
done
