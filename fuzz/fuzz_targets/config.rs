//! Any bytes as config.json: accepted configs are internally consistent, nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(c) = glimpse::config::Config::from_json(&v) {
            assert_eq!(c.mlp_layer_types.len(), c.num_hidden_layers);
            assert_eq!(c.indexer_types.len(), c.num_hidden_layers);
            let _ = c.softmax_scale();
            let _ = glimpse::model::rope::RotaryEmbedding::new(&c);
        }
    }
});
