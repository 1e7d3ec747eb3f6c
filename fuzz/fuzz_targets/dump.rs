//! Any bytes as a dump file: opening, reading its tokens and every tensor, and diffing it with
//! itself either work or fail with an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("glimpse-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("dump.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(d) = glimpse::dump::Dump::open(&path) {
        let _ = d.tokens();
        for name in d.names() {
            let _ = d.values(&name);
        }
        let _ = glimpse::diff::diff(&d, &d, &Default::default());
        let _ = glimpse::diff::first_non_finite_in(&d);
    }
});
