//! The absorbed form of MLA attention: `kv_b_proj` folded into each query and its output, so a
//! query reads the 576-value latents and rope keys of the keys it keeps (`q_abs = q_nope · W_UK`,
//! scores `q_abs · latent + q_rope · k_rope`, `o = W_UV · Σ p · latent`) instead of every key's
//! expanded keys and values. Decode steps and chunks take it (their cache holds latents), and so
//! do a long prefill's later queries, from where it costs fewer products ([`absorbed_from`]): a
//! query and its heads gather the latents of just the keys the query keeps
//! ([`attend_gathered`]), so past the crossover attention's work grows with the prompt, not its
//! square. The expanded form, and the products both are made of, are in attention.rs.

use rayon::prelude::*;

use super::attention::{ab, attend, Dims, View, BLOCK};
use super::indexer::Selection;

/// Where a prefill's queries switch to the absorbed form: the first block start (a multiple of
/// [`BLOCK`], or `S`) whose first query's kept keys cost no more multiply-adds through the latent
/// than its causal keys expanded. Per head, a query at position `p` keeping `n = min(k, p + 1)`:
/// - expanded: `(p + 1)·(nope + rope + v)` (its scores and values over every causal key, the
///   dropped ones masked) + `r·(nope + v)` (its own position's keys and values from `kv_b_proj`);
/// - absorbed: `nope·r` (the query into the latent) + `n·(2r + rope)` (scores and mix over its
///   kept keys) + `r·v` (the mix out of the latent).
///
/// The first grows with `p` and the second stops growing at `n = k`, so past one point every
/// query is cheaper absorbed: from 4,352 at GLM-5's sizes (`r` 512, `k` 2048), where an 8k-token
/// prefill then does 1.25x fewer attention products and a 16k-token one 2x by this count (the
/// indexer's scores stay quadratic). The count takes the expanded form to score every causal
/// key, which its blocks do unless their queries keep mostly the same keys (`attention::Keys`);
/// measured (docs/performance.md), the time is flat from 2048 to this crossover.
/// `GLIMPSE_ABSORBED_FROM=P` moves the switch to `P` (rounded up to a block): `0` runs every query
/// absorbed, which is how CI takes the golden cases through this form.
pub(crate) fn absorbed_from(d: Dims, rank: usize, topk: usize) -> Result<usize, String> {
    let from = absorbed_override()?.unwrap_or_else(|| crossover(d, rank, topk));
    Ok(from.checked_next_multiple_of(BLOCK).unwrap_or(d.seq).min(d.seq))
}

/// `GLIMPSE_ABSORBED_FROM`, when set and not empty: the binary checks it before any work, so a
/// bad value is refused at once, not after a checkpoint has loaded.
pub fn absorbed_override() -> Result<Option<usize>, String> {
    match std::env::var("GLIMPSE_ABSORBED_FROM").ok().filter(|p| !p.trim().is_empty()) {
        Some(p) => p.trim().parse().map(Some).map_err(|_| format!("GLIMPSE_ABSORBED_FROM={p}: not a position")),
        None => Ok(None),
    }
}

/// [`absorbed_from`]'s cost model alone, solved for the first position: with `p` keys seen, the
/// expanded form costs minus the absorbed one `p·(nope + v - 2r)` while `p <= k` (the terms in
/// `r` alone cancel) and `p·(nope + rope + v) - k·(2r + rope)` after.
fn crossover(d: Dims, rank: usize, topk: usize) -> usize {
    let Dims { seq: s, keys: t, nope, rope, v, .. } = d;
    // Saturating: the sizes are a config.json's.
    let keys = match nope.saturating_add(v) >= rank.saturating_mul(2) {
        true => 1, // a latent narrower than a head's keys and values: absorbed from the start
        false => {
            let absorbed = topk.saturating_mul(rank.saturating_mul(2).saturating_add(rope));
            topk.saturating_add(1).max(absorbed.div_ceil(nope.saturating_add(rope).saturating_add(v).max(1)))
        }
    };
    // The block whose first query (at offset + i0, seeing offset + i0 + 1 keys) sees enough.
    let i0 = keys.saturating_sub(t - s + 1);
    i0.checked_next_multiple_of(BLOCK).unwrap_or(s).min(s)
}

