//! The fuzz corpus as regression tests: every seed and every input the fuzzers ever found
//! interesting enough to keep (`fuzz/corpus/<target>/`, `fuzz/artifacts/<target>/`) goes through
//! the same entry points as the fuzz targets, on stable Rust and without libFuzzer.

use std::path::{Path, PathBuf};

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
    files
}

#[test]
fn safetensors_header_corpus() {
    let files = inputs("safetensors_header");
    assert!(!files.is_empty());
    for f in files {
        let data = std::fs::read(&f).unwrap();
        if let Ok((start, tensors, _)) = glimpse::st::parse(&data) {
            for info in tensors.values() {
                let (a, b) = info.data_offsets;
                let _ = glimpse::st::decode_f32(info.dtype, &data[start + a..start + b]);
            }
        }
    }
}

#[test]
fn config_corpus() {
    let files = inputs("config");
    assert!(!files.is_empty());
    for f in files {
        let data = std::fs::read(&f).unwrap();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) {
            if let Ok(c) = glimpse::config::Config::from_json(&v) {
                assert_eq!(c.mlp_layer_types.len(), c.num_hidden_layers, "{}", f.display());
                let _ = glimpse::model::rope::RotaryEmbedding::new(&c);
            }
        }
    }
}

#[test]
fn index_corpus() {
    for f in inputs("index") {
        let _ = glimpse::checkpoint::parse_index(&f, &std::fs::read(&f).unwrap());
    }
}

#[test]
fn dump_corpus() {
    let files = inputs("dump");
    assert!(!files.is_empty());
    for f in files {
        if let Ok(d) = glimpse::dump::Dump::open(&f) {
            let _ = d.tokens();
            for name in d.names() {
                let _ = d.values(&name);
            }
            let _ = glimpse::diff::diff(&d, &d, &Default::default());
        }
    }
}
