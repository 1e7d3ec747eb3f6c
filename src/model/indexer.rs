//! The DeepSeek Sparse Attention indexer: a light scorer that picks, for every query, the
//! `index_topk` causal keys MLA is allowed to attend to. A `Full` layer scores keys itself; a
//! `Shared` layer (GLM-5.2's `indexer_types`) has no weights and reuses the selection of the
//! previous full layer.
//!
//! `score[s,t] = Σ_h w[s,h] · relu(qi[s,h] · ki[t] / sqrt(index_head_dim))`, with
//! `qi = wq_b(q_latent)`, `ki = k_norm(wk(x))` (one head), both split `[rope | nope]` (rope first,
//! unlike MLA) with interleaved RoPE on the rope slice, and `w = weights_proj(x) / sqrt(n_heads)`.
//! The DeepSeek reference also applies a Hadamard rotation and FP8 quantisation to q and k; the
//! rotation does not change dot products and transformers skips both, so do we.

use candle_core::{Device, Tensor};

use super::attention::{index_scores, index_topk};
use super::decode::Positions;
use super::nn::{LayerNorm, Linear};
use super::rope::RopeTables;
use crate::checkpoint::Loader;
use crate::config::{Config, IndexerKind};
use crate::error::{Error, Result};
use crate::hooks::{emit, HookPoint, LayerHook, Observer};

pub enum Indexer {
    Full(Box<IndexerWeights>),
    Shared,
}

pub struct IndexerWeights {
    pub wq_b: Linear,         // [n_heads * head_dim, q_lora_rank]
    pub wk: Linear,           // [head_dim, hidden]
    pub k_norm: LayerNorm,    // [head_dim], eps 1e-6
    pub weights_proj: Linear, // [n_heads, hidden]
    pub(crate) n_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) topk: usize,
}

/// The keys each query may attend to: `k` positions per (batch, query) row. Rows of queries with
/// fewer than `k` causal keys are padded with positions `> s` (ignored by attention), as the
/// reference's top-k over a causally masked row is.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub batch: usize,
    pub seq: usize,
    pub k: usize,
    pub idx: Vec<usize>, // [batch, seq, k]
    /// Score of the K-th minus the (K+1)-th causal key per row [batch, seq]; +inf where every
    /// causal key is kept (no cut), NaN for a selection that came from outside (a replay).
    pub margin: Vec<f32>,
}

impl Selection {
    /// A selection recorded as I64 `[B, S, K]` (a dump's `dsa.topk`), to replay; None for another
    /// shape. Out-of-range entries can only be padding: they map past every query, so the mask
    /// drops them. Margins are unknown (NaN).
    pub fn from_i64(idx: &[i64], shape: &[usize]) -> Option<Selection> {
        let [batch, seq, k] = shape[..] else { return None };
        let idx = idx.iter().map(|&i| usize::try_from(i).unwrap_or(usize::MAX).min(seq)).collect();
        Some(Selection { batch, seq, k, idx, margin: vec![f32::NAN; batch * seq] })
    }

    pub fn row(&self, b: usize, s: usize) -> &[usize] {
        let r = (b * self.seq + s) * self.k;
        &self.idx[r..r + self.k]
    }

    /// The dump's `layers.{i}.dsa.topk`: I64 [B, S, K].
    pub fn to_tensor(&self) -> Result<Tensor> {
        let v: Vec<i64> = self.idx.iter().map(|&i| i as i64).collect();
        Ok(Tensor::from_vec(v, (self.batch, self.seq, self.k), &Device::Cpu)?)
    }
}

impl Indexer {
    pub fn load(l: &mut Loader, cfg: &Config, layer: usize) -> Self {
        if cfg.indexer_kind(layer) == IndexerKind::Shared {
            return Indexer::Shared;
        }
        let p = format!("model.layers.{layer}.self_attn.indexer");
        let (n, d, h) = (cfg.index_n_heads, cfg.index_head_dim, cfg.hidden_size);
        Indexer::Full(Box::new(IndexerWeights {
            wq_b: Linear::load(l, &format!("{p}.wq_b"), n * d, cfg.q_lora_rank, false),
            wk: Linear::load(l, &format!("{p}.wk"), d, h, false),
            k_norm: LayerNorm::load(l, &format!("{p}.k_norm"), d, 1e-6),
            weights_proj: Linear::load(l, &format!("{p}.weights_proj"), n, h, false),
            n_heads: n,
            head_dim: d,
            topk: cfg.index_topk,
        }))
    }