/// The absorbed form of a prefill's later queries: `kv_b_proj` folded into each query and output
/// as in a decode step (decode.rs), so a query reads the 576-value latent and rope key of just the
/// keys it keeps, gathered, instead of every causal key's expanded keys and values.
pub(crate) struct Absorbed<'a> {
    /// The first query in this form, a multiple of [`BLOCK`] ([`absorbed_from`]).
    pub from: usize,
    /// The latents, `kv_a_layernorm`'s output: [B, T, r].
    pub latents: &'a [f32],
    /// `kv_b_proj` split per head: W_UK [nh, nope, r] into the query, W_UV^T [nh, r, v] out.
    pub w_uk: &'a [f32],
    pub w_uv_t: &'a [f32],
    pub rank: usize,
}

impl Absorbed<'_> {
    pub(super) fn fits(&self, d: Dims) -> bool {
        let (r, nh) = (self.rank, d.heads);
        self.from.is_multiple_of(BLOCK)
            && self.from <= d.seq
            && self.latents.len() == d.batch * d.keys * r
            && self.w_uk.len() == nh * d.nope * r
            && self.w_uv_t.len() == nh * r * d.v
    }

    /// Queries `i0..` of batch row `b` into `out` ([m, nh * v]): `q_abs = q_nope · W_UK` per
    /// head, then per query the softmax over its own kept keys (with, dropped, the non-finite
    /// positions up to it: see `attention::Keys`), and `o = mixed · W_UV^T` per head.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_rope: &[f32],
        sel: &Selection,
        (b, i0): (usize, usize),
        d: Dims,
        scale: f32,
        poisoned: &[usize],
    ) {
        let Dims { seq: s, keys: t, heads: nh, nope, rope, v: vd, .. } = d;
        let (qk, r, m, offset) = (nope + rope, self.rank, out.len() / (nh * vd), t - s);
        let mut q_abs = vec![0f32; m * nh * r]; // [m, nh, r]
        for h in 0..nh {
            let q_nope = View::at(q, ((b * s + i0) * nh + h) * qk, [m, nope, nh * qk]);
            ab(&mut q_abs[h * r..], nh * r, q_nope, View::at(self.w_uk, h * nope * r, [nope, r, r]));
        }
        let rows = KeyRows {
            latents: View::at(self.latents, b * t * r, [t, r, r]),
            k_rope: View::at(k_rope, b * t * rope, [t, rope, rope]),
        };
        let mut mixed = vec![0f32; m * nh * r]; // [m, nh, r]
        let mut scratch = Scratch::default();
        for (i, mixed) in mixed.chunks_exact_mut(nh * r).enumerate() {
            let q0 = (b * s + i0 + i) * nh * qk;
            let q = [View::at(&q_abs, i * nh * r, [nh, r, r]), View::at(q, q0 + nope, [nh, rope, qk])];
            let keys = (sel.row(b, i0 + i), offset + i0 + i, poisoned);
            attend_gathered(mixed, q, &rows, keys, scale, &mut scratch);
        }
        for h in 0..nh {
            let w_uv_t = View::at(self.w_uv_t, h * r * vd, [r, vd, vd]);
            ab(&mut out[h * vd..], nh * vd, View::at(&mixed, h * r, [m, r, nh * r]), w_uv_t);
        }
    }
}

/// Every position's latent and rope key, one row each (`[T, r]` and `[T, rope]` views: a
/// prefill's rows are a batch row's, a decode cache's are position-major, `B` rows apart).
struct KeyRows<'a> {
    latents: View<'a>,
    k_rope: View<'a>,
}

/// One query's scratch, kept across the queries of a task.
#[derive(Default)]
struct Scratch {
    keys: Vec<(usize, bool)>,
    keep: Vec<bool>,
    p: Vec<f32>,
    latents: Vec<f32>,
    k_rope: Vec<f32>,
}

