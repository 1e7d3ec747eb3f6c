//! Any bytes as model.safetensors.index.json: parsed or refused, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = glimpse::checkpoint::parse_index(std::path::Path::new("index.json"), data);
});
