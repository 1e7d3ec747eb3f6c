//! The released checkpoint layout: every tensor name and shape a config implies, with per-expert
//! names as in the published GLM-5 checkpoint. `synth` writes it; `inspect` groups a real
//! checkpoint's tensors by the same blocks.

use crate::config::{Config, IndexerKind, MlpKind};

/// What a tensor is, which decides how `synth` initialises and stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A projection `[out, in]`: quantisable to block-FP8.
    Linear,
    /// A projection that FP8 checkpoints keep in bf16 (embeddings, lm_head, router, `weights_proj`).
    Plain,
    NormWeight,
    NormBias,
    /// `e_score_correction_bias`, kept in f32.
    RouterBias,
}

#[derive(Debug, Clone)]
pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: Kind,
}

/// The decoder layer a checkpoint tensor belongs to (`model.layers.{i}.…`), if any.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// The block a tensor name belongs to, for per-block parameter counts.
pub fn block_of(name: &str, num_layers: usize) -> &'static str {
    if layer_of(name).is_some_and(|i| i >= num_layers) {
        return "mtp layer";
    }
    match name {
        _ if name.starts_with("model.embed_tokens") => "embedding",
        _ if name.starts_with("lm_head") => "lm_head",
        _ if name == "model.norm.weight" => "final norm",
        _ if name.contains(".self_attn.indexer.") => "dsa indexer",
        _ if name.contains(".self_attn.") => "attention (mla)",
        _ if name.contains(".mlp.experts.") => "routed experts",
        _ if name.contains(".mlp.shared_experts.") => "shared expert",
        _ if name.contains(".mlp.gate.") => "router",
        _ if name.contains(".mlp.") => "dense mlp",
        _ if name.contains("layernorm") => "layer norms",
        _ => "other",
    }
}

/// Every tensor of a checkpoint for `cfg`, in the released layout; the MTP layer(s) too when
/// `mtp` is set (`model.layers.{num_hidden_layers + j}`: a MoE decoder layer plus `enorm`, `hnorm`,
/// `eh_proj` and `shared_head.norm`).
pub fn released_layout(cfg: &Config, mtp: bool) -> Vec<WeightSpec> {
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, kind: Kind| out.push(WeightSpec { name, shape, kind });
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    push("model.embed_tokens.weight".into(), vec![v, h], Kind::Plain);
    let extra = if mtp { cfg.num_nextn_predict_layers.max(1) } else { 0 };
    for i in 0..cfg.num_hidden_layers + extra {
        let is_mtp = i >= cfg.num_hidden_layers;
        let p = format!("model.layers.{i}");
        if is_mtp {
            push(format!("{p}.enorm.weight"), vec![h], Kind::NormWeight);
            push(format!("{p}.hnorm.weight"), vec![h], Kind::NormWeight);
            push(format!("{p}.eh_proj.weight"), vec![h, 2 * h], Kind::Linear);
            push(format!("{p}.shared_head.norm.weight"), vec![h], Kind::NormWeight);
        }
        push(format!("{p}.input_layernorm.weight"), vec![h], Kind::NormWeight);
        push(format!("{p}.post_attention_layernorm.weight"), vec![h], Kind::NormWeight);
        let a = format!("{p}.self_attn");
        let nh = cfg.num_attention_heads;
        let mut linear = |name: String, o: usize, i: usize| {
            push(format!("{name}.weight"), vec![o, i], Kind::Linear);
            if cfg.attention_bias
                && (name.ends_with("q_a_proj") || name.ends_with("kv_a_proj_with_mqa") || name.ends_with("o_proj"))
            {
                push(format!("{name}.bias"), vec![o], Kind::NormBias);
            }
        };
        linear(format!("{a}.q_a_proj"), cfg.q_lora_rank, h);
        linear(format!("{a}.q_b_proj"), nh * cfg.qk_head_dim(), cfg.q_lora_rank);
        linear(format!("{a}.kv_a_proj_with_mqa"), cfg.kv_a_dim(), h);
        linear(format!("{a}.kv_b_proj"), cfg.kv_b_dim(), cfg.kv_lora_rank);
        linear(format!("{a}.o_proj"), h, nh * cfg.v_head_dim);
        push(format!("{a}.q_a_layernorm.weight"), vec![cfg.q_lora_rank], Kind::NormWeight);
        push(format!("{a}.kv_a_layernorm.weight"), vec![cfg.kv_lora_rank], Kind::NormWeight);
        if cfg.indexer_kind(i) == IndexerKind::Full {
            let x = format!("{a}.indexer");
            let (n, d) = (cfg.index_n_heads, cfg.index_head_dim);
            push(format!("{x}.wq_b.weight"), vec![n * d, cfg.q_lora_rank], Kind::Linear);
            push(format!("{x}.wk.weight"), vec![d, h], Kind::Linear);
            push(format!("{x}.k_norm.weight"), vec![d], Kind::NormWeight);
            push(format!("{x}.k_norm.bias"), vec![d], Kind::NormBias);
            push(format!("{x}.weights_proj.weight"), vec![n, h], Kind::Plain);
        }
        let m = format!("{p}.mlp");
        let mlp = |push: &mut dyn FnMut(String, Vec<usize>, Kind), prefix: String, inter: usize| {
            push(format!("{prefix}.gate_proj.weight"), vec![inter, h], Kind::Linear);
            push(format!("{prefix}.up_proj.weight"), vec![inter, h], Kind::Linear);
            push(format!("{prefix}.down_proj.weight"), vec![h, inter], Kind::Linear);
        };
        if cfg.mlp_kind(i) == MlpKind::Dense {
            mlp(&mut push, m, cfg.intermediate_size);
        } else {
            push(format!("{m}.gate.weight"), vec![cfg.n_routed_experts, h], Kind::Plain);
            push(format!("{m}.gate.e_score_correction_bias"), vec![cfg.n_routed_experts], Kind::RouterBias);
            for e in 0..cfg.n_routed_experts {
                mlp(&mut push, format!("{m}.experts.{e}"), cfg.moe_intermediate_size);
            }
            mlp(&mut push, format!("{m}.shared_experts"), cfg.shared_intermediate_size());
        }
    }
    push("model.norm.weight".into(), vec![h], Kind::NormWeight);
    if !cfg.tie_word_embeddings {
        push("lm_head.weight".into(), vec![v, h], Kind::Plain);
    }
    out
}
