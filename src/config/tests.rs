//! The config reader against transformers 5.24's reading: defaults, aliases, what it refuses.

use super::*;

/// `eos_token_id`: one id or a list; none for null or absent (transformers' `generate` has no eos
/// then, though the config's attribute defaults to 1); anything else is refused, not dropped.
#[test]
fn eos_token_id_is_one_id_or_a_list() {
    let eos = |v: Value| Config::from_json(&serde_json::json!({ "eos_token_id": v })).map(|c| c.eos_token_ids);
    assert_eq!(eos(serde_json::json!(7)).unwrap(), [7]);
    assert_eq!(eos(serde_json::json!([154820, 154827, 154829])).unwrap(), [154820, 154827, 154829]);
    assert_eq!(eos(Value::Null).unwrap(), Vec::<u32>::new());
    assert_eq!(Config::from_json(&serde_json::json!({})).unwrap().eos_token_ids, Vec::<u32>::new());
    let bad = eos(serde_json::json!([1, "x"])).unwrap_err().to_string();
    assert!(bad.contains("eos_token_id") && bad.contains("\"x\""), "{bad}");
}

fn read(json: Value) -> std::result::Result<Config, String> {
    Config::from_json(&json).map_err(|e| e.to_string())
}

/// The expert count where several of its names are given, as transformers' config reads them
/// (`GlmMoeDsaConfig.from_dict`, 5.24): `num_local_experts`, then `num_experts`, then
/// `n_routed_experts`. And `index_skip_topk_offset` of any size, or negative, as it takes it.
#[test]
fn the_expert_count_and_the_indexer_offset_are_read_as_transformers_reads_them() {
    let experts = |mut json: Value| {
        json["num_experts_per_tok"] = serde_json::json!(2);
        read(json).map(|c| c.n_routed_experts).unwrap()
    };
    assert_eq!(experts(serde_json::json!({ "n_routed_experts": 8, "num_local_experts": 4 })), 4);
    assert_eq!(experts(serde_json::json!({ "n_routed_experts": 8, "num_experts": 4 })), 4);
    assert_eq!(experts(serde_json::json!({ "num_experts": 4, "num_local_experts": 6 })), 6);
    assert_eq!(experts(serde_json::json!({ "n_routed_experts": 8, "num_experts": null })), 8);
    assert!(read(serde_json::json!({ "n_routed_experts": null, "num_experts_per_tok": 2 })).is_err());
    use IndexerKind::{Full, Shared};
    let kinds = |offset: Value| {
        let json =
            serde_json::json!({ "num_hidden_layers": 4, "index_topk_freq": 2, "index_skip_topk_offset": offset });
        read(json).map(|c| c.indexer_types)
    };
    // transformers: "full" if max(i - offset + 1, 0) % freq == 0.
    assert_eq!(kinds(serde_json::json!(2)).unwrap(), [Full, Full, Shared, Full]);
    assert_eq!(kinds(serde_json::json!(-1)).unwrap(), [Full, Shared, Full, Shared]);
    assert_eq!(kinds(serde_json::json!(i64::MAX)).unwrap(), [Full; 4]);
    assert!(kinds(serde_json::json!(u64::MAX)).unwrap_err().contains("index_skip_topk_offset"));
}

