//! The model configuration: HF `config.json` of `model_type: glm_moe_dsa`, parsed into the values
//! that change the math, with everything transformers derives (indexer sharing pattern, MLP layer
//! types, RoPE parameters) derived here exactly the same way. Unknown or unsupported values are
//! refused with an error naming the field, so a config we would silently misread never runs.

use std::path::Path;

mod rope;
pub use rope::{yarn_mscale, Rope, Yarn};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The most routed experts glimpse reads (GLM-5 has 256): a config, a dump's router or its
/// expert ids past it are refused, so neither can make us allocate on its word.
pub const MAX_EXPERTS: usize = 1 << 16;

/// The FP8 scale block when a config names none.
const DEFAULT_FP8_BLOCK: [usize; 2] = [128, 128];

/// How a layer's feed-forward block is built (`mlp_layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    Dense,
    Moe,
}

/// Whether a layer runs its own DSA indexer or reuses the previous full layer's selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexerKind {
    Full,
    Shared,
}

/// Block-FP8 storage (`quantization_config`). Which tensors are quantised is decided per tensor by
/// the presence of `weight_scale_inv`, never by `modules_to_not_convert` (misspelled upstream).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8 {
    pub block: [usize; 2],
}

#[derive(Debug, Clone)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub n_shared_experts: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub routed_scaling_factor: f64,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub attention_bias: bool,
    pub index_topk: usize,
    pub index_head_dim: usize,
    pub index_n_heads: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub num_nextn_predict_layers: usize,
    pub mlp_layer_types: Vec<MlpKind>,
    pub indexer_types: Vec<IndexerKind>,
    pub rope: Rope,
    pub fp8: Option<Fp8>,
    /// `eos_token_id`: one id or a list (GLM-5's has three); empty when absent or null. Not the
    /// forward pass's: where `generate` stops (unless generation_config.json says otherwise).
    pub eos_token_ids: Vec<u32>,
}

/// The most layers a config may declare.
const MAX_LAYERS: usize = 1 << 12;

/// Keys of config.json that `unread_keys` does not report: those that do not change the forward
/// pass (accepted and ignored), and, from `index_topk_freq` on, those read apart from the main
/// fields (the indexer's pattern, the expert count's aliases, RoPE's, the FP8 format's and
/// `generate`'s).
const IGNORED_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "initializer_range",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "attention_dropout",
    "output_router_logits",
    "mlp_bias", // transformers builds every MLP without bias whatever this says
    "head_dim", // transformers overwrites it with qk_rope_head_dim
    "layer_types",
    "num_key_value_heads", // checked below
    "hidden_act",          // checked below
    "auto_map",
    "name_or_path",
    "_name_or_path",
    "scoring_func",
    "topk_method",
    "ep_size",
    "moe_layer_freq",
    "aux_loss_alpha",
    "seq_aux",
    "tokenizer_class",
    "generation_config",
    "index_topk_freq",
    "index_skip_topk_offset",
    "index_topk_pattern",
    "num_experts",
    "num_local_experts",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "original_max_position_embeddings",
    "quantization_config",
    "eos_token_id", // read by `generate`
];

pub(crate) struct Fields<'a> {
    pub(crate) obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    /// `key`'s value where given; a `null` is refused (named `field`), not read as the default,
    /// for the fields transformers fails on when null (`get` reads null as absent, as it does for
    /// the fields it takes as their default).
    pub(crate) fn given(&self, key: &str, field: &str) -> Result<Option<&'a Value>> {
        match self.obj.get(key) {
            Some(Value::Null) => Err(Error::config(field, "null: give a value, or leave the key out for the default")),
            v => Ok(v),
        }
    }
    // A number or a flag given as `null` is refused, not read as its default: transformers'
    // config refuses it too (`q_lora_rank: null`, DeepSeek's "no low-rank query path", would
    // otherwise run as GLM-5's 2048).
    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(v) => as_usize(key, v),
        }
    }
    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(v) => as_f64(key, v),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| Error::config(key, format!("expected a boolean, got {v}"))),
        }
    }
}

/// `eos_token_id`: one token id or a list of them; none where it is `null` or absent. As
/// transformers' `generate` takes it, which builds its settings from config.json's own keys: the
/// config's attribute defaults to 1 where the key is absent, but `generate` then has no eos.
fn eos_token_ids(f: &Fields) -> Result<Vec<u32>> {
    match f.obj.get("eos_token_id") {
        None => Ok(Vec::new()),
        Some(v) => eos_ids(v).map_err(|msg| Error::config("eos_token_id", msg)),
    }
}

