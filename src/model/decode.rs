//! Decoding one token at a time the way serving engines do: per layer only the 576-value latent
//! (`kv_latent` after its norm, plus the roped shared `k_rope`) and the DSA indexer's key are
//! cached, and `kv_b_proj` is absorbed into the query and the output instead of expanding keys and
//! values:
//!
//! `q_abs = q_nope · W_UK` (per head, kv_lora_rank wide);
//! `score[t] = (q_abs · kv_latent[t] + q_rope · k_rope[t]) * scale` over the selected keys;
//! `o = W_UV · Σ p[t] kv_latent[t]`.
//!
//! It must agree with the expanded prefill (`mla.rs`); the tests check it token by token.

use candle_core::{Device, Tensor, D};

use super::indexer::{top_k_keys, Indexer, Selection};
use super::layer::DecoderLayer;
use super::mla::Attention;
use super::nn::softmax_last;
use super::rope::RopeTables;
use super::{Model, Tokens};
use crate::error::{Error, Result};
use crate::hooks::{emit, HookPoint, LayerHook, NoObserver, Observer};

/// One layer's cache: every position so far.
#[derive(Default)]
pub struct LayerCache {
    pub kv_latent: Option<Tensor>,  // [B, T, kv_lora_rank]
    pub k_rope: Option<Tensor>,     // [B, T, rope], roped
    pub index_keys: Option<Tensor>, // [B, T, index_head_dim], roped (full indexer layers)
}

/// The whole model's cache and how many positions it holds.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    pub len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache { layers: (0..layers).map(|_| LayerCache::default()).collect(), len: 0 }
    }

    /// Bytes cached per token and layer in f32: latent + rope key (+ the indexer key), against
    /// what expanded keys and values would take.
    pub fn bytes_per_token(m: &Model) -> (usize, usize) {
        let c = &m.config;
        let latent = 4 * (c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim);
        let expanded = 4 * c.num_attention_heads * (c.qk_head_dim() + c.v_head_dim);
        (latent, expanded)
    }
}

fn append(cache: &mut Option<Tensor>, new: Tensor) -> Result<Tensor> {
    let t = match cache.take() {
        Some(old) => Tensor::cat(&[&old, &new], 1)?,
        None => new,
    };
    *cache = Some(t.clone());
    Ok(t)
}

impl Attention {
    /// `kv_b_proj` split per head for absorption, made once per model (not per step):
    /// W_UK [nh, nope, r] goes into the query, W_UV^T [nh, r, v] into the output.
    fn absorbed(&self) -> Result<&(Tensor, Tensor)> {
        if let Some(w) = self.absorbed.get() {
            return Ok(w);
        }
        let (nh, nope, vd, r) = (self.heads, self.nope, self.v_dim, self.kv_lora_rank);
        let w = self.kv_b_proj.weight.reshape((nh, nope + vd, r))?;
        let w_uk = w.narrow(1, 0, nope)?.contiguous()?;
        let w_uv_t = w.narrow(1, nope, vd)?.transpose(1, 2)?.contiguous()?;
        Ok(self.absorbed.get_or_init(|| (w_uk, w_uv_t)))
    }

