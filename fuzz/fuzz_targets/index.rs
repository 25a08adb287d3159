//! `model.safetensors.index.json`: any bytes give a map or an error, never a panic, and
//! every shard name accepted is a plain file name (no path escapes the model directory).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(map) = mergefleet::checkpoint::parse_index(data) {
        for file in map.values() {
            assert!(
                !file.contains(['/', '\\']) && file != "." && file != ".." && !file.is_empty(),
                "{file:?}"
            );
        }
    }
});
