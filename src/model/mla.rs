//! Multi-head Latent Attention with DSA, in the expanded form the transformers reference computes:
//! low-rank query path, KV compressed into a `kv_lora_rank` latent plus one shared RoPE key,
//! `kv_b_proj` expanding the latent into per-head `[k_nope | v]`, then softmax over the keys the
//! indexer selected (intersected with the causal mask), a block of queries at a time
//! (`attention.rs`). Where we depart: past a few thousand positions, where each query keeps
//! `index_topk` of many more causal keys, the later queries take the absorbed form decode steps
//! use (`kv_b_proj` folded into the query and output), the same math in another order, so that
//! they read only the keys they keep.

use candle_core::{Device, Tensor, D};

use super::absorbed::{absorbed_from, Absorbed};
use super::attention::{sparse_attention, Dims};
use super::decode::{LayerCache, Positions};
use super::indexer::{Indexer, Selection};
use super::nn::{Linear, RmsNorm};
use super::rope::RopeTables;
use crate::checkpoint::Loader;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hooks::{emit, with_f32s, HookPoint, LayerHook, Observer};

pub struct Attention {
    pub q_a_proj: Linear,           // [q_lora_rank, hidden]
    pub q_a_layernorm: RmsNorm,     // [q_lora_rank], eps 1e-6
    pub q_b_proj: Linear,           // [heads * (nope + rope), q_lora_rank]
    pub kv_a_proj_with_mqa: Linear, // [kv_lora_rank + rope, hidden]
    pub kv_a_layernorm: RmsNorm,    // [kv_lora_rank], eps 1e-6
    pub kv_b_proj: Linear,          // [heads * (nope + v), kv_lora_rank]
    pub o_proj: Linear,             // [hidden, heads * v]
    pub indexer: Indexer,
    pub(crate) heads: usize,
    pub(crate) nope: usize,
    pub(crate) rope_dim: usize,
    pub(crate) v_dim: usize,
    pub(crate) kv_lora_rank: usize,
    pub(crate) scale: f64,
    /// `kv_b_proj` split for absorbed decode, built on first use (`decode.rs`).
    pub(crate) absorbed: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl Attention {
    pub fn load(l: &mut Loader, cfg: &Config, layer: usize) -> Self {
        let p = format!("model.layers.{layer}.self_attn");
        let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
        let bias = cfg.attention_bias;
        Attention {
            q_a_proj: Linear::load(l, &format!("{p}.q_a_proj"), cfg.q_lora_rank, h, bias),
            // The reference builds both latent norms with the RMSNorm default eps, not rms_norm_eps.
            q_a_layernorm: RmsNorm::load(l, &format!("{p}.q_a_layernorm"), cfg.q_lora_rank, 1e-6),
            q_b_proj: Linear::load(l, &format!("{p}.q_b_proj"), nh * cfg.qk_head_dim(), cfg.q_lora_rank, false),
            kv_a_proj_with_mqa: Linear::load(l, &format!("{p}.kv_a_proj_with_mqa"), cfg.kv_a_dim(), h, bias),
            kv_a_layernorm: RmsNorm::load(l, &format!("{p}.kv_a_layernorm"), cfg.kv_lora_rank, 1e-6),
            kv_b_proj: Linear::load(l, &format!("{p}.kv_b_proj"), cfg.kv_b_dim(), cfg.kv_lora_rank, false),
            o_proj: Linear::load(l, &format!("{p}.o_proj"), h, nh * cfg.v_head_dim, bias),
            indexer: Indexer::load(l, cfg, layer),
            heads: nh,
            nope: cfg.qk_nope_head_dim,
            rope_dim: cfg.qk_rope_head_dim,
            v_dim: cfg.v_head_dim,
            kv_lora_rank: cfg.kv_lora_rank,
            scale: cfg.softmax_scale(),
            absorbed: std::sync::OnceLock::new(),
        }
    }

    /// x: [B, S, hidden] (the input-normed hidden state) -> [B, S, hidden]. `sel` carries the DSA
    /// selection between layers (shared layers read it, full layers replace it).
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        rope: &RopeTables,
        sel: &mut Option<Selection>,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        self.forward_filling(layer, x, rope, sel, None, obs)
    }