/// One query of the absorbed form, all its heads: `q` = (q_abs [nh, r], q_rope [nh, rope]) ->
/// `mixed` ([nh, r], rows `r` apart), the latents mixed by each head's softmax over the keys the
/// query keeps. `(row, pos, poisoned)`: its row of the selection, its position, and the
/// non-finite positions (ascending), taken along dropped (see `attention::Keys`). The kept keys are
/// gathered: each once (a replayed row may repeat one), at or before `pos`, ascending; a query
/// that keeps every position up to its own reads them in place.
fn attend_gathered(
    mixed: &mut [f32],
    q: [View; 2],
    rows: &KeyRows,
    (row, pos, poisoned): (&[usize], usize, &[usize]),
    scale: f32,
    s: &mut Scratch,
) {
    let (nh, r, rope) = (q[0].rows, rows.latents.cols, rows.k_rope.cols);
    s.keys.clear();
    s.keys.extend(row.iter().filter(|&&key| key <= pos).map(|&key| (key, true)));
    s.keys.extend(poisoned.iter().take_while(|&&p| p <= pos).map(|&p| (p, false)));
    s.keys.sort_unstable_by_key(|&(key, kept)| (key, !kept));
    s.keys.dedup_by_key(|&mut (key, _)| key);
    let n = s.keys.len();
    if n == 0 {
        mixed[..nh * r].fill(f32::NAN); // the reference's softmax of an all -inf row
        return;
    }
    let every = s.keys.iter().enumerate().all(|(i, &(key, kept))| key == i && kept);
    let (latents, k_rope) = match every {
        true => (View { rows: n, ..rows.latents }, View { rows: n, ..rows.k_rope }),
        false => {
            s.latents.clear();
            s.k_rope.clear();
            for &(key, _) in &s.keys {
                s.latents.extend_from_slice(&rows.latents.data[key * rows.latents.stride..][..r]);
                s.k_rope.extend_from_slice(&rows.k_rope.data[key * rows.k_rope.stride..][..rope]);
            }
            (View::at(&s.latents, 0, [n, r, r]), View::at(&s.k_rope, 0, [n, rope, rope]))
        }
    };
    s.keep.clear();
    (0..nh).for_each(|_| s.keep.extend(s.keys.iter().map(|&(_, kept)| kept)));
    s.p.resize(nh * n, 0.0); // [nh, n]
    attend(&mut s.p, &s.keep, q, [latents, k_rope], latents, scale, mixed, r); // keys and values alike
}

