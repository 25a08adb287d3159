#!/usr/bin/env bash
# End-to-end benchmark of embedded mode against the I/O floor.
#
#   benches/e2e.sh [DIR] [RUNS] [all|methods]
#
# Writes a synthetic set into DIR (default /tmp/mergefleet-bench; kept for later runs):
# base + 3 fine-tunes, bfloat16, hidden 2048, 8 layers, intermediate 5632, vocab 32000
# (about 1 GB each), and the same set in float16 (DIR-f16: the same shapes and bytes,
# merged with `dtype: float16`). Then RUNS times, for each set: the floor (the time to
# write a file of the output's size, plus the time to read the inputs, `cat > /dev/null`,
# from the page cache), measured right before the merge since this VM's speed drifts from
# minute to minute, then the merge. Prints each run, then the medians: merge over floor per
# dtype (the floor's write alone swings 2x here, so one run's ratio says little), and
# float16's time per byte relative to bfloat16's. Then the set block-FP8 (DIR-fp8, written
# once) merged into bfloat16 and into FP8 (`--quantize fp8`), with their throughput per
# output element relative to bfloat16's. Then every merge method on the bfloat16 set
# (benches/methods.lib.sh: typical parameters, `--random-seed 0`), RUNS merges each right
# after its floor, and the medians; with MERGEKIT_RUN=path/to/run_mergekit.sh also
# mergekit's time for each (one run, `-j 1`); METHODS="slerp ties" runs only those. `methods` as the third argument runs only
# that part.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/mergefleet-bench}
RUNS=${2:-5}
PART=${3:-all}
cargo build --release -q --bin mergefleet --example synth
BIN=target/release/mergefleet
[ -f "$DIR/model_stock.yml" ] || target/release/examples/synth "$DIR" >/dev/null
[ -f "$DIR-f16/model_stock.yml" ] || target/release/examples/synth "$DIR-f16" --f16 >/dev/null
# The input files of the set in $1, into SET.
# inputs DIR [MODEL ...]: SET = the weight files of those models of set DIR (default: all).
inputs() {
  local d=$1 m; shift
  SET=()
  for m in "${@:-base ft1 ft2 ft3}"; do for m in $m; do SET+=("$d/$m"/*.safetensors); done; done
}
inputs "$DIR"; INPUTS=("${SET[@]}")
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
in_bytes=$(cat "${INPUTS[@]}" | wc -c)   # also warms the page cache
inputs "$DIR-f16"; cat "${SET[@]}" > /dev/null
OUT="$DIR/out"
rm -rf "$OUT"
"$BIN" merge "$DIR/model_stock.yml" "$OUT" -q >/dev/null
out_bytes=$(cat "$OUT"/*.safetensors | wc -c)
echo "input $(calc "$in_bytes/1e9") GB, output $(calc "$out_bytes/1e9") GB, $(nproc) cores"
# The floor now for set $1 (models $2..., default all): write the output's bytes once, then
# read every input from the page cache. The inputs are read twice and the second read timed:
# the first brings back pages this VM paged out while they were idle, and both warm the set
# for the merge.
floor() {
  sync
  local t0 t1 t2 t3
  inputs "$@"
  t0=$(now); head -c "$out_bytes" /dev/zero > "$DIR/zero.bin"; t1=$(now)
  rm -f "$DIR/zero.bin"
  sync
  cat "${SET[@]}" > /dev/null; t2=$(now)
  cat "${SET[@]}" > /dev/null; t3=$(now)
  echo "$(calc "$t3 - $t2") $(calc "$t1 - $t0")"
}
if [ "$PART" = all ]; then
: > "$DIR/floor.bfloat16"; : > "$DIR/floor.float16"; : > "$DIR/wall.bfloat16"; : > "$DIR/wall.float16"
for i in $(seq "$RUNS"); do
  for set in "$DIR" "$DIR-f16"; do
    dtype=$(sed -n 's/^dtype: //p' "$set/model_stock.yml")
    read -r read_s write_s < <(floor "$set")
    fl=$(calc "$read_s + $write_s")
    sync
    line=$("$BIN" merge "$set/model_stock.yml" "$OUT" -q --overwrite)
    wall=$(echo "$line" | sed -E 's/.* in ([0-9.]+) s .*/\1/')
    rss=$(echo "$line" | sed -E 's/.*peak RSS (.*)$/\1/')
    echo "$wall" >> "$DIR/wall.$dtype"
    echo "$fl" >> "$DIR/floor.$dtype"
    echo "run $i $dtype: floor $fl s (read $read_s + write $write_s), merge $wall s, $(calc "$in_bytes/$wall/1e9") GB/s of input, peak RSS $rss, $(calc "$wall/$fl")x the floor"
  done
done
for dtype in bfloat16 float16; do
  w=$(median < "$DIR/wall.$dtype"); f=$(median < "$DIR/floor.$dtype")
  echo "$dtype: median merge $w s ($(calc "$in_bytes/$w/1e9") GB/s of input), median floor $f s: $(calc "$w/$f")x the floor"
done
echo "float16 time per byte relative to bfloat16: $(calc "$(median < "$DIR/wall.float16")/$(median < "$DIR/wall.bfloat16")")x (medians)"
rm -f "$DIR"/floor.* "$DIR"/wall.*
# Block FP8: the same models quantized (every *_proj.weight F8_E4M3 + 128x128 scales).
# bfloat16, FP8 -> bfloat16 and FP8 -> FP8 runs interleave (this VM's speed drifts), and
# the ratios compare medians: throughput per output element relative to bfloat16's.
FP8="$DIR-fp8"
[ -f "$FP8/model_stock.yml" ] || target/release/examples/synth "$FP8" --fp8 >/dev/null
cat "$FP8"/*/*.safetensors > /dev/null   # warm the page cache
wall_of() { "$BIN" merge "$@" "$OUT" -q --overwrite | sed -E 's/.* in ([0-9.]+) s .*/\1/'; }
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
fi

# Every method on the bfloat16 set. A first merge warms the set and sizes the floor's
# write (ram and ramplus_tl write float32).
. benches/methods.lib.sh
printf '%-16s %9s %9s %7s %10s %12s\n' method merge_s floor_s ratio peak_rss mergekit_s
for spec in "${METHOD_SPECS[@]}"; do
  method=${spec%%|*}
  case " ${METHODS:-$method} " in *" $method "*) ;; *) continue ;; esac
  cfg="$DIR/method.yml"; method_config "$DIR" "$spec" > "$cfg"
  "$BIN" merge "$cfg" "$OUT" -q --overwrite --random-seed 0 >/dev/null
  out_bytes=$(cat "$OUT"/*.safetensors | wc -c)
  : > "$DIR/m.wall"; : > "$DIR/m.floor"; rss=""
  for i in $(seq "$RUNS"); do
    # shellcheck disable=SC2046  # the models read, one word each
    read -r read_s write_s < <(floor "$DIR" $(method_models "$spec"))
    calc "$read_s + $write_s" >> "$DIR/m.floor"; echo >> "$DIR/m.floor"
    sync
    line=$("$BIN" merge "$cfg" "$OUT" -q --overwrite --random-seed 0)
    echo "$line" | sed -E 's/.* in ([0-9.]+) s .*/\1/' >> "$DIR/m.wall"
    rss=$(echo "$line" | sed -E 's/.*peak RSS (.*)$/\1/')
  done
  mk="-"
  if [ -n "${MERGEKIT_RUN:-}" ]; then
    method_config "$DIR" "$spec" . > "$DIR/mergekit.yml"
    t0=$(now)
    MK_CWD="$DIR" "$MERGEKIT_RUN" "$DIR/mergekit.yml" "$DIR/mergekit-out" >/dev/null 2>&1 && mk=$(calc "$(now) - $t0")
    rm -rf "$DIR/mergekit-out" "$DIR/mergekit.yml"
  fi
  w=$(median < "$DIR/m.wall"); f=$(median < "$DIR/m.floor")
  printf '%-16s %9s %9s %6sx %10s %12s\n' "$method" "$w" "$f" "$(calc "$w/$f")" "$rss" "$mk"
done
rm -f "$DIR/m.wall" "$DIR/m.floor" "$cfg"
