//! The fuzz corpus as regression tests: every seed and every input the fuzzers ever found
//! interesting enough to keep (`fuzz/corpus/<target>/`, `fuzz/artifacts/<target>/`) goes through
//! the very checks the fuzz targets run (`fuzz/checks.rs`), on stable Rust and without libFuzzer.

use std::path::{Path, PathBuf};

#[allow(dead_code)]
#[path = "../fuzz/checks.rs"]
mod checks;

/// A target's kept inputs; every target has some.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files: Vec<PathBuf> = ["corpus", "artifacts"]
        .iter()
        .filter_map(|d| std::fs::read_dir(root.join(d).join(target)).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no kept inputs for fuzz target {target}");
    files
}

#[test]
fn safetensors_header_corpus() {
    for f in inputs("safetensors_header") {
        checks::safetensors_header(&std::fs::read(&f).unwrap());
    }
}

#[test]
fn config_corpus() {
    for f in inputs("config") {
        checks::config(&std::fs::read(&f).unwrap());
    }
}

#[test]
fn index_corpus() {
    for f in inputs("index") {
        checks::index(&std::fs::read(&f).unwrap());
    }
}

#[test]
fn dump_corpus() {
    for f in inputs("dump") {
        checks::dump(&f);
    }
}