/// One token id, a list of them, or `null` for none.
fn eos_ids(v: &Value) -> std::result::Result<Vec<u32>, String> {
    let id = |v: &Value| {
        v.as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| format!("expected a token id or a list of them, got {v}"))
    };
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(ids) => ids.iter().map(id).collect(),
        v => id(v).map(|i| vec![i]),
    }
}

/// The token ids `generate` stops at, as transformers' `generate` takes them: from the
/// checkpoint's `generation_config.json` where it has one (none where that file names none,
/// even if config.json does), else config.json's (`config`'s).
pub fn generation_eos(dir: &Path, config: &Config) -> Result<Vec<u32>> {
    let path = dir.join(GENERATION_CONFIG);
    if !path.exists() {
        return Ok(config.eos_token_ids.clone());
    }
    let bytes = crate::st::read_input(&path)?;
    let json: Value = serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: path.clone(), source })?;
    let Value::Object(fields) = json else { return Err(Error::checkpoint(&path, "expected a JSON object")) };
    let ids = fields.get("eos_token_id").map_or(Ok(Vec::new()), eos_ids);
    ids.map_err(|msg| Error::checkpoint(&path, format!("`eos_token_id`: {msg}")))
}

/// The file transformers' `generate` reads its defaults from, beside config.json.
pub const GENERATION_CONFIG: &str = "generation_config.json";

fn as_usize(key: &str, v: &Value) -> Result<usize> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| Error::config(key, format!("expected a non-negative integer, got {v}")))
}

