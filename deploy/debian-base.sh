#!/usr/bin/env bash
# Makes the base image deploy/Dockerfile starts from, debian:bookworm-slim, on a machine that
# cannot pull it (no registry): a minimal Debian bookworm made by debootstrap from a Debian
# mirror, trimmed as Debian's slim images are (no documentation, man pages, locales, apt
# lists or downloaded packages, and a dpkg rule that keeps them out), imported under the
# name the Dockerfile's FROM line uses. Does nothing when that image is already there.
#
#   sudo deploy/debian-base.sh            # MIRROR=http://deb.debian.org/debian by default
#
# Needs root, debootstrap and podman (or CONTAINER_TOOL=docker).
set -euo pipefail
NAME=docker.io/library/debian:bookworm-slim
TOOL="${CONTAINER_TOOL:-podman}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

if "$TOOL" image inspect "$NAME" >/dev/null 2>&1; then
  echo "$NAME is already here"
  exit 0
fi
root="$(mktemp -d)"
log="$(mktemp)"
# --one-file-system: a failed debootstrap may leave /proc or /sys mounted in the tree.
trap 'rm -rf --one-file-system "$root" "$log"' EXIT
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$log" 2>&1 || {
  cat "$log" >&2
  exit 1
}
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
  "$root"/var/log/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'RULES'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
RULES
tar -C "$root" --numeric-owner -c . | "$TOOL" import - "$NAME" >/dev/null
echo "$NAME made with debootstrap from $MIRROR"
