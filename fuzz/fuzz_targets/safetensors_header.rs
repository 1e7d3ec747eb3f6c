//! Any bytes as a safetensors file (`checks::safetensors_header`).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses one of the checks
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::safetensors_header(data));
