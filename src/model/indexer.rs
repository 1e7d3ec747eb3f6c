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
use rayon::prelude::*;

use super::attention::{abt, View, BLOCK};
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
/// fewer than `k` causal keys are padded with positions after the query's own (ignored by
/// attention), where the reference's top-k over a causally masked row takes masked positions of
/// its own choosing: the same attention, and the padding is no key either way.
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

    /// Every causal key of every query, as a top-k of `k = T` keys keeps them whatever the
    /// scores: row `p` is `0..k`, keys `0..=p` then padding past the query, margins +inf. The same
    /// rows [`top_k_causal`] gives when no query has more than `k` causal keys.
    pub fn every_key(batch: usize, seq: usize, k: usize) -> Selection {
        let idx = (0..batch * seq).flat_map(|_| 0..k).collect();
        Selection { batch, seq, k, idx, margin: vec![f32::INFINITY; batch * seq] }
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
                let point = HookPoint::Layer(layer, LayerHook::DsaScores);
                let t = keys.as_ref().map_or(0, |cache| cache.len()) + s; // the keys the last query sees
                let selection = if w.keeps_every_key(t) && !obs.wants(point) {
                    // No query sees more keys than it may keep: whatever the scores, each keeps
                    // every causal key. Only a cache needs the new keys, for the steps after.
                    if let Some(cache) = keys {
                        cache.append(&w.keys(x, rope)?, b, s)?;
                    }
                    Selection::every_key(b, s, t)
                } else {
                    let new_keys = w.keys(x, rope)?;
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
                    w.score_and_select((x, q_latent, rope), (keys.data(), keys.len()), point, obs)?
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

impl IndexerWeights {
    /// Whether a query over `t` keys keeps every causal one whatever its scores (`t <= topk`),
    /// as every query of a prompt no longer than `index_topk` does.
    pub fn keeps_every_key(&self, t: usize) -> bool {
        t <= self.topk
    }

    /// The queries' scores over the `t` cached keys `k` ([T, B, d]) and their top-k; the scores
    /// are held whole only when `point` (`dsa.scores`) is recorded.
    fn score_and_select(
        &self,
        (x, q_latent, rope): (&Tensor, &Tensor, &RopeTables),
        (k, t): (&[f32], usize),
        point: HookPoint,
        obs: &mut dyn Observer,
    ) -> Result<Selection> {
        let (b, s, _) = x.dims3()?;
        let (q, hw) = self.queries(x, q_latent, rope)?;
        let (dims, scale) = ([b, s, t, self.n_heads, self.head_dim], (self.head_dim as f64).powf(-0.5) as f32);
        if !obs.wants(point) {
            return Ok(index_topk(&q, k, &hw, dims, scale, self.topk));
        }
        let scores = index_scores(&q, k, &hw, dims, scale); // [B, S, T], -inf past each query
        emit(obs, point, || Ok(Tensor::from_vec(scores.clone(), (b, s, t), &Device::Cpu)?))?;
        Ok(top_k_causal(&scores, b, s, t - s, self.topk))
    }

    /// The index keys of the tokens in `x`: `k_norm(wk(x))`, roped -> [B, S, d].
    pub fn keys(&self, x: &Tensor, rope: &RopeTables) -> Result<Vec<f32>> {
        let s = x.dims3()?.1;
        let mut k = self.k_norm.forward(&self.wk.forward(x)?)?.flatten_all()?.to_vec1::<f32>()?; // [B, S, d]
        rope.apply(&mut k, s, 1, self.head_dim, 0);
        Ok(k)
    }

    /// The index queries of the tokens in `x` and their heads' weights: `wq_b(q_latent)`, roped
    /// -> [B, S, n, d], and `weights_proj(x) / sqrt(n)` -> [B, S, n].
    pub fn queries(&self, x: &Tensor, q_latent: &Tensor, rope: &RopeTables) -> Result<(Vec<f32>, Vec<f32>)> {
        let s = x.dims3()?.1;
        let (n, d) = (self.n_heads, self.head_dim);
        let mut q = self.wq_b.forward(q_latent)?.flatten_all()?.to_vec1::<f32>()?; // [B, S, n, d]
        rope.apply(&mut q, s, n, d, 0);
        let w = (self.weights_proj.forward(x)? * (n as f64).powf(-0.5))?; // [B, S, n]
        Ok((q, w.flatten_all()?.to_vec1::<f32>()?))
    }
}

/// Top `min(topk, T)` keys per query among causal keys, highest score first (ties by position;
/// a row that keeps every causal key lists them by position),
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

/// The `k` best of `scores` (one query's causal keys), best first (ties by position; all of them,
/// by position, where there are no more than `k`), into `order`; returns the margin at the cut,
/// K-th minus (K+1)-th, or +inf when all are kept.
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

/// The sizes of one indexer call: `[batch, S, T, n_heads, head_dim]`.
pub(crate) type IndexDims = [usize; 5];

/// The indexer's scores, `Σ_h w[s, h] · relu(scale · q[s, h] · k[t])`, at every causal key and
/// `-inf` past it. q: [B, S, n, d] (roped); k: [T, B, d] (roped, position-major as the decode cache
/// holds them; the last S are the queries' own); w: [B, S, n] -> [B, S, T]. Heads are summed in order.
pub(crate) fn index_scores(q: &[f32], k: &[f32], w: &[f32], dims: IndexDims, scale: f32) -> Vec<f32> {
    let [batch, s, t, ..] = check_index(q, k, w, dims);
    let mut out = vec![0f32; batch * s * t];
    if !out.is_empty() {
        out.par_chunks_mut(s * t).enumerate().for_each(|(b, rows)| {
            rows.par_chunks_mut(BLOCK * t).enumerate().for_each(|(blk, out)| {
                index_block(q, k, w, dims, scale, b, blk * BLOCK, out);
            });
        });
    }
    out
}

/// [`index_scores`]' top `topk` causal keys per query (`top_k_causal`), one block of queries'
/// scores at a time: the `[B, S, T]` scores are never whole.
pub(crate) fn index_topk(q: &[f32], k: &[f32], w: &[f32], dims: IndexDims, scale: f32, topk: usize) -> Selection {
    let [batch, s, t, ..] = check_index(q, k, w, dims);
    let kk = topk.min(t);
    let tasks: Vec<(usize, usize)> = (0..batch).flat_map(|b| (0..s.div_ceil(BLOCK)).map(move |blk| (b, blk))).collect();
    let parts: Vec<(Vec<usize>, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(b, blk)| {
            let (i0, m) = (blk * BLOCK, BLOCK.min(s - blk * BLOCK));
            let mut scores = vec![0f32; m * t];
            index_block(q, k, w, dims, scale, b, i0, &mut scores);
            let (mut idx, mut margin, mut order) = (Vec::with_capacity(m * kk), Vec::with_capacity(m), Vec::new());
            for (i, row) in scores.chunks_exact(t).enumerate() {
                margin.push(select_row(row, t - s + i0 + i, kk, &mut order, &mut idx));
            }
            (idx, margin)
        })
        .collect();
    let (idx, margin): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
    Selection { batch, seq: s, k: kk, idx: idx.concat(), margin: margin.concat() }
}

fn check_index(q: &[f32], k: &[f32], w: &[f32], dims: IndexDims) -> IndexDims {
    let [batch, s, t, n, d] = dims;
    assert!(q.len() == batch * s * n * d && k.len() == batch * t * d && w.len() == batch * s * n && t >= s);
    dims
}

/// The scores of batch row `b`'s queries `i0..i0 + m` into `out` ([m, T], `m` from its length).
#[allow(clippy::too_many_arguments)]
fn index_block(
    q: &[f32],
    k: &[f32],
    w: &[f32],
    [batch, s, t, n, d]: IndexDims,
    scale: f32,
    b: usize,
    i0: usize,
    out: &mut [f32],
) {
    let (m, offset) = (out.len() / t, t - s);
    let tb = offset + i0 + m; // the keys any query of the block may see
    let keys = View::at(k, b * d, [tb, d, batch * d]);
    let q0 = (b * s + i0) * n * d;
    // A block of few queries (a decode step: one query, 32 heads) scores all its heads in one
    // product, its (query, head) rows being one after another: one pass over the keys instead of
    // one per head. A block of many scores a head at a time, so its scratch stays [m, tb].
    let heads = if m * n <= BLOCK { n } else { 1 };
    let mut scores = vec![0f32; m * heads * tb]; // [m, heads, tb]
    for h0 in (0..n).step_by(heads) {
        let rows = match heads {
            1 => View::at(q, q0 + h0 * d, [m, d, n * d]),
            _ => View::at(q, q0, [m * n, d, d]),
        };
        abt(&mut scores, tb, rows, keys, scale, false);
        for (i, (acc, scores)) in out.chunks_exact_mut(t).zip(scores.chunks_exact(heads * tb)).enumerate() {
            let causal = offset + i0 + i + 1;
            for (h, scores) in (h0..h0 + heads).zip(scores.chunks_exact(tb)) {
                let wi = w[(b * s + i0 + i) * n + h];
                for (a, &x) in acc[..causal].iter_mut().zip(&scores[..causal]) {
                    // relu that keeps a NaN, as torch's does
                    let term = wi * if x < 0.0 { 0.0 } else { x };
                    *a = if h == 0 { term } else { *a + term };
                }
            }
        }
    }
    for (i, acc) in out.chunks_exact_mut(t).enumerate() {
        acc[offset + i0 + i + 1..].fill(f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::tests::values;

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

    /// While no query sees more than K keys, the top-k of any scores (NaN and ties among them)
    /// is the selection of every key, positions and margins alike: what the indexer returns then
    /// without scoring.
    #[test]
    fn every_key_is_what_any_scores_select_up_to_k_keys() {
        for (batch, s, offset) in [(1, 1, 0), (2, 7, 0), (2, 3, 4)] {
            let t = offset + s;
            let mut scores = values(batch * s * t, 0.5);
            let n = scores.len();
            scores[0] = f32::NAN;
            scores[n - 1] = scores[n.saturating_sub(2)];
            for topk in [t, t + 3] {
                assert_eq!(
                    top_k_causal(&scores, batch, s, offset, topk),
                    Selection::every_key(batch, s, t),
                    "{s} {topk}"
                );
            }
        }
    }

    #[test]
    fn shared_indexer_reuses_the_previous_selection() {
        let rope = RopeTables { half: 0, cos: vec![], sin: vec![], pairs: crate::model::rope::Pairs::Interleaved };
        let x = Tensor::zeros((1, 2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let prev = Selection { batch: 1, seq: 2, k: 1, idx: vec![0, 1], margin: vec![f32::INFINITY, 0.5] };
        let mut sel = Some(prev.clone());
        let obs = &mut crate::hooks::NoObserver;
        Indexer::Shared.select(3, &x, &x, &rope, None, &mut sel, obs).unwrap();
        assert_eq!(sel, Some(prev));
        let mut none = None;
        assert!(Indexer::Shared.select(0, &x, &x, &rope, None, &mut none, obs).is_err());
    }

    /// Against the formula in f64, with negative terms (the relu), batch 2 (keys position-major),
    /// keys cached before the queries, and sequences off the block size; -inf exactly past each
    /// query's position.
    #[test]
    fn index_scores_sum_the_heads_relu_at_causal_keys() {
        for (s, offset) in [(1, 0), (45, 0), (2 * BLOCK + 1, 9)] {
            let (batch, n, d) = (2, 3, 8);
            let t = offset + s;
            let (q, k, w) = (values(batch * s * n * d, 0.25), values(batch * t * d, 1.25), values(batch * s * n, 2.25));
            let ours = index_scores(&q, &k, &w, [batch, s, t, n, d], 0.35);
            for (r, row) in ours.chunks_exact(t).enumerate() {
                let (b, i) = (r / s, r % s);
                for (j, &x) in row.iter().enumerate() {
                    if j > offset + i {
                        assert_eq!(x, f32::NEG_INFINITY, "row {r} key {j}");
                        continue;
                    }
                    let want: f64 = (0..n)
                        .map(|h| {
                            let qh = &q[((b * s + i) * n + h) * d..][..d];
                            let dot: f64 =
                                qh.iter().zip(&k[(j * batch + b) * d..]).map(|(&a, &c)| a as f64 * c as f64).sum();
                            w[(b * s + i) * n + h] as f64 * (dot * 0.35).max(0.0)
                        })
                        .sum();
                    assert!((x as f64 - want).abs() < 1e-5, "row {r} key {j}: {x} against {want}");
                }
            }
        }
    }

    /// The blocked selection is the selection of the whole scores, bit for bit (positions and
    /// margins), with cuts and without, off the block size, after cached keys, in batch 2.
    #[test]
    fn index_topk_selects_what_the_whole_scores_select() {
        for (s, offset, topk) in [(1, 0, 3), (45, 0, 64), (2 * BLOCK + 5, 0, 7), (40, 11, 9)] {
            let (batch, n, d) = (2, 3, 8);
            let t = offset + s;
            let (q, k, w) = (values(batch * s * n * d, 0.75), values(batch * t * d, 1.75), values(batch * s * n, 2.75));
            let dims = [batch, s, t, n, d];
            let whole = top_k_causal(&index_scores(&q, &k, &w, dims, 0.35), batch, s, offset, topk);
            let blocked = index_topk(&q, &k, &w, dims, 0.35, topk);
            assert_eq!((blocked.batch, blocked.seq, blocked.k, &blocked.idx), (batch, s, whole.k, &whole.idx));
            let bits = |m: &[f32]| m.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&blocked.margin), bits(&whole.margin), "S {s}, offset {offset}, top {topk}");
        }
    }
}