    /// Updates `sel` with this layer's selection: a full layer computes a new one, a shared layer
    /// keeps the previous full layer's. `keys` is the decode cache of index keys (the new ones are
    /// appended and the queries score every cached position); None scores the queries' own keys.
    #[allow(clippy::too_many_arguments)]
    pub fn select(
        &self,
        layer: usize,
        x: &Tensor,
        q_latent: &Tensor,
        rope: &RopeTables,
        keys: Option<&mut Positions>,
        sel: &mut Option<Selection>,
        obs: &mut dyn Observer,
    ) -> Result<()> {
        match self {
            Indexer::Full(w) => {
                let (b, s, _) = x.dims3()?;
                let IndexInputs { q, k: new_keys, w: hw } = w.inputs(x, q_latent, rope)?;
                // Without a cache the queries score their own keys, laid out as a cache holds them.
                let own;
                let keys = match keys {
                    Some(cache) => {
                        cache.append(&new_keys, b, s)?;
                        cache
                    }
                    None => {
                        own = Positions::of(new_keys, b, s)?;
                        &own
                    }
                };
                let (k, t) = (keys.data(), keys.len()); // [T, B, d]
                let (dims, scale) = ([b, s, t, w.n_heads, w.head_dim], (w.head_dim as f64).powf(-0.5) as f32);
                // The [B, S, T] scores are held whole only when they are recorded.
                let point = HookPoint::Layer(layer, LayerHook::DsaScores);
                let selection = if obs.wants(point) {
                    let scores = index_scores(&q, k, &hw, dims, scale); // [B, S, T], -inf past each query
                    emit(obs, point, || Ok(Tensor::from_vec(scores.clone(), (b, s, t), &Device::Cpu)?))?;
                    top_k_causal(&scores, b, s, t - s, w.topk)
                } else {
                    index_topk(&q, k, &hw, dims, scale, w.topk)
                };
                emit(obs, HookPoint::Layer(layer, LayerHook::DsaMargin), || {
                    Ok(Tensor::from_vec(selection.margin.clone(), (b, s), &Device::Cpu)?)
                })?;
                *sel = Some(selection);
                Ok(())
            }
            Indexer::Shared if sel.is_some() => Ok(()),
            Indexer::Shared => Err(Error::Usage("a shared indexer layer has no earlier full layer to reuse".into())),
        }
    }
}

/// What the indexer's scores are computed from, flat (`IndexerWeights::inputs`).
pub struct IndexInputs {
    pub q: Vec<f32>, // [B, S, n, d], roped
    pub k: Vec<f32>, // [B, S, d], roped: the queries' own keys
    pub w: Vec<f32>, // [B, S, n]: weights_proj(x) / sqrt(n)
}

impl IndexerWeights {
    /// The inputs of the scores for the tokens in `x`.
    pub fn inputs(&self, x: &Tensor, q_latent: &Tensor, rope: &RopeTables) -> Result<IndexInputs> {
        let s = x.dims3()?.1;
        let (n, d) = (self.n_heads, self.head_dim);
        let mut q = self.wq_b.forward(q_latent)?.flatten_all()?.to_vec1::<f32>()?; // [B, S, n, d]
        rope.apply(&mut q, s, n, d, 0);
        let mut k = self.k_norm.forward(&self.wk.forward(x)?)?.flatten_all()?.to_vec1::<f32>()?; // [B, S, d]
        rope.apply(&mut k, s, 1, d, 0);
        let w = (self.weights_proj.forward(x)? * (n as f64).powf(-0.5))?; // [B, S, n]
        Ok(IndexInputs { q, k, w: w.flatten_all()?.to_vec1::<f32>()? })
    }
}

