#!/usr/bin/env bash
# Fuzz mergefleet's parsers of untrusted input, seeded with real files from the golden
# fixtures: safetensors headers, shard indexes, mergekit configs.
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 600 s each, all targets)
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); RUSTC_BOOTSTRAP lets it use the
# sanitizer flags on a stable toolchain. Crashes land in fuzz/artifacts/TARGET/; each one
# found becomes a regression test in tests/hardening/.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(header index config)
fixtures=../tests/fixtures/model_stock

mkdir -p corpus/header corpus/index corpus/config
# header: 8 bytes of claimed file size, then the file's length prefix and header JSON.
for f in $(find "$fixtures" -name '*.safetensors'); do
  python3 - "$f" corpus/header <<'PY'
import os, struct, sys, hashlib
path, out = sys.argv[1], sys.argv[2]
data = open(path, 'rb').read()
n = struct.unpack('<Q', data[:8])[0]
seed = struct.pack('<Q', len(data)) + data[:8 + n]
open(os.path.join(out, hashlib.sha1(seed).hexdigest()), 'wb').write(seed)
PY
done
find "$fixtures" -name 'model.safetensors.index.json' -exec cp {} corpus/index/ \;
for f in $(find "$fixtures" ../examples -name '*.yml'); do
  cp "$f" "corpus/config/$(echo "$f" | tr '/' '_')"
done

for t in "${targets[@]}"; do
  echo "== fuzzing $t for $secs s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1
done
