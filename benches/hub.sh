#!/usr/bin/env bash
# Reading models from the Hugging Face Hub, measured against a Hub-shaped nginx
# (tests/hub/nginx.conf.template) on its own host (network namespaces, benches/netns.sh).
#
#   sudo benches/hub.sh [PLAN_RUNS] [HOST_MBIT]
#
# 1. plan: the 671B-class set of benches/scale.sh (base + 2 fine-tunes, 163 files each, kept
#    in /tmp/mergefleet-671b) served as three Hub repos, with 50 ms added to every round trip
#    (by examples/pacing_proxy.rs in front of the Hub: these sandboxes have no tc netem). Prints the wall time of `mergefleet plan` PLAN_RUNS times
#    (default 3; target: under 5 s: headers and indexes are read concurrently).
# 2. one worker: the fleet benchmark's set (benches/fleet.sh, kept in /tmp/mergefleet-fleet)
#    served as Hub repos behind the fleet's per-connection pacing proxy (1/16 of the link
#    per connection, as a cloud store or CDN caps them), the worker host's link capped at
#    HOST_MBIT (default 100): prints the worker's input throughput as a share of its link
#    (target: 80% or more, as from S3).
# Needs root, iproute2, tc, nginx and s3s-fs (the output goes to S3 on the Hub host).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
RUNS=${1:-3}
MBIT=${2:-100}
ID=mfhub
BIG=/tmp/mergefleet-671b
FLEET=/tmp/mergefleet-fleet
WORK=/tmp/mergefleet-hub
cargo build --release -q --bin mergefleet --example synth --example pacing_proxy
BIN=$PWD/target/release/mergefleet
PROXY=$PWD/target/release/examples/pacing_proxy
S3S=${S3S_FS:-$(command -v s3s-fs || echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs")}
[ -f "$BIG/model_stock.yml" ] || target/release/examples/synth "$BIG" --deepseek-sparse --fine-tunes 2 >/dev/null
if [ ! -f "$FLEET/s3/models/set/model_stock.yml" ]; then
  rm -rf "$FLEET" && target/release/examples/synth "$FLEET/set" --hidden 1024 --layers 8 \
    --intermediate 2816 --vocab 8192 >/dev/null
  mkdir -p "$FLEET/s3/models" && mv "$FLEET/set" "$FLEET/s3/models/set"
fi
SET=$FLEET/s3/models/set

# The Hub trees live beside their sources (hard links need one filesystem).
rm -rf "$BIG/hub" "$SET/../hub"
python3 benches/hub_tree.py "$BIG/hub" big/base="$BIG/base" big/ft1="$BIG/ft1" big/ft2="$BIG/ft2"
python3 benches/hub_tree.py "$SET/../hub" fleet/base="$SET/base" fleet/ft1="$SET/ft1" \
  fleet/ft2="$SET/ft2" fleet/ft3="$SET/ft3"
rm -rf "$WORK" && mkdir -p "$WORK/big" "$WORK/fleet"
render() { # ROOT PORT CDN_PORT PREFIX
  sed "s#@ROOT@#$1#g; s#@PORT@#$2#g; s#@CDN_PORT@#$3#g; s#@TOKEN@#bench-token#g" \
    tests/hub/nginx.conf.template > "$4/nginx.conf"
  # The benchmark host's address, not loopback.
  sed -i "s#listen 127.0.0.1:#listen 10.77.0.2:#g" "$4/nginx.conf"
}
render "$BIG/hub" 9000 9010 "$WORK/big"
render "$(cd "$SET/../hub" && pwd)" 9002 9012 "$WORK/fleet"
printf 'models:\n  - model: big/ft1\n  - model: big/ft2\nmerge_method: model_stock\nbase_model: big/base\ndtype: bfloat16\n' > "$WORK/big.yml"
printf 'models:\n  - model: fleet/ft1\n  - model: fleet/ft2\n  - model: fleet/ft3\nmerge_method: model_stock\nbase_model: fleet/base\ndtype: bfloat16\n' > "$WORK/fleet.yml"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  benches/netns.sh down $ID
}
trap cleanup EXIT
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
benches/netns.sh up $ID 1 "$MBIT"
ip netns exec $ID-s3 nginx -e stderr -p "$WORK/big" -c "$WORK/big/nginx.conf" &
PIDS+=($!)
ip netns exec $ID-s3 nginx -e stderr -p "$WORK/fleet" -c "$WORK/fleet/nginx.conf" &
PIDS+=($!)
# 50 ms more on every round trip, no rate cap: the proxy on 9004 in front of the big Hub.
ip netns exec $ID-s3 "$PROXY" 10.77.0.2:9004 10.77.0.2:9000 100000000000 50 >/dev/null 2>&1 &
PIDS+=($!)
sleep 0.5
export HF_HUB_CACHE=$WORK/no-cache HF_HOME=$WORK/no-home HF_TOKEN=
probe=$(ip netns exec $ID-co curl -s -o /dev/null -w '%{time_total}' \
  http://10.77.0.2:9004/api/models/big/base/revision/main)
echo "plan of 3 x 163 files (91,991 tensors each) from the Hub; one request on a new connection: $probe s:"
for i in $(seq "$RUNS"); do
  t0=$(date +%s.%N)
  ip netns exec $ID-co env HF_ENDPOINT=http://10.77.0.2:9004 "$BIN" plan "$WORK/big.yml" >/dev/null
  echo "  run $i: $(calc "$(date +%s.%N) - $t0") s"
done

# One worker reading the fleet set from the Hub through per-connection pacing.
cap_bytes=$((MBIT * 1000 * 1000 / 8))
conn_bytes=$((cap_bytes / 16))
mkdir -p "$WORK/s3/merged"
ip netns exec $ID-s3 "$S3S" --host 10.77.0.2 --port 9001 --access-key hub --secret-key hub-secret \
  "$WORK/s3" >/dev/null 2>&1 &
PIDS+=($!)
# nginx listens on 10.77.0.2:9002; the proxy takes 10.77.0.2:9003 and paces each connection.
ip netns exec $ID-s3 "$PROXY" 10.77.0.2:9003 10.77.0.2:9002 "$conn_bytes" >/dev/null 2>&1 &
PIDS+=($!)
sleep 0.5
export MERGEFLEET_TOKEN=hub-bench-token-0123456789 HF_ENDPOINT=http://10.77.0.2:9003 \
  AWS_ENDPOINT=http://10.77.0.2:9001 AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=hub AWS_SECRET_ACCESS_KEY=hub-secret AWS_EC2_METADATA_DISABLED=true
ip netns exec $ID-co "$BIN" coordinator "$WORK/fleet.yml" s3://merged/out --listen 10.77.0.3:7300 \
  --task-size 16MiB --out-shard-size 100M --linger 5s > "$WORK/coordinator.log" 2>&1 &
co=$!
until grep -q "coordinator listening" "$WORK/coordinator.log"; do
  kill -0 $co 2>/dev/null || { tail -5 "$WORK/coordinator.log"; exit 1; }
  sleep 0.05
done
t0=$(date +%s.%N)
ip netns exec $ID-w1 "$BIN" worker --coordinator http://10.77.0.3:7300 --name w1 --threads 1 \
  > "$WORK/w1.log" 2>&1 &
w=$!
wait $co || { tail -5 "$WORK/coordinator.log"; exit 1; }
wait $w || true
committed=$(grep -m1 " INFO committed " "$WORK/coordinator.log" | cut -d' ' -f1)
s=$(calc "$(date -d "$committed" +%s.%N) - $t0")
in_bytes=$(cat "$SET"/*/*.safetensors | wc -c)
mbs=$(calc "$in_bytes/$s/1e6")
echo "one worker from the Hub: $(calc "$in_bytes/1e9") GB in $s s, $mbs MB/s ($(calc "$mbs*1e6/$cap_bytes*100")% of its $MBIT Mbit/s link; each connection capped at $(calc "$conn_bytes/1e6") MB/s)"