    /// One new position `pos` per batch row. x: [B, 1, hidden] -> [B, 1, hidden].
    fn decode(
        &self,
        layer: usize,
        x: &Tensor,
        rope: &RopeTables,
        cache: &mut LayerCache,
        sel: &mut Option<Selection>,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        let (b, _, _) = x.dims3()?;
        let (nh, nope, rd, vd, r) = (self.heads, self.nope, self.rope_dim, self.v_dim, self.kv_lora_rank);
        let qk = nope + rd;
        let hook = |h| HookPoint::Layer(layer, h);
        let q_latent = self.q_a_layernorm.forward(&self.q_a_proj.forward(x)?)?; // [B, 1, q_lora_rank]
        emit(obs, hook(LayerHook::QLatent), || Ok(q_latent.clone()))?;
        let mut q = self.q_b_proj.forward(&q_latent)?.flatten_all()?.to_vec1::<f32>()?; // [B, 1, nh, qk]
        rope.apply(&mut q, 1, nh, qk, nope);
        let q = Tensor::from_vec(q, (b, nh, 1, qk), &Device::Cpu)?; // [B, nh, 1, qk]

        let ckv = self.kv_a_proj_with_mqa.forward(x)?; // [B, 1, r + rope]
        let kv_latent = self.kv_a_layernorm.forward(&ckv.narrow(D::Minus1, 0, r)?)?; // [B, 1, r]
        emit(obs, hook(LayerHook::KvLatent), || Ok(kv_latent.clone()))?;
        let mut k_rope = ckv.narrow(D::Minus1, r, rd)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        rope.apply(&mut k_rope, 1, 1, rd, 0);
        let k_rope = Tensor::from_vec(k_rope, (b, 1, rd), &Device::Cpu)?; // [B, 1, rope]
        let latents = append(&mut cache.kv_latent, kv_latent)?; // [B, T, r]
        let k_ropes = append(&mut cache.k_rope, k_rope)?; // [B, T, rope]
        let t = latents.dims()[1];

        // DSA over the cached index keys: the newest query sees every cached position.
        match &self.indexer {
            Indexer::Full(w) => {
                let mut qi = w.wq_b.forward(&q_latent)?.flatten_all()?.to_vec1::<f32>()?; // [B, 1, n, d]
                rope.apply(&mut qi, 1, w.n_heads, w.head_dim, 0);
                let qi = Tensor::from_vec(qi, (b, w.n_heads, 1, w.head_dim), &Device::Cpu)?;
                let mut ki = w.k_norm.forward(&w.wk.forward(x)?)?.flatten_all()?.to_vec1::<f32>()?; // [B, 1, d]
                rope.apply(&mut ki, 1, 1, w.head_dim, 0);
                let keys = append(&mut cache.index_keys, Tensor::from_vec(ki, (b, 1, w.head_dim), &Device::Cpu)?)?;
                let per_head =
                    (qi.broadcast_matmul(&keys.unsqueeze(1)?.t()?)? * (w.head_dim as f64).powf(-0.5))?.relu()?; // [B, n, 1, T]
                let wts = (w.weights_proj.forward(x)? * (w.n_heads as f64).powf(-0.5))?; // [B, 1, n]
                let scores = per_head.broadcast_mul(&wts.transpose(1, 2)?.unsqueeze(3)?)?.sum(1)?; // [B, 1, T]
                                                                                                   // The newest query's causal keys are all T cached ones: keep the top min(index_topk, T).
                let v = scores.flatten_all()?.to_vec1::<f32>()?;
                let k = w.topk.min(t);
                let (mut idx, mut margin, mut order) = (Vec::with_capacity(b * k), Vec::with_capacity(b), Vec::new());
                for row in v.chunks_exact(t) {
                    margin.push(top_k_keys(row, k, &mut order));
                    idx.extend_from_slice(&order);
                }
                *sel = Some(Selection { batch: b, seq: 1, k, idx, margin });
            }
            Indexer::Shared if sel.is_some() => {}
            Indexer::Shared => {
                return Err(Error::Usage("a shared indexer layer has no earlier full layer to reuse".into()))
            }
        }
        let selection = sel.as_ref().ok_or_else(|| Error::Usage("no DSA selection".into()))?;
        emit(obs, hook(LayerHook::DsaTopk), || selection.to_tensor())?;
        let mut mask = vec![f32::NEG_INFINITY; b * t];
        for bi in 0..b {
            for &j in selection.row(bi, 0) {
                if j < t {
                    mask[bi * t + j] = 0.0;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, 1, t), &Device::Cpu)?;

        let (w_uk, w_uv_t) = self.absorbed()?; // [nh, nope, r], [nh, r, v]
        let q_nope = q.narrow(D::Minus1, 0, nope)?.contiguous()?; // [B, nh, 1, nope]
        let q_rope = q.narrow(D::Minus1, nope, rd)?.contiguous()?; // [B, nh, 1, rope]
        let q_abs = q_nope.broadcast_matmul(w_uk)?; // [B, nh, 1, r]
        let latents4 = latents.unsqueeze(1)?; // [B, 1, T, r]
        let scores =
            (q_abs.broadcast_matmul(&latents4.t()?)? + q_rope.broadcast_matmul(&k_ropes.unsqueeze(1)?.t()?)?)?;
        let probs = softmax_last(&(scores * self.scale)?.broadcast_add(&mask)?)?; // [B, nh, 1, T]
        let mixed = probs.broadcast_matmul(&latents4)?; // [B, nh, 1, r]
        let o = mixed.broadcast_matmul(w_uv_t)?; // [B, nh, 1, v]
        let o = o.transpose(1, 2)?.reshape((b, 1, nh * vd))?; // [B, 1, nh * v]
        let out = self.o_proj.forward(&o)?;
        emit(obs, hook(LayerHook::AttnOut), || Ok(out.clone()))?;
        Ok(out)
    }
}

impl DecoderLayer {
    fn decode(
        &self,
        h: &Tensor,
        rope: &RopeTables,
        cache: &mut LayerCache,
        sel: &mut Option<Selection>,
        obs: &mut dyn Observer,
    ) -> Result<Tensor> {
        let x = self.input_layernorm.forward(h)?; // [B, 1, hidden]
        emit(obs, HookPoint::Layer(self.index, LayerHook::InputNorm), || Ok(x.clone()))?;
        let h = (h + self.self_attn.decode(self.index, &x, rope, cache, sel, obs)?)?;
        self.feed_forward(&h, obs)
    }
}

impl Model {
    /// One decode step: the next token of every batch row (`tokens` is B x 1) at position
    /// `cache.len`; returns its logits [B, 1, vocab] and extends the cache.
    pub fn decode_step(&self, tokens: &Tokens, cache: &mut KvCache, obs: &mut dyn Observer) -> Result<Tensor> {
        if tokens.seq != 1 {
            return Err(Error::Usage("decode takes one token per batch row".into()));
        }
        let pos = cache.len;
        let rope = self.rotary.tables(&[pos]);
        let mut h = self.embed(tokens, &mut NoObserver)?;
        let mut sel = None;
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.decode(&h, &rope, c, &mut sel, obs)?;
        }
        cache.len += 1;
        self.head(&h, obs)
    }

