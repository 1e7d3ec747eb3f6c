//! Any bytes as a dump file (`checks::dump`), written to a temporary file first.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses one of the checks
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("glimpse-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("dump.safetensors");
    if std::fs::write(&path, data).is_ok() {
        checks::dump(&path);
    }
});