/// Where transformers' reading of a config is not the obvious one, it is followed or the
/// config refused, never read another way (each of these ran silently otherwise).
#[test]
fn configs_transformers_reads_otherwise_are_followed_or_refused() {
    let layers = |json: Value| read(json).map(|c| c.indexer_types);
    let small = |extra: Value| {
        let mut j = serde_json::json!({ "num_hidden_layers": 3 });
        j.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        j
    };
    use IndexerKind::{Full, Shared};
    // Letters in a pattern string; words in a list. transformers takes a list's "S" as full.
    assert_eq!(layers(small(serde_json::json!({ "index_topk_pattern": "FSF" }))).unwrap(), [Full, Shared, Full]);
    let words = serde_json::json!({ "index_topk_pattern": ["full", "shared", "full"] });
    assert_eq!(layers(small(words)).unwrap(), [Full, Shared, Full]);
    for field in ["index_topk_pattern", "indexer_types"] {
        let e = layers(small(serde_json::json!({ field: ["F", "S", "F"] }))).unwrap_err();
        assert!(e.contains(field) && e.contains("\"F\"") && e.contains("pattern string"), "{e}");
    }
    // An empty `rope_scaling` is no scaling: `rope_parameters` beside it counts.
    let yarn = serde_json::json!({ "rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5 });
    let rope = read(serde_json::json!({ "rope_scaling": {}, "rope_parameters": yarn })).unwrap().rope;
    assert!(matches!(rope, Rope::Yarn(ref y) if y.factor == 4.0 && y.theta == 5e5), "{rope:?}");
    let e = read(serde_json::json!({ "rope_scaling": { "rope_type": "yarn", "factor": 4.0, "beta_fast": -1 } }));
    assert!(e.unwrap_err().contains("rope_scaling.beta_fast"));
    let zero = serde_json::json!({ "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0 });
    assert!(read(serde_json::json!({ "rope_scaling": zero }))
        .unwrap_err()
        .contains("original_max_position_embeddings"));
    for factor in [0.0, -2.0] {
        let e = read(serde_json::json!({ "rope_scaling": { "rope_type": "yarn", "factor": factor } })).unwrap_err();
        assert!(e.contains("rope_scaling.factor") && e.contains("must be positive"), "{e}");
    }
    let nested = serde_json::json!({ "rope_parameters": { "full_attention": { "rope_type": "default" } } });
    let e = read(nested).unwrap_err();
    assert!(e.contains("rope_parameters.full_attention") && e.contains("nested"), "{e}");
    let scheme =
        |s: &str| read(serde_json::json!({ "quantization_config": { "quant_method": "fp8", "activation_scheme": s } }));
    assert!(scheme("dynamic").is_ok());
    let e = scheme("static").unwrap_err();
    assert!(e.contains("activation_scheme") && e.contains("\"static\""), "{e}");
    // A null number is refused, not read as GLM-5's default.
    for field in ["q_lora_rank", "index_topk", "routed_scaling_factor", "norm_topk_prob", "n_routed_experts"] {
        let e = read(serde_json::json!({ field: null })).unwrap_err();
        assert!(e.contains(field) && e.contains("got null"), "{e}");
    }
    // So are the nulls transformers fails on that a reading as absent took for the default
    // (a differential check against transformers 5.24 found them).
    let yarn = |k: &str| serde_json::json!({ "rope_type": "yarn", "factor": 4.0, k: null });
    for (json, field) in [
        (serde_json::json!({ "hidden_act": null }), "hidden_act"),
        (serde_json::json!({ "index_topk_freq": 2, "index_skip_topk_offset": null }), "index_skip_topk_offset"),
        (serde_json::json!({ "rope_parameters": { "rope_type": null } }), "rope_parameters.rope_type"),
        (serde_json::json!({ "rope_parameters": { "rope_theta": null } }), "rope_parameters.rope_theta"),
        (serde_json::json!({ "rope_parameters": yarn("original_max_position_embeddings") }), "original_max"),
    ] {
        let e = read(json).unwrap_err();
        assert!(e.contains(field) && e.contains("null"), "{e}");
    }
    // transformers refuses an `mlp_layer_types` of another length than the layers.
    let mlp = |n: usize| small(serde_json::json!({ "mlp_layer_types": vec!["dense"; n] }));
    assert!(read(mlp(3)).is_ok());
    for n in [2, 4] {
        assert!(read(mlp(n)).unwrap_err().contains(&format!("mlp_layer_types`: has {n} entries")));
    }
}

/// Sizes a model's own layers would divide by or allocate from: dense layers need their MLP
/// width, and an MTP layer (always MoE) its experts even when every main layer is dense.
#[test]
fn widths_the_layers_use_are_checked() {
    let e = read(serde_json::json!({ "first_k_dense_replace": 1, "intermediate_size": 0 })).unwrap_err();
    assert!(e.contains("intermediate_size") && e.contains("dense layers"), "{e}");
    assert!(read(serde_json::json!({ "first_k_dense_replace": 0, "intermediate_size": 0 })).is_ok());
    let dense_with_mtp = |n: usize| serde_json::json!({ "num_hidden_layers": 2, "first_k_dense_replace": 2, "num_nextn_predict_layers": n, "n_routed_experts": 0 });
    assert!(read(dense_with_mtp(0)).is_ok());
    assert!(read(dense_with_mtp(1)).unwrap_err().contains("The MTP layer (a MoE layer) needs experts"));
}

/// `partial_rotary_factor` is read only with YaRN: transformers' default RoPE rotates the whole
/// `qk_rope_head_dim` whatever it says (a review measured the same logits at 0.5), and its
/// YaRN fails on the shapes, which glimpse refuses before.
#[test]
fn a_partial_rotary_factor_is_refused_with_yarn_only() {
    let rope = |params: Value| Config::from_json(&serde_json::json!({ "rope_parameters": params })).map(|c| c.rope);
    let default = rope(serde_json::json!({"rope_type": "default", "partial_rotary_factor": 0.5})).unwrap();
    assert_eq!(default, rope(serde_json::json!({"rope_type": "default"})).unwrap());
    let yarn = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5});
    let err = rope(yarn).unwrap_err().to_string();
    assert!(err.contains("partial_rotary_factor") && err.contains("with yarn"), "{err}");
}