    /// `forward`, also filling an empty decode cache with the latents, rope keys and index keys
    /// of these positions (a prompt prefilled in the expanded form, then decoded).
    pub(crate) fn forward_filling(
        &self,
        layer: usize,
        x: &Tensor,
        rope: &RopeTables,
        sel: &mut Option<Selection>,
        mut cache: Option<&mut LayerCache>,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nope, rd, vd) = (self.heads, self.nope, self.rope_dim, self.v_dim);
        let Projected { q_latent, q, kv_latent, k_rope } = self.project(layer, x, rope, obs)?;
        if let Some(c) = cache.as_deref_mut() {
            c.append_latents(&kv_latent, &k_rope)?;
        }

        // DSA: this layer's selection (or the shared one), then attention over it only.
        // With an empty cache, the index keys it receives are exactly these positions' own.
        let keys = cache.map(|c| &mut c.index_keys);
        let selection = self.select(layer, x, &q_latent, rope, keys, sel, obs)?;
        let dims = Dims { batch: b, seq: s, keys: s, heads: nh, nope, rope: rd, v: vd };

        // Queries before `from` read every causal key's keys and values expanded from the latent;
        // later ones, each keeping `index_topk` of many more keys, read just those keys' latents
        // with `kv_b_proj` absorbed (absorbed::absorbed_from), so only `from` positions expand.
        let from = absorbed_from(dims, self.kv_lora_rank, selection.k).map_err(Error::Usage)?;
        let kv = self.kv_b_proj.forward(&kv_latent.narrow(1, 0, from)?)?; // [B, from, nh * (nope + v)]
        let split = match (from < s, self.absorbed.get()) {
            (false, _) => None,
            (true, Some(w)) => Some(w.clone()),
            (true, None) => Some(self.split_kv_b()?),
        };
        let mut inputs = vec![&kv, &k_rope, &kv_latent];
        inputs.extend(split.iter().flat_map(|(w_uk, w_uv_t)| [w_uk, w_uv_t]));
        // Every input read where it lies (a copy of the expanded keys and values would be 117 MB
        // a layer at 1024 tokens).
        let o = with_f32s(&inputs, |x| {
            let absorbed = match x {
                &[_, _, latents, w_uk, w_uv_t] => {
                    Some(Absorbed { from, latents, w_uk, w_uv_t, rank: self.kv_lora_rank })
                }
                _ => None,
            };
            sparse_attention(&q, x[0], x[1], absorbed.as_ref(), selection, dims, self.scale as f32)
        })?;
        let o = Tensor::from_vec(o, (b, s, nh * vd), &Device::Cpu)?; // [B, S, nh * v]
        let out = self.o_proj.forward(&o)?; // [B, S, hidden]
        emit(obs, HookPoint::Layer(layer, LayerHook::AttnOut), || Ok(out.clone()))?;
        Ok(out)
    }

    /// `kv_b_proj` split per head for absorption, made once per model for decode steps:
    /// W_UK [nh, nope, r] goes into the query, W_UV^T [nh, r, v] into the output.
    pub(crate) fn absorbed(&self) -> Result<&(Tensor, Tensor)> {
        if let Some(w) = self.absorbed.get() {
            return Ok(w);
        }
        let w = self.split_kv_b()?;
        Ok(self.absorbed.get_or_init(|| w))
    }

    /// [`Self::absorbed`]'s split, made anew: a prefill needs it once, so it is not kept (a
    /// resident model would hold an f32 copy of every layer's `kv_b_proj`).
    fn split_kv_b(&self) -> Result<(Tensor, Tensor)> {
        let (nh, nope, vd, r) = (self.heads, self.nope, self.v_dim, self.kv_lora_rank);
        let w = self.kv_b_proj.f32_weight()?.reshape((nh, nope + vd, r))?;
        let w_uk = w.narrow(1, 0, nope)?.contiguous()?;
        let w_uv_t = w.narrow(1, nope, vd)?.transpose(1, 2)?.contiguous()?;
        Ok((w_uk, w_uv_t))
    }

    /// The part both attention forms share: the roped query, the latent and the roped shared key
    /// of the `S` tokens in `x` (at the positions `rope` was built for), with their hooks.
    pub(crate) fn project(
        &self,
        layer: usize,
        x: &Tensor,
        rope: &RopeTables,
        obs: &mut dyn Observer,
    ) -> Result<Projected> {
        let (b, s, _) = x.dims3()?;
        let (nh, nope, rd) = (self.heads, self.nope, self.rope_dim);
        let qk = nope + rd;
        let hook = |h| HookPoint::Layer(layer, h);

        // Query: low-rank path, then RoPE on the last `rope` dims of every head.
        let q_latent = self.q_a_layernorm.forward(&self.q_a_proj.forward(x)?)?; // [B, S, q_lora_rank]
        emit(obs, hook(LayerHook::QLatent), || Ok(q_latent.clone()))?;
        let mut q = self.q_b_proj.forward(&q_latent)?.flatten_all()?.to_vec1::<f32>()?; // [B, S, nh, qk]
        rope.apply(&mut q, s, nh, qk, nope);

        // KV: one latent and one shared rope key per token.
        let ckv = self.kv_a_proj_with_mqa.forward(x)?; // [B, S, kv_lora_rank + rope]
        let c_kv = ckv.narrow(D::Minus1, 0, self.kv_lora_rank)?; // [B, S, kv_lora_rank]
        emit(obs, hook(LayerHook::KvNormPre), || l2_norm(&c_kv))?;
        let kv_latent = self.kv_a_layernorm.forward(&c_kv)?; // [B, S, kv_lora_rank]
        emit(obs, hook(LayerHook::KvLatent), || Ok(kv_latent.clone()))?;
        emit(obs, hook(LayerHook::KvNorm), || l2_norm(&kv_latent))?;
        let mut k_rope = ckv.narrow(D::Minus1, self.kv_lora_rank, rd)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?; // [B, S, rope]
        rope.apply(&mut k_rope, s, 1, rd, 0);
        let k_rope = Tensor::from_vec(k_rope, (b, s, rd), &Device::Cpu)?; // [B, S, rope]
        emit(obs, hook(LayerHook::KRopeNorm), || l2_norm(&k_rope))?;
        Ok(Projected { q_latent, q, kv_latent, k_rope })
    }

    /// This layer's DSA selection for the queries in `x` (a replayed one when the observer forces
    /// it), reported as `dsa.topk`. `keys` is the decode cache of index keys, None in a prefill
    /// that fills no cache.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn select<'s>(
        &self,
        layer: usize,
        x: &Tensor,
        q_latent: &Tensor,
        rope: &RopeTables,
        keys: Option<&mut Positions>,
        sel: &'s mut Option<Selection>,
        obs: &mut dyn Observer,
    ) -> Result<&'s Selection> {
        let (b, s, _) = x.dims3()?;
        self.indexer.select(layer, x, q_latent, rope, keys, sel, obs)?;
        if let Some(forced) = obs.forced_selection(layer)? {
            if (forced.batch, forced.seq) != (b, s) || forced.idx.len() != b * s * forced.k {
                return Err(Error::Usage(format!(
                    "layer {layer}: the replayed selection is for batch {} x seq {}, the run is {b} x {s}",
                    forced.batch, forced.seq
                )));
            }
            *sel = Some(forced);
        }
        let selection = sel.as_ref().ok_or_else(|| Error::Usage("no DSA selection".into()))?;
        emit(obs, HookPoint::Layer(layer, LayerHook::DsaTopk), || selection.to_tensor())?;
        Ok(selection)
    }
}

/// The query, latent and shared rope key of one call's tokens (`Attention::project`).
pub(crate) struct Projected {
    pub q_latent: Tensor,  // [B, S, q_lora_rank]
    pub q: Vec<f32>,       // [B, S, nh, nope + rope], roped
    pub kv_latent: Tensor, // [B, S, kv_lora_rank]
    pub k_rope: Tensor,    // [B, S, rope], roped
}

/// L2 norm over the last dimension: [..., d] -> [...].
fn l2_norm(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?.sum(D::Minus1)?.sqrt()?)
}