/// Top `min(topk, T)` keys per query among causal keys, highest score first (ties by position),
/// for queries at positions `offset..offset + seq` over `T = offset + seq` keys (`scores` is
/// [batch, seq, T]). Queries with fewer causal keys are padded with the positions after them.
pub fn top_k_causal(scores: &[f32], batch: usize, seq: usize, offset: usize, topk: usize) -> Selection {
    let t = offset + seq;
    let k = topk.min(t);
    let mut idx = Vec::with_capacity(batch * seq * k);
    let mut margin = Vec::with_capacity(batch * seq);
    let mut order: Vec<usize> = Vec::with_capacity(t);
    for (r, row) in scores[..batch * seq * t].chunks_exact(t).enumerate() {
        margin.push(select_row(row, offset + r % seq, k, &mut order, &mut idx));
    }
    Selection { batch, seq, k, idx, margin }
}

/// One query's row of a selection: the `k` best of its scores at keys `0..=p` (`row` may hold
/// more), padded with the positions after `p` when it has fewer, appended to `idx`; returns the
/// margin (`top_k_keys`).
pub fn select_row(row: &[f32], p: usize, k: usize, order: &mut Vec<usize>, idx: &mut Vec<usize>) -> f32 {
    let margin = top_k_keys(&row[..=p], k, order);
    order.extend(p + 1..(p + 1).max(k)); // padding past the causal limit
    idx.extend_from_slice(order);
    margin
}

/// The `k` best of `scores` (one query's causal keys), best first (ties by position), into
/// `order`; returns the margin at the cut, K-th minus (K+1)-th, or +inf when all are kept.
pub fn top_k_keys(scores: &[f32], k: usize, order: &mut Vec<usize>) -> f32 {
    order.clear();
    order.extend(0..scores.len());
    if scores.len() <= k {
        return f32::INFINITY;
    }
    // Descending by score; NaN sorts last so it is never preferred. The order is total (ties by
    // position), so partitioning at k and sorting only the first k gives the full sort's prefix.
    let cmp = |&x: &usize, &y: &usize| {
        scores[y].partial_cmp(&scores[x]).unwrap_or_else(|| scores[x].is_nan().cmp(&scores[y].is_nan())).then(x.cmp(&y))
    };
    order.select_nth_unstable_by(k, cmp);
    order[..k].sort_by(cmp);
    let margin = scores[order[k - 1]] - scores[order[k]];
    order.truncate(k);
    margin
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Early queries have fewer than K causal keys: they keep all of them, padded with later
    /// positions that the attention mask then ignores.
    #[test]
    fn dsa_mask_at_positions_with_fewer_than_k_keys() {
        let seq = 5;
        // score of key t for every query: higher for t = 1 and t = 3.
        let row = [0.1f32, 0.9, 0.2, 0.8, 0.3];
        let scores: Vec<f32> = (0..seq).flat_map(|_| row).collect();
        let sel = top_k_causal(&scores, 1, seq, 0, 3);
        assert_eq!(sel.row(0, 0), &[0, 1, 2]); // 1 causal key + padding
        assert_eq!(sel.row(0, 1), &[0, 1, 2]); // 2 causal keys + padding
        assert_eq!(sel.row(0, 2), &[0, 1, 2]); // exactly K causal keys
        assert_eq!(sel.row(0, 3), &[1, 3, 2]); // K of 4: key 0 dropped
        assert_eq!(sel.row(0, 4), &[1, 3, 4]);
        // The margin is K-th minus (K+1)-th causal score; no cut means +inf.
        assert_eq!(sel.margin[..3], [f32::INFINITY; 3]);
        approx::assert_abs_diff_eq!(sel.margin[3], 0.2 - 0.1);
        approx::assert_abs_diff_eq!(sel.margin[4], 0.3 - 0.2);
    }

    #[test]
    fn shared_indexer_reuses_the_previous_selection() {
        let rope = RopeTables { half: 0, cos: vec![], sin: vec![] };
        let x = Tensor::zeros((1, 2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let prev = Selection { batch: 1, seq: 2, k: 1, idx: vec![0, 1], margin: vec![f32::INFINITY, 0.5] };
        let mut sel = Some(prev.clone());
        let obs = &mut crate::hooks::NoObserver;
        Indexer::Shared.select(3, &x, &x, &rope, None, &mut sel, obs).unwrap();
        assert_eq!(sel, Some(prev));
        let mut none = None;
        assert!(Indexer::Shared.select(0, &x, &x, &rope, None, &mut none, obs).is_err());
    }
}
