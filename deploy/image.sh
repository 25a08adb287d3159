#!/usr/bin/env bash
# Packages a mergefleet binary built outside into the image: deploy/Dockerfile's `prebuilt`
# target, whose runtime stage is the same as the from-source build's. The build context is a
# fresh folder holding only the binary, stripped of its line tables as the source build
# strips it. Prints the image's size.
#
#   cargo build --release --locked --bin mergefleet
#   deploy/image.sh REGISTRY/mergefleet:TAG [BINARY]     # BINARY: target/release/mergefleet
#
# Uses podman, or docker when podman is missing (CONTAINER_TOOL overrides). Without a
# registry, make the base image first: deploy/debian-base.sh.
set -euo pipefail
tag="${1:?usage: deploy/image.sh TAG [BINARY]}"
# BINARY is relative to the caller's directory; the default, to the repository.
binary="$(realpath -m "${2:-$(dirname "$0")/../target/release/mergefleet}")"
cd "$(dirname "$0")/.."
TOOL="${CONTAINER_TOOL:-$(command -v podman || command -v docker || echo podman)}"

[ -x "$binary" ] || {
  echo "no binary at $binary: build it with cargo build --release --locked --bin mergefleet" >&2
  exit 1
}
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
install -s -m 0755 "$binary" "$context/mergefleet"
"$TOOL" build --quiet -f deploy/Dockerfile --target prebuilt -t "$tag" "$context" >/dev/null
size="$("$TOOL" image inspect --format '{{.Size}}' "$tag")"
echo "image $tag: $((size / 1000000)) MB (binary $(($(stat -c %s "$context/mergefleet") / 1000000)) MB)"
