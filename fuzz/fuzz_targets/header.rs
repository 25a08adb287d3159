//! A whole safetensors file prefix: the 8-byte length, then the header JSON. The parser
//! must return Ok or a message for any bytes, never panic, and never accept a tensor whose
//! bytes fall outside the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mergefleet::header::{header_len, parse_header};

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    // The first 8 bytes choose the claimed file size; the rest is the file's beginning.
    let file_size = u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 40);
    let file = &data[8..];
    let Ok(n) = header_len(file[..8].try_into().unwrap(), file_size) else {
        return;
    };
    let Some(json) = file.get(8..8 + n as usize) else {
        return;
    };
    if let Ok((tensors, _)) = parse_header(json, file_size) {
        for t in &tensors {
            assert!(
                t.start <= t.end && t.end <= file_size,
                "{t:?} outside a {file_size}-byte file"
            );
        }
    }
});
