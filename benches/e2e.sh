#!/usr/bin/env bash
# End-to-end benchmark of embedded mode against the I/O floor.
#
#   benches/e2e.sh [DIR] [RUNS]
#
# Writes a synthetic set into DIR (default /tmp/mergefleet-bench; kept for later runs):
# base + 3 fine-tunes, bfloat16, hidden 2048, 8 layers, intermediate 5632, vocab 32000
# (about 1 GB each). Then, with the inputs in the page cache, prints the time to read them
# (cat > /dev/null), the time to write a file of the output's size, and for each of RUNS
# merges its wall time, input GB/s and peak RSS, and the ratio to read + write; the same
# merges again with float16 as the working dtype (`dtype: float16`), side by side; then the
# same set block-FP8 (DIR-fp8, written once) merged into bfloat16 and into FP8
# (`--quantize fp8`), with their throughput per output element relative to bfloat16's.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/mergefleet-bench}
RUNS=${2:-3}
cargo build --release -q --bin mergefleet --example synth
BIN=target/release/mergefleet
[ -f "$DIR/model_stock.yml" ] || target/release/examples/synth "$DIR" >/dev/null
INPUTS=("$DIR"/base/*.safetensors "$DIR"/ft1/*.safetensors "$DIR"/ft2/*.safetensors "$DIR"/ft3/*.safetensors)
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
now() { date +%s.%N; }
in_bytes=$(cat "${INPUTS[@]}" | wc -c)   # also warms the page cache
t0=$(now); cat "${INPUTS[@]}" > /dev/null; t1=$(now)
read_s=$(calc "$t1 - $t0")
OUT="$DIR/out"
rm -rf "$OUT"
"$BIN" merge "$DIR/model_stock.yml" "$OUT" -q >/dev/null
out_bytes=$(cat "$OUT"/*.safetensors | wc -c)
sync
t0=$(now); head -c "$out_bytes" /dev/zero > "$DIR/zero.bin"; t1=$(now)
write_s=$(calc "$t1 - $t0")
rm -f "$DIR/zero.bin"
floor=$(calc "$read_s + $write_s")
echo "input $(calc "$in_bytes/1e9") GB, output $(calc "$out_bytes/1e9") GB, $(nproc) cores"
echo "read inputs (warm cache): $read_s s   write output: $write_s s   floor (read + write): $floor s"
sed 's/^dtype: .*/dtype: float16/' "$DIR/model_stock.yml" > "$DIR/model_stock_f16.yml"
for cfg in model_stock.yml model_stock_f16.yml; do
  dtype=$(sed -n 's/^dtype: //p' "$DIR/$cfg")
  for i in $(seq "$RUNS"); do
    sync
    line=$("$BIN" merge "$DIR/$cfg" "$OUT" -q --overwrite)
    wall=$(echo "$line" | sed -E 's/.* in ([0-9.]+) s .*/\1/')
    rss=$(echo "$line" | sed -E 's/.*peak RSS (.*)$/\1/')
    echo "$dtype merge run $i: $wall s, $(calc "$in_bytes/$wall/1e9") GB/s of input, peak RSS $rss, $(calc "$wall/$floor")x the floor"
  done
done
# Block FP8: the same models quantized (every *_proj.weight F8_E4M3 + 128x128 scales).
# bfloat16, FP8 -> bfloat16 and FP8 -> FP8 runs interleave (this VM's speed drifts), and
# the ratios compare medians: throughput per output element relative to bfloat16's.
FP8="$DIR-fp8"
[ -f "$FP8/model_stock.yml" ] || target/release/examples/synth "$FP8" --fp8 >/dev/null
cat "$FP8"/*/*.safetensors > /dev/null   # warm the page cache
wall_of() { "$BIN" merge "$@" "$OUT" -q --overwrite | sed -E 's/.* in ([0-9.]+) s .*/\1/'; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
: > "$DIR/bf16.t"; : > "$DIR/fp8.t"; : > "$DIR/fp8q.t"
for i in $(seq "$RUNS"); do
  sync; wall_of "$DIR/model_stock.yml" >> "$DIR/bf16.t"
  sync; wall_of "$FP8/model_stock.yml" >> "$DIR/fp8.t"
  sync; wall_of "$FP8/model_stock.yml" --quantize fp8 >> "$DIR/fp8q.t"
done
b=$(median < "$DIR/bf16.t"); f=$(median < "$DIR/fp8.t"); q=$(median < "$DIR/fp8q.t")
echo "bfloat16 inputs:            runs $(paste -sd' ' "$DIR/bf16.t") s, median $b s"
echo "fp8 inputs, bfloat16 out:   runs $(paste -sd' ' "$DIR/fp8.t") s, median $f s, $(calc "$b/$f")x bfloat16's throughput per output element"
echo "fp8 inputs, --quantize fp8: runs $(paste -sd' ' "$DIR/fp8q.t") s, median $q s, $(calc "$b/$q")x"
rm -f "$DIR/bf16.t" "$DIR/fp8.t" "$DIR/fp8q.t"
