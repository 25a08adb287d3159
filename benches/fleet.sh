#!/usr/bin/env bash
# The fleet over a real network, on one machine: cluster merges with W = 1, 2, 4, 8 worker
# hosts (network namespaces, benches/netns.sh), each host's link capped with tc, reading the
# models from a store host behind a proxy that caps each connection (as a cloud store does)
# and writing the output to an S3 server (s3s-fs) on that host.
#
# The models are served over HTTP by nginx (object_store's HTTP store: ranged GETs, as from
# S3): s3s-fs spends CPU per request in proportion to the object's size, so on 2 cores it,
# not the network, would be what many parallel range requests measure.
#
#   sudo benches/fleet.sh [DIR] [HOST_MBIT] [WORKER_COUNTS]
#
# DIR (default /tmp/mergefleet-fleet) gets a synthetic set (base + 3 fine-tunes, bf16,
# hidden 1024, 8 layers, vocab 8192: ~0.9 GB of input in 37 tasks of 16-64 MiB of input,
# so W = 8 hosts have work to share), written once. HOST_MBIT (default
# 100) caps each worker host's link; every connection to the store is capped at 1/16 of it.
# Prints, per W, the wall time (first worker start to the commit), aggregate and
# per-worker input throughput, and the ratio to W x the one-worker throughput.
# WORKER_FLAGS adds worker flags to the W runs.
# The default cap keeps 8 worker hosts within 2 cores (at 200 Mbit/s they are 80-94% busy):
# the network, not the machine, must be the limit. Needs root, iproute2, tc,
# nginx (apt-get install nginx) and s3s-fs.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/mergefleet-fleet}
MBIT=${2:-100}
COUNTS=${3:-"1 2 4 8"}
WORKER_FLAGS=${WORKER_FLAGS:-}   # extra worker flags for the W runs, e.g. --read-concurrency 32
ID=mffleet
cargo build --release -q --bin mergefleet --example synth --example pacing_proxy
BIN=$PWD/target/release/mergefleet
PROXY=$PWD/target/release/examples/pacing_proxy
S3S=${S3S_FS:-$(command -v s3s-fs || echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs")}
ROOT="$DIR/s3"
if [ ! -f "$ROOT/models/set/model_stock.yml" ]; then
  rm -rf "$DIR"
  target/release/examples/synth "$DIR/set" --hidden 1024 --layers 8 --intermediate 2816 \
    --vocab 8192 >/dev/null
  mkdir -p "$ROOT/models" && mv "$DIR/set" "$ROOT/models/set"
fi
STORE=http://10.77.0.2:9000/models/set
sed "s#$DIR/set/#$STORE/#g; s#$ROOT/models/set/#$STORE/#g" \
  "$ROOT/models/set/model_stock.yml" > "$DIR/fleet.yml"
grep -q "$STORE/base" "$DIR/fleet.yml" || { echo "unexpected config:"; cat "$DIR/fleet.yml"; exit 1; }
cat > "$DIR/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
error_log stderr;
pid $DIR/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  server { listen 127.0.0.1:9002; root $ROOT; }
}
NGINX
in_bytes=$(cat "$ROOT"/models/set/*/*.safetensors | wc -c)
cap_bytes=$((MBIT * 1000 * 1000 / 8))
conn_bytes=$((cap_bytes / 16))
export MERGEFLEET_TOKEN=fleet-bench-token-0123456789
export AWS_ENDPOINT=http://10.77.0.2:9001 AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=fleet AWS_SECRET_ACCESS_KEY=fleet-secret AWS_EC2_METADATA_DISABLED=true
calc() { awk "BEGIN { printf \"%.2f\", $1 }"; }
# run() runs in a subshell ($(...)): it stops its own servers and hosts, on failure too.
PIDS=()
stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  PIDS=()
  benches/netns.sh down $ID
}
fail() { echo "$1" >&2; tail -5 "$2" >&2; stop_all; exit 1; }
trap 'benches/netns.sh down $ID' EXIT

# run W [worker flags...]: one cluster merge; prints its wall seconds.
run() {
  local w=$1; shift
  benches/netns.sh up $ID "$w" "$MBIT"
  rm -rf "$ROOT/merged" && mkdir -p "$ROOT/merged"
  ip netns exec $ID-s3 "$S3S" --host 10.77.0.2 --port 9001 --access-key fleet \
    --secret-key fleet-secret "$ROOT" >/dev/null 2>&1 &
  PIDS+=($!)
  ip netns exec $ID-s3 nginx -c "$DIR/nginx.conf" >/dev/null 2>&1 &
  PIDS+=($!)
  ip netns exec $ID-s3 "$PROXY" 10.77.0.2:9000 127.0.0.1:9002 "$conn_bytes" >/dev/null 2>&1 &
  PIDS+=($!)
  sleep 0.5
  ip netns exec $ID-co "$BIN" coordinator "$DIR/fleet.yml" s3://merged/out --listen 10.77.0.3:7300 \
    --task-size 16MiB --out-shard-size 100M --linger 5s > "$DIR/coordinator.log" 2>&1 &
  local co=$!
  until grep -q "coordinator listening" "$DIR/coordinator.log"; do
    kill -0 $co 2>/dev/null || fail "the coordinator did not start:" "$DIR/coordinator.log"
    sleep 0.05
  done
  local t0; t0=$(date +%s.%N)
  local ws=()
  for i in $(seq "$w"); do
    ip netns exec "$ID-w$i" "$BIN" worker --coordinator http://10.77.0.3:7300 --name "w$i" \
      --threads 1 "$@" > "$DIR/w$i.log" 2>&1 &
    ws+=($!)
  done
  wait $co || fail "the coordinator failed:" "$DIR/coordinator.log"
  for p in "${ws[@]}"; do wait "$p" || true; done
  stop_all
  # Until the commit, as its log line stamps it (the coordinator then lingers a few seconds
  # to tell the workers the merge is over: not part of the merge).
  local committed; committed=$(grep -m1 " INFO committed " "$DIR/coordinator.log" | cut -d' ' -f1)
  calc "$(date -d "$committed" +%s.%N) - $t0"
}

echo "input $(calc "$in_bytes/1e9") GB; each worker host's link capped at $MBIT Mbit/s ($(calc "$cap_bytes/1e6") MB/s), each store connection at $(calc "$conn_bytes/1e6") MB/s; $(nproc) cores"
one=""
for w in $COUNTS; do
  # shellcheck disable=SC2086
  s=$(run "$w" $WORKER_FLAGS)
  agg=$(calc "$in_bytes/$s/1e6")
  [ -n "$one" ] || one=$agg
  echo "W=$w: $s s, $agg MB/s of input in all, $(calc "$agg/$w") MB/s per worker ($(calc "$agg/$w*1e6/$cap_bytes*100")% of its link), $(calc "$agg/($w*$one)")x of W x one worker"
done