pub(crate) fn as_f64(key: &str, v: &Value) -> Result<f64> {
    v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| Error::config(key, format!("expected a finite number, got {v}")))
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_bytes(path, &crate::st::read_input(path)?)
    }

    /// Parses and validates the `bytes` read from `path` (named in its errors).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        Self::from_json(&value).map_err(|e| Error::Context { context: path.display().to_string(), source: Box::new(e) })
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| Error::config("<root>", "config.json must be a JSON object"))?;
        let f = Fields { obj };
        match f.get("model_type").and_then(Value::as_str) {
            Some("glm_moe_dsa") | None => {}
            Some(other) => {
                return Err(Error::config("model_type", format!("expected \"glm_moe_dsa\", got \"{other}\"")))
            }
        }
        if let Some(act) = f.given("hidden_act", "hidden_act")? {
            if act.as_str() != Some("silu") {
                return Err(Error::config("hidden_act", format!("only \"silu\" is supported, got {act}")));
            }
        }

        // Defaults are transformers 5.24's GlmMoeDsaConfig defaults (the published GLM-5 values).
        let num_hidden_layers = f.usize_or("num_hidden_layers", 78)?;
        // Checked before the per-layer lists below are derived from it (a fuzzer found a config
        // whose layer count made that derivation abort on allocation).
        if num_hidden_layers > MAX_LAYERS {
            return Err(Error::config(
                "num_hidden_layers",
                format!("{num_hidden_layers} is beyond any supported model (at most {MAX_LAYERS})"),
            ));
        }
        let num_attention_heads = f.usize_or("num_attention_heads", 64)?;
        // Where several are given, transformers' config takes `num_local_experts` (its alias of
        // `n_routed_experts`, set last), then `num_experts` (re-routed after init, where not
        // null), then `n_routed_experts`. (A null alias or `n_routed_experts` is refused.)
        let given = |key| f.obj.get(key).map(|v| (key, v));
        let n_routed_experts =
            match given("num_local_experts").or_else(|| f.get("num_experts").map(|v| ("num_experts", v))) {
                Some((key, v)) => as_usize(key, v)?,
                None => match given("n_routed_experts") {
                    Some((key, v)) => as_usize(key, v)?,
                    None => 256,
                },
            };
        let num_kv_heads = f.usize_or("num_key_value_heads", num_attention_heads)?;
        if num_kv_heads != num_attention_heads {
            return Err(Error::config(
                "num_key_value_heads",
                format!("must equal num_attention_heads ({num_attention_heads}) for MLA, got {num_kv_heads}"),
            ));
        }

        let cfg = Config {
            vocab_size: f.usize_or("vocab_size", 154880)?,
            hidden_size: f.usize_or("hidden_size", 6144)?,
            intermediate_size: f.usize_or("intermediate_size", 12288)?,
            moe_intermediate_size: f.usize_or("moe_intermediate_size", 2048)?,
            num_hidden_layers,
            num_attention_heads,
            n_shared_experts: f.usize_or("n_shared_experts", 1)?,
            n_routed_experts,
            num_experts_per_tok: f.usize_or("num_experts_per_tok", 8)?,
            routed_scaling_factor: f.f64_or("routed_scaling_factor", 2.5)?,
            n_group: f.usize_or("n_group", 1)?,
            topk_group: f.usize_or("topk_group", 1)?,
            norm_topk_prob: f.bool_or("norm_topk_prob", true)?,
            q_lora_rank: f.usize_or("q_lora_rank", 2048)?,
            kv_lora_rank: f.usize_or("kv_lora_rank", 512)?,
            qk_nope_head_dim: f.usize_or("qk_nope_head_dim", 192)?,
            qk_rope_head_dim: f.usize_or("qk_rope_head_dim", 64)?,
            v_head_dim: f.usize_or("v_head_dim", 256)?,
            attention_bias: f.bool_or("attention_bias", false)?,
            index_topk: f.usize_or("index_topk", 2048)?,
            index_head_dim: f.usize_or("index_head_dim", 128)?,
            index_n_heads: f.usize_or("index_n_heads", 32)?,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-5)?,
            max_position_embeddings: f.usize_or("max_position_embeddings", 202752)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            num_nextn_predict_layers: f.usize_or("num_nextn_predict_layers", 0)?,
            mlp_layer_types: mlp_layer_types(&f, num_hidden_layers)?,
            indexer_types: indexer_types(&f, num_hidden_layers)?,
            rope: rope::rope(&f)?,
            fp8: fp8(&f)?,
            eos_token_ids: eos_token_ids(&f)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Dimension checks transformers would only trip over at run time (or not at all).
    fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("q_lora_rank", self.q_lora_rank),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("index_topk", self.index_topk),
            ("index_n_heads", self.index_n_heads),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, "must be positive"));
            }
        }
        // Far beyond any real model: a hostile config must not make us allocate on its word.
        let capped = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 18),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("moe_intermediate_size", self.moe_intermediate_size, 1 << 20),
            ("num_attention_heads", self.num_attention_heads, 1 << 12),
            ("n_routed_experts", self.n_routed_experts, MAX_EXPERTS),
            ("q_lora_rank", self.q_lora_rank, 1 << 18),
            ("kv_lora_rank", self.kv_lora_rank, 1 << 18),
            ("qk_nope_head_dim", self.qk_nope_head_dim, 1 << 14),
            ("qk_rope_head_dim", self.qk_rope_head_dim, 1 << 14),
            ("v_head_dim", self.v_head_dim, 1 << 14),
            ("index_head_dim", self.index_head_dim, 1 << 14),
            ("index_n_heads", self.index_n_heads, 1 << 12),
            ("num_nextn_predict_layers", self.num_nextn_predict_layers, 1 << 6),
        ];
        for (field, v, max) in capped {
            if v > max {
                return Err(Error::config(field, format!("{v} is beyond any supported model (at most {max})")));
            }
        }
        // RMSNorm divides by sqrt(mean(x^2) + eps): eps <= 0 gives NaN or Inf on a zero row.
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(Error::config("rms_norm_eps", format!("must be a positive number, got {}", self.rms_norm_eps)));
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(Error::config("qk_rope_head_dim", "must be even (RoPE rotates pairs)"));
        }
        if self.index_head_dim < self.qk_rope_head_dim {
            return Err(Error::config(
                "index_head_dim",
                format!("must be at least qk_rope_head_dim ({}), got {}", self.qk_rope_head_dim, self.index_head_dim),
            ));
        }
        if self.mlp_layer_types.contains(&MlpKind::Dense) && self.intermediate_size == 0 {
            return Err(Error::config("intermediate_size", "must be positive: the dense layers' MLP width"));
        }
        // The MTP layer is a MoE layer whatever the main layers are.
        if self.has_moe() || self.num_nextn_predict_layers > 0 {
            let e = self.n_routed_experts;
            if e == 0 || self.num_experts_per_tok == 0 || self.moe_intermediate_size == 0 {
                let which = if self.has_moe() { "MoE layers need" } else { "The MTP layer (a MoE layer) needs" };
                return Err(Error::config(
                    "n_routed_experts",
                    format!("{which} experts, top-k and an intermediate size"),
                ));
            }
            if !e.is_multiple_of(self.n_group) {
                return Err(Error::config(
                    "n_group",
                    format!("n_routed_experts ({e}) is not divisible by n_group ({})", self.n_group),
                ));
            }
            if self.topk_group > self.n_group {
                return Err(Error::config(
                    "topk_group",
                    format!("{} exceeds n_group ({})", self.topk_group, self.n_group),
                ));
            }
            if self.n_group > 1 && self.experts_per_group() < 2 {
                return Err(Error::config(
                    "n_group",
                    "grouped routing scores groups by their top-2 experts: need at least 2 experts per group",
                ));
            }
            let selectable = self.topk_group * self.experts_per_group();
            if self.num_experts_per_tok > selectable {
                return Err(Error::config(
                    "num_experts_per_tok",
                    format!("{} exceeds the {selectable} experts the kept groups offer", self.num_experts_per_tok),
                ));
            }
            if self.n_shared_experts == 0 {
                return Err(Error::config("n_shared_experts", "0 is not supported (GLM-5 has one shared expert)"));
            }
        }
        Ok(())
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
    /// Rows of `kv_b_proj`: each head's no-RoPE key, then its value, from the latent.
    pub fn kv_b_dim(&self) -> usize {
        self.num_attention_heads * (self.qk_nope_head_dim + self.v_head_dim)
    }
    pub fn experts_per_group(&self) -> usize {
        self.n_routed_experts / self.n_group.max(1)
    }
    pub fn shared_intermediate_size(&self) -> usize {
        self.moe_intermediate_size * self.n_shared_experts
    }
    /// Values the decode cache holds per token over the main layers (and the MTP layer, with
    /// `mtp`): the latent and the roped shared key in every layer, plus the index key in
    /// full-indexer layers; against per-head expanded keys and values.
    pub fn cache_values_per_token(&self, mtp: bool) -> (usize, usize) {
        // The MTP layer runs alone, so it has a full indexer of its own (`indexer_kind`).
        let n = self.num_hidden_layers + usize::from(mtp);
        let full = (0..n).filter(|&i| self.indexer_kind(i) == IndexerKind::Full).count();
        // Either cache keeps the indexer's keys (DSA scores every cached position with them).
        let index = full * self.index_head_dim;
        let latent = n * (self.kv_lora_rank + self.qk_rope_head_dim) + index;
        (latent, n * self.num_attention_heads * (self.qk_head_dim() + self.v_head_dim) + index)
    }

    /// Layer `i`'s feed-forward kind; past the main layers (the MTP layer) always MoE.
    pub fn mlp_kind(&self, i: usize) -> MlpKind {
        if i >= self.num_hidden_layers {
            return MlpKind::Moe;
        }
        self.mlp_layer_types.get(i).copied().unwrap_or(MlpKind::Moe)
    }

    /// Whether layer `i` is one of the checkpoint's (the MTP layer's included) and routes its
    /// tokens to experts.
    pub fn is_moe(&self, i: usize) -> bool {
        i < self.num_hidden_layers + self.num_nextn_predict_layers && self.mlp_kind(i) == MlpKind::Moe
    }

    /// Layer `i`'s indexer kind; the MTP layer runs alone, so it always scores keys itself.
    pub fn indexer_kind(&self, i: usize) -> IndexerKind {
        if i >= self.num_hidden_layers {
            return IndexerKind::Full;
        }
        self.indexer_types.get(i).copied().unwrap_or(IndexerKind::Full)
    }

    /// The layer whose indexer chose layer `i`'s keys: `i` itself, or for a shared-indexer layer
    /// the last full one before it (the config refuses a shared first layer).
    pub fn indexer_source(&self, i: usize) -> usize {
        (0..=i).rev().find(|&j| self.indexer_kind(j) == IndexerKind::Full).unwrap_or(0)
    }

    /// The block of one FP8 scale the readers use: the config's `weight_block_size`, else
    /// DeepSeek-V3's and GLM-5's 128 x 128 (also for FP8 tensors a config without
    /// `quantization_config` holds). (`synth` writes 128 x 128 blocks and says so in its config.)
    pub fn fp8_block(&self) -> [usize; 2] {
        self.fp8.as_ref().map_or(DEFAULT_FP8_BLOCK, |f| f.block)
    }

    pub fn has_moe(&self) -> bool {
        self.mlp_layer_types.contains(&MlpKind::Moe)
    }

    /// The warning a run of `positions` deserves past `max_position_embeddings` (RoPE runs on
    /// past it, but the model was not trained there); None within it.
    pub fn past_positions(&self, positions: usize) -> Option<String> {
        let max = self.max_position_embeddings;
        (positions > max).then(|| {
            format!(
                "{positions} positions, {} of them past max_position_embeddings ({max}) of this config",
                positions - max
            )
        })
    }
    /// Width of one row of `kv_a_proj_with_mqa`: the latent, then the shared rope key.
    pub fn kv_a_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
    /// `K` of the dump spec: keys kept per query for a sequence of `seq` tokens.
    pub fn index_k(&self, seq: usize) -> usize {
        self.index_topk.min(seq)
    }
    /// Softmax scale of MLA: `qk_head_dim^-0.5`, times [`Self::softmax_mscale`] squared.
    pub fn softmax_scale(&self) -> f64 {
        let m = self.softmax_mscale();
        (self.qk_head_dim() as f64).powf(-0.5) * m * m
    }
    /// YaRN's `mscale(factor, mscale_all_dim)`, which the softmax scale takes squared; 1 without
    /// YaRN or `mscale_all_dim`.
    pub fn softmax_mscale(&self) -> f64 {
        match &self.rope {
            Rope::Yarn(y) => match y.mscale_all_dim {
                Some(m) if m != 0.0 => yarn_mscale(y.factor, m),
                _ => 1.0,
            },
            Rope::Default { .. } => 1.0,
        }
    }
}

