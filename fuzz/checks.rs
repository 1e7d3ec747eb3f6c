//! What each fuzz target checks, shared with `tests/fuzz_corpus.rs` (which replays the corpus on
//! stable Rust), so the two cannot drift apart. Every function must only ever fail by panicking.

/// Any bytes as a safetensors file: parsing never panics, and every tensor it accepts can be
/// decoded without reading out of bounds.
pub fn safetensors_header(data: &[u8]) {
    if let Ok((start, tensors, _)) = glimpse::st::parse(data) {
        for info in tensors.values() {
            let (a, b) = info.data_offsets;
            let _ = glimpse::st::decode_f32(info.dtype, &data[start + a..start + b]);
        }
    }
}

/// Any bytes as config.json: accepted configs are internally consistent, nothing panics.
pub fn config(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(c) = glimpse::config::Config::from_json(&v) {
            assert_eq!(c.mlp_layer_types.len(), c.num_hidden_layers);
            assert_eq!(c.indexer_types.len(), c.num_hidden_layers);
            let _ = c.softmax_scale();
            let _ = glimpse::model::rope::RotaryEmbedding::new(&c);
        }
    }
}

/// Any bytes as model.safetensors.index.json: parsed or refused, never a panic.
pub fn index(data: &[u8]) {
    let _ = glimpse::checkpoint::parse_index(std::path::Path::new("index.json"), data);
}

/// A file as a dump: opening, reading its tokens and every tensor, diffing it with itself and
/// scanning it for NaN/Inf either work or fail with an error, never a panic.
pub fn dump(path: &std::path::Path) {
    if let Ok(d) = glimpse::dump::Dump::open(path) {
        let _ = d.tokens();
        for name in d.names() {
            let _ = d.values(&name);
        }
        let _ = glimpse::diff::diff(&d, &d, &Default::default());
        let _ = glimpse::diff::first_non_finite_in(&d);
    }
}
