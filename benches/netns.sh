#!/usr/bin/env bash
# Hosts on one machine, for multi-host tests and benchmarks: network namespaces joined by a
# bridge, each with its own address and, for workers, a capped link (tc tbf, both ways).
#
#   benches/netns.sh up ID WORKERS [MBIT]   hosts ID-s3 (10.77.0.2), ID-co (10.77.0.3) and
#                                           ID-w1 .. ID-wN (10.77.0.11 ..); MBIT caps each
#                                           worker's link (0: no cap)
#   benches/netns.sh down ID                removes them (also what a crashed run left)
#
# Run a program on a host with `ip netns exec ID-w1 PROGRAM`. Needs root and iproute2.
# Interface names are ID plus a few characters: keep ID at most 8 characters.
set -euo pipefail
cmd=${1:?up or down}
id=${2:?an id}
br="${id}br"
net=10.77.0

down() {
  for ns in $(ip netns list | awk '{print $1}' | grep "^$id-" || true); do
    ip netns del "$ns"
  done
  # The host ends of the veth pairs go with their peers, but asynchronously: remove them
  # now, so an `up` right after cannot find them still there.
  for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 |
      grep -E "^${id}(br|(s3|co|w[0-9]+)h)$" || true); do
    ip link del "$link" 2>/dev/null || true
  done
}

# host NAME LAST_OCTET [MBIT]
host() {
  local ns="$id-$1" outer="${id}$1h" inner="${id}$1n"
  ip netns add "$ns"
  ip link add "$outer" type veth peer name "$inner"
  ip link set "$inner" netns "$ns"
  ip link set "$outer" master "$br" up
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "$inner" name eth0
  ip -n "$ns" addr add "$net.$2/24" dev eth0
  ip -n "$ns" link set eth0 up
  if [ "${3:-0}" != 0 ]; then
    # The host's link: what it receives is shaped as it leaves the bridge, what it sends
    # as it leaves the host.
    tc qdisc add dev "$outer" root tbf rate "${3}mbit" burst 256kb latency 20ms
    ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "${3}mbit" burst 256kb latency 20ms
  fi
}

case "$cmd" in
  up)
    workers=${3:?number of worker hosts}
    mbit=${4:-0}
    down
    ip link add "$br" type bridge
    ip link set "$br" up
    host s3 2
    host co 3
    for i in $(seq "$workers"); do host "w$i" $((10 + i)) "$mbit"; done
    ;;
  down) down ;;
  *) echo "usage: $0 up ID WORKERS [MBIT] | down ID" >&2; exit 2 ;;
esac