fn mlp_layer_types(f: &Fields, n: usize) -> Result<Vec<MlpKind>> {
    let Some(v) = f.get("mlp_layer_types") else {
        let dense = f.usize_or("first_k_dense_replace", 3)?.min(n);
        return Ok((0..n).map(|i| if i < dense { MlpKind::Dense } else { MlpKind::Moe }).collect());
    };
    let list = v.as_array().ok_or_else(|| Error::config("mlp_layer_types", "expected a list"))?;
    let kinds = list
        .iter()
        .map(|x| match x.as_str() {
            Some("dense") => Ok(MlpKind::Dense),
            Some("sparse") => Ok(MlpKind::Moe),
            _ => Err(Error::config("mlp_layer_types", format!("entries must be \"dense\" or \"sparse\", got {x}"))),
        })
        .collect::<Result<Vec<_>>>()?;
    // (transformers' `validate_layer_type` refuses a list of another length than the layers.)
    if kinds.len() > n {
        return Err(Error::config(
            "mlp_layer_types",
            format!("has {} entries but num_hidden_layers is {n}", kinds.len()),
        ));
    }
    per_layer("mlp_layer_types", kinds, n)
}

/// Per-layer indexer mode, derived as `GlmMoeDsaConfig.__post_init__` derives it: an explicit
/// `indexer_types`, else `index_topk_pattern` ("FSS..." or a list), else the freq/offset schedule
/// `full iff max(i - offset + 1, 0) % freq == 0`.
fn indexer_types(f: &Fields, n: usize) -> Result<Vec<IndexerKind>> {
    // A list's entries are words; only a pattern string spells layers as letters. (transformers
    // reads an "S" inside a list as a full layer, anything but "shared" being full: refused here
    // rather than read either way.)
    let word = |field: &str, x: &Value| match x.as_str() {
        Some("full") => Ok(IndexerKind::Full),
        Some("shared") => Ok(IndexerKind::Shared),
        Some(s @ ("F" | "S")) => Err(Error::config(
            field,
            format!(
                "a list's entries are \"full\" or \"shared\", got \"{s}\" (letters go in a pattern string, \"FSS...\")"
            ),
        )),
        _ => Err(Error::config(field, format!("entries must be \"full\" or \"shared\", got {x}"))),
    };
    let letter = |c: char| match c {
        'F' => Ok(IndexerKind::Full),
        'S' => Ok(IndexerKind::Shared),
        _ => Err(Error::config("index_topk_pattern", format!("letters must be F or S, got '{c}'"))),
    };
    let list = |field: &str, list: &Vec<Value>| list.iter().map(|x| word(field, x)).collect::<Result<Vec<_>>>();
    let kinds = if let Some(v) = f.get("indexer_types") {
        list("indexer_types", v.as_array().ok_or_else(|| Error::config("indexer_types", "expected a list"))?)?
    } else if let Some(p) = f.get("index_topk_pattern") {
        match p {
            Value::String(s) => s.chars().map(letter).collect::<Result<Vec<_>>>()?,
            Value::Array(l) => list("index_topk_pattern", l)?,
            _ => return Err(Error::config("index_topk_pattern", "expected a string like \"FSS\" or a list")),
        }
    } else {
        let freq = f.usize_or("index_topk_freq", 1)?.max(1) as i128;
        // Any integer, as transformers takes it (a negative one too), in arithmetic that cannot
        // wrap.
        let offset = match f.given("index_skip_topk_offset", "index_skip_topk_offset")? {
            Some(v) => v
                .as_i64()
                .ok_or_else(|| Error::config("index_skip_topk_offset", format!("{v}: expected an integer")))?,
            None => 2,
        } as i128;
        (0..n as i128)
            .map(|i| if (i - offset + 1).max(0) % freq == 0 { IndexerKind::Full } else { IndexerKind::Shared })
            .collect()
    };
    let kinds = per_layer("indexer_types", kinds, n)?;
    if kinds.first() == Some(&IndexerKind::Shared) {
        return Err(Error::config(
            "indexer_types",
            "layer 0 is \"shared\" but there is no earlier full indexer layer to share from",
        ));
    }
    Ok(kinds)
}