    /// Runs `tokens` ([B, S]) through the cache one position at a time: logits [B, S, vocab].
    pub fn decode_all(&self, tokens: &Tokens) -> Result<Tensor> {
        let mut cache = KvCache::new(self.layers.len());
        let mut out = Vec::with_capacity(tokens.seq);
        for s in 0..tokens.seq {
            let col: Vec<u32> = (0..tokens.batch).map(|b| tokens.ids[b * tokens.seq + s]).collect();
            out.push(self.decode_step(&Tokens::new(tokens.batch, 1, col)?, &mut cache, &mut NoObserver)?);
        }
        Ok(Tensor::cat(&out, 1)?)
    }
}

impl Model {
    /// Greedy generation: the prompt goes through the cache token by token, then every step feeds
    /// back each row's argmax. `on_step(step, tokens)` sees each step's tokens as soon as they are
    /// chosen; returns every row's generated tokens.
    pub fn generate(
        &self,
        prompt: &Tokens,
        new: usize,
        mut on_step: impl FnMut(usize, &[u32]) -> Result<()>,
    ) -> Result<Vec<Vec<u32>>> {
        let (b, s) = (prompt.batch, prompt.seq);
        let mut cache = KvCache::new(self.layers.len());
        let argmax = |logits: &Tensor| -> Result<Vec<u32>> {
            let rows = logits.squeeze(1)?.to_vec2::<f32>()?; // [B, vocab]
            Ok(rows
                .iter()
                .map(|r| r.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map_or(0, |(i, _)| i as u32))
                .collect())
        };
        let mut logits = None;
        for p in 0..s {
            let col: Vec<u32> = (0..b).map(|r| prompt.ids[r * s + p]).collect();
            logits = Some(self.decode_step(&Tokens::new(b, 1, col)?, &mut cache, &mut NoObserver)?);
        }
        let mut next = argmax(&logits.ok_or_else(|| Error::Usage("empty prompt".into()))?)?;
        let mut generated = vec![Vec::with_capacity(new); b];
        for step in 0..new {
            for (row, &t) in generated.iter_mut().zip(&next) {
                row.push(t);
            }
            on_step(step, &next)?;
            if step + 1 < new {
                next = argmax(&self.decode_step(&Tokens::new(b, 1, next.clone())?, &mut cache, &mut NoObserver)?)?;
            }
        }
        Ok(generated)
    }
}