/// Softmax over the selected keys of each query, in the absorbed form (decode): a task takes one
/// query and its heads, which read the same keys (`attend_gathered`), so a chunk's queries each
/// read only the keys they keep. q_abs: [B, nh, C, r] (queries absorbed into the latent);
/// q_rope: [B, nh, C, rope]; latents: [T, B, r]; k_rope: [T, B, rope] (position-major, as the
/// decode cache holds them) -> the latents mixed by each row's probabilities, [B, C, nh, r] (as
/// the output's fold wants them). In `d`, `nope` and `v` are both the latent rank r. `poisoned`: the positions (ascending) whose
/// latent or rope key is not finite (the cache tracks them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn absorbed_attention(
    q_abs: &[f32],
    q_rope: &[f32],
    latents: &[f32],
    k_rope: &[f32],
    sel: &Selection,
    poisoned: &[usize],
    d: Dims,
    scale: f32,
) -> Vec<f32> {
    let Dims { batch, seq: c, keys: t, heads: nh, nope: r, rope, .. } = d;
    let offset = t - c;
    assert!(q_abs.len() == batch * nh * c * r && q_rope.len() == batch * nh * c * rope);
    assert!(latents.len() == batch * t * r && k_rope.len() == batch * t * rope);
    let mut out = vec![0f32; batch * c * nh * r];
    if out.is_empty() {
        return out;
    }
    // A task takes one query and a group of its heads: all of them when the queries are enough
    // to keep every thread busy, else fewer (a divisor of nh), so a decode step's one query uses
    // every thread (each group gathers the same keys). A task's scratch serves its next ones.
    let split = rayon::current_num_threads().div_ceil(batch * c).clamp(1, nh);
    let group = (1..=nh.div_ceil(split)).rev().find(|g| nh % g == 0).unwrap_or(1);
    let groups = nh / group;
    out.par_chunks_mut(group * r).enumerate().for_each_init(Scratch::default, |scratch, (x, mixed)| {
        let (b, i, h0) = (x / groups / c, x / groups % c, x % groups * group);
        let rows = KeyRows {
            latents: View::at(latents, b * r, [t, r, batch * r]),
            k_rope: View::at(k_rope, b * rope, [t, rope, batch * rope]),
        };
        let first = (b * nh + h0) * c + i; // the query's row of head h0; its heads' rows are C apart
        let q =
            [View::at(q_abs, first * r, [group, r, c * r]), View::at(q_rope, first * rope, [group, rope, c * rope])];
        attend_gathered(mixed, q, &rows, (sel.row(b, i), offset + i, poisoned), scale, scratch);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::sparse_attention;
    use crate::model::attention::tests::{attention_f64, values};
    use crate::model::indexer::top_k_causal;

    /// The absorbed form is the expanded form whose heads all expand the latent as itself (keys
    /// and values both the latent): checked against `sparse_attention` (itself checked in f64)
    /// with one query, and with a chunk of 13 queries after 9 cached positions, with cuts and
    /// without; on 1 thread and on 8, where a single query's 6 heads go to 3 tasks of 2.
    #[test]
    fn absorbed_attention_is_the_expanded_form_with_the_latent_as_keys_and_values() {
        let pools = [1, 8].map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap());
        let cases = [(1, 0, 4), (1, 20, 6), (13, 9, 5), (13, 9, 40)];
        for (pool, (c, offset, topk)) in pools.iter().flat_map(|p| cases.map(|case| (p, case))) {
            let (batch, nh, r, rope) = (2, 6, 8, 4);
            let t = offset + c;
            let (q_abs, q_rope) = (values(batch * nh * c * r, 0.5), values(batch * nh * c * rope, 1.5));
            let (latents, k_rope) = (values(batch * t * r, 2.5), values(batch * t * rope, 3.5));
            let sel = top_k_causal(&values(batch * c * t, 4.5), batch, c, offset, topk);
            let d = Dims { batch, seq: c, keys: t, heads: nh, nope: r, rope, v: r };
            let ours = pool.install(|| absorbed_attention(&q_abs, &q_rope, &latents, &k_rope, &sel, &[], d, 0.3)); // [B, C, nh, r]
            let row = |b: usize, h: usize, i: usize| b * nh * c + h * c + i; // of q_abs, q_rope: [B, nh, C, ...]
            let q: Vec<f32> = (0..batch)
                .flat_map(|b| (0..c).flat_map(move |i| (0..nh).map(move |h| row(b, h, i)))) // [B, C, nh]
                .flat_map(|x| q_abs[x * r..(x + 1) * r].iter().chain(&q_rope[x * rope..(x + 1) * rope]).copied())
                .collect();
            // The cache is [T, B, ...]; the expanded form reads [B, T, ...].
            let at = |x: usize, w: usize| ((x % t) * batch + x / t) * w..((x % t) * batch + x / t + 1) * w;
            let kv: Vec<f32> = (0..batch * t)
                .flat_map(|x| (0..nh).flat_map(move |_| (0..2).flat_map(move |_| at(x, r))))
                .map(|i| latents[i])
                .collect();
            let k_rope: Vec<f32> = (0..batch * t).flat_map(|x| at(x, rope)).map(|i| k_rope[i]).collect();
            let want = sparse_attention(&q, &kv, &k_rope, None, &sel, d, 0.3); // [B, C, nh, r]
            assert_eq!(ours.len(), want.len());
            let err = ours.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(err < 1e-5, "C {c}, offset {offset}, top {topk}: {err:.2e}");
        }
    }

    /// Latents [B, T, r] and a per-head `kv_b_proj` w [nh, nope + v, r]: the keys and values it
    /// expands them into [B, T, nh, nope + v], and w split as W_UK [nh, nope, r] and W_UV^T
    /// [nh, r, v].
    fn expanded_from_latents(batch: usize, t: usize, d: Dims, r: usize) -> [Vec<f32>; 4] {
        let (nh, nope, vd) = (d.heads, d.nope, d.v);
        let (latents, w) = (values(batch * t * r, 0.5), values(nh * (nope + vd) * r, 1.5));
        let kv: Vec<f32> = (0..batch * t * nh * (nope + vd))
            .map(|i| {
                let (x, row) = (i / (nh * (nope + vd)), i % (nh * (nope + vd)));
                (0..r).map(|j| latents[x * r + j] * w[row * r + j]).sum()
            })
            .collect();
        let w_uk: Vec<f32> = (0..nh).flat_map(|h| w[h * (nope + vd) * r..][..nope * r].to_vec()).collect();
        let w_uv_t: Vec<f32> =
            (0..nh * r * vd).map(|i| w[((i / (r * vd)) * (nope + vd) + nope + i % vd) * r + (i / vd) % r]).collect();
        [latents, kv, w_uk, w_uv_t]
    }

    /// The first `e` of each batch row's `t` positions of `x` ([B, T, ...]).
    fn first_positions(x: &[f32], batch: usize, t: usize, e: usize) -> Vec<f32> {
        let width = x.len() / (batch * t);
        (0..batch).flat_map(|b| x[b * t * width..][..e * width].to_vec()).collect()
    }

    /// A prefill's later queries in the absorbed form give the expanded form's outputs: keys and
    /// values made from latents by a per-head `kv_b_proj`, the f64 reference fed them all, ours
    /// the first `from` positions' only; from block 1 and from 0, after cached keys, with cuts
    /// and without, and a replayed row that repeats a key and one that keeps none (NaN).
    #[test]
    fn absorbed_queries_of_a_prefill_match_the_expanded_form() {
        let (batch, nh, nope, rope, vd, r) = (2, 3, 6, 4, 5, 7);
        for (s, offset, topk, from) in
            [(2 * BLOCK + 3, 0, 5, BLOCK), (2 * BLOCK + 3, 0, 500, 0), (70, 7, 9, 0), (2 * BLOCK + 3, 5, 7, BLOCK)]
        {
            let t = offset + s;
            let d = Dims { batch, seq: s, keys: t, heads: nh, nope, rope, v: vd };
            let [latents, kv, w_uk, w_uv_t] = expanded_from_latents(batch, t, d, r);
            let (q, k_rope) = (values(batch * s * nh * (nope + rope), 2.5), values(batch * t * rope, 3.5));
            let mut sel = crate::model::indexer::top_k_causal(&values(batch * s * t, 4.5), batch, s, offset, topk);
            if topk < t {
                let k = sel.k;
                sel.idx[(s - 1) * k..s * k].fill(offset + s - 2); // one key, k times
                sel.idx[(2 * s - 1) * k..2 * s * k].fill(t + 3); // none at or before the query
            }
            let first = first_positions(&kv, batch, t, offset + from); // ours reads the first E
            let a = Absorbed { from, latents: &latents, w_uk: &w_uk, w_uv_t: &w_uv_t, rank: r };
            let ours = sparse_attention(&q, &first, &k_rope, Some(&a), &sel, d, 0.3);
            let want = attention_f64(&q, &kv, &k_rope, &sel, d, 0.3);
            let compared = if topk < t { (2 * s - 1) * nh * vd } else { ours.len() }; // the last keeps none
            let err = ours[..compared].iter().zip(&want).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max);
            println!("S {s}, offset {offset}, top {topk}, from {from}: max abs error {err:.2e}");
            assert!(err < 1e-5, "S {s}, offset {offset}, top {topk}, from {from}: max abs error {err:.2e}");
            assert!(ours[compared..].iter().all(|x| x.is_nan()));
        }
    }

    /// Where the switch falls: nowhere in a prompt shorter than GLM-5's crossover, at 4,352 in a
    /// longer one, and, for other sizes, offsets and cuts, at the first block whose first query's
    /// multiply-adds (counted here, query by query) are no more absorbed than expanded.
    #[test]
    fn the_absorbed_form_starts_where_it_costs_less() {
        let glm5 = |s| Dims { batch: 1, seq: s, keys: s, heads: 64, nope: 192, rope: 64, v: 256 };
        assert_eq!(crossover(glm5(4096), 512, 2048), 4096);
        assert_eq!(crossover(glm5(16384), 512, 2048), 4352);
        assert_eq!(crossover(glm5(1 << 40), 512, 2048), 4352); // solved, not searched
        assert_eq!(crossover(glm5(1 << 20), 512, usize::MAX), 1 << 20); // a config's top-k past any prompt
        for (nope, rope, v, r, topk, offset) in
            [(16, 8, 16, 32, 64, 0), (16, 8, 16, 32, 8, 100), (24, 8, 24, 12, 10, 0)]
        {
            let d = Dims { batch: 1, seq: 500, keys: offset + 500, heads: 4, nope, rope, v };
            let cheaper =
                |p: usize| p * (nope + rope + v) + r * (nope + v) >= nope * r + topk.min(p) * (2 * r + rope) + r * v;
            let want = (0..500).step_by(BLOCK).find(|&i0| cheaper(offset + i0 + 1)).unwrap_or(500);
            assert_eq!(crossover(d, r, topk), want, "nope {nope}, r {r}, top {topk}, offset {offset}");
        }
    }

    /// A score that is not finite at a key a query drops (its rope key, or its latent in the
    /// absorbed prefill, not finite) makes the query's output NaN, as the reference's masked
    /// softmax does (its `-inf` mask added to a NaN score): in place, gathered, and absorbed.
    #[test]
    fn a_non_finite_key_at_a_dropped_position_gives_nan_in_every_form() {
        let r = 7;
        // (S, offset, absorbed from, poisoned): in place, gathered, absorbed; the rope key, or in
        // the absorbed form (the only one that reads them) the latent.
        let cases =
            [(70, 0, None, "rope"), (4, 60, None, "rope"), (70, 0, Some(0), "rope"), (70, 0, Some(0), "latent")];
        for (s, offset, from, poison) in cases {
            let d = Dims { batch: 1, seq: s, keys: offset + s, heads: 2, nope: 6, rope: 4, v: 5 };
            let t = d.keys;
            let [mut latents, kv, w_uk, w_uv_t] = expanded_from_latents(1, t, d, r);
            let (q, mut k_rope) = (values(s * d.heads * (d.nope + d.rope), 2.5), values(t * d.rope, 3.5));
            let sel = top_k_causal(&values(s * t, 4.5), 1, s, offset, 5);
            let last = s - 1; // the last query drops a key before it
            let dropped = (0..t).find(|j| !sel.row(0, last).contains(j)).unwrap();
            match poison {
                "rope" => k_rope[dropped * d.rope + 1] = f32::NAN,
                _ => latents[dropped * r + 2] = f32::INFINITY,
            }
            let first = first_positions(&kv, 1, t, offset + from.unwrap_or(s));
            let a = from.map(|from| Absorbed { from, latents: &latents, w_uk: &w_uk, w_uv_t: &w_uv_t, rank: r });
            let out = sparse_attention(&q, &first, &k_rope, a.as_ref(), &sel, d, 0.3);
            let row = &out[last * d.heads * d.v..];
            assert!(row.iter().all(|x| x.is_nan()), "S {s}, offset {offset}, from {from:?}, {poison}: {row:?}");
        }
        // A replayed selection as wide as the keys that keeps only key 0 (no cut, so the
        // expanded form would look for nothing non-finite): absorbed queries still find key 1's.
        let (s, r) = (3, 7);
        let d = Dims { batch: 1, seq: s, keys: s, heads: 2, nope: 6, rope: 4, v: 5 };
        let [latents, _, w_uk, w_uv_t] = expanded_from_latents(1, s, d, r);
        let (q, mut k_rope) = (values(s * d.heads * (d.nope + d.rope), 2.5), values(s * d.rope, 3.5));
        k_rope[d.rope] = f32::NAN;
        let sel = Selection { batch: 1, seq: s, k: s, idx: vec![0; s * s], margin: vec![f32::INFINITY; s] };
        let a = Absorbed { from: 0, latents: &latents, w_uk: &w_uk, w_uv_t: &w_uv_t, rank: r };
        let out = sparse_attention(&q, &[], &k_rope, Some(&a), &sel, d, 0.3);
        let nan: Vec<bool> = out.chunks(d.heads * d.v).map(|o| o.iter().all(|x| x.is_nan())).collect();
        assert_eq!(nan, [false, true, true]);
    }
}