/// A per-layer list must cover every layer; extra trailing entries of the indexer's (e.g.
/// describing the MTP layer) are ignored, as transformers ignores them (it refuses a longer
/// `mlp_layer_types`: [`mlp_layer_types`]).
fn per_layer<T>(field: &str, mut kinds: Vec<T>, n: usize) -> Result<Vec<T>> {
    if kinds.len() < n {
        return Err(Error::config(field, format!("has {} entries but num_hidden_layers is {n}", kinds.len())));
    }
    kinds.truncate(n);
    Ok(kinds)
}

fn fp8(f: &Fields) -> Result<Option<Fp8>> {
    let Some(q) = f.get("quantization_config") else {
        return Ok(None);
    };
    let q = q.as_object().ok_or_else(|| Error::config("quantization_config", "expected an object"))?;
    match q.get("quant_method").and_then(Value::as_str) {
        Some("fp8") => {}
        other => {
            return Err(Error::config(
                "quantization_config.quant_method",
                format!("only \"fp8\" (block-wise e4m3) is supported, got {other:?}"),
            ))
        }
    }
    if let Some(fmt) = q.get("fmt").and_then(Value::as_str) {
        if fmt != "e4m3" {
            return Err(Error::config("quantization_config.fmt", format!("only \"e4m3\" is supported, got \"{fmt}\"")));
        }
    }
    // Static activation scales quantise every product's input with a stored scale; glimpse keeps
    // activations in f32, as a dequantised reference does: right for "dynamic" (the weights'
    // rounding is the quantisation studied), not for "static".
    match q.get("activation_scheme").and_then(Value::as_str).map(str::to_lowercase).as_deref() {
        None | Some("dynamic") => {}
        Some(other) => {
            return Err(Error::config(
                "quantization_config.activation_scheme",
                format!("only \"dynamic\" is supported (activations stay f32), got \"{other}\""),
            ))
        }
    }
    let block = match q.get("weight_block_size") {
        None | Some(Value::Null) => DEFAULT_FP8_BLOCK,
        Some(Value::Array(b)) if b.len() == 2 => {
            let r = as_usize("quantization_config.weight_block_size", &b[0])?;
            let c = as_usize("quantization_config.weight_block_size", &b[1])?;
            if r == 0 || c == 0 {
                return Err(Error::config("quantization_config.weight_block_size", "block sizes must be positive"));
            }
            [r, c]
        }
        Some(v) => {
            return Err(Error::config(
                "quantization_config.weight_block_size",
                format!("expected [rows, cols], got {v}"),
            ))
        }
    };
    Ok(Some(Fp8 { block }))
}

impl Config {
    /// Top-level keys that neither change the math nor are known: reported by `inspect` so a
    /// user sees what glimpse did not read.
    pub fn unread_keys(value: &Value) -> Vec<String> {
        let known = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "n_shared_experts",
            "n_routed_experts",
            "num_experts_per_tok",
            "routed_scaling_factor",
            "n_group",
            "topk_group",
            "norm_topk_prob",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "attention_bias",
            "index_topk",
            "index_head_dim",
            "index_n_heads",
            "rms_norm_eps",
            "max_position_embeddings",
            "tie_word_embeddings",
            "num_nextn_predict_layers",
            "mlp_layer_types",
            "first_k_dense_replace",
            "indexer_types",
        ];
        value
            .as_object()
            .map(|o| {
                o.keys()
                    .filter(|k| !known.contains(&k.as_str()) && !IGNORED_KEYS.contains(&k.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
