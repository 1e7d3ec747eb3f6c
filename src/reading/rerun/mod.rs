//! An attention output, or a full indexer layer's scores, that parts from the reference's while
//! its inputs match: with `--model`, that part of the layer is rerun on ours's `input_norm` (the
//! attention over ours's DSA selection) with each softmax scale and RoPE a port commonly gets
//! wrong, the attention also over every causal key ([`variants`]), and the variant that gives
//! ours's tensor is named. A wrong scale or RoPE leaves position 0 alone (its one key takes the
//! whole softmax at any scale, and it does not rotate), so where the divergence starts cannot
//! tell them apart.
//!
//! The rerun is the checkpoint's own layer (`model::mla`, checked against transformers), and it
//! is trusted only where, as the checkpoint says, it gives the reference's tensor from the
//! reference's `input_norm`: a dump of other positions (a decode step, a later chunk) or of
//! another checkpoint gets no reading. A variant is named only where it explains ours's
//! difference, not merely lands inside a loose tolerance: its own error against ours is under
//! 1/200 of the checkpoint's (a fourteenth in rms), and the next best that does so too has three
//! times its error; where one other is that close (two scales 1.4% apart, under a bf16 port's
//! noise), both are named.
//! Attention is causal, so the first positions of a long dump are rerun alone: 512 for the scales
//! and RoPE (they show from position 1), and, where none of those explains ours, enough past
//! `index_topk` for dense attention to show.

mod variants;

pub use variants::{ScaleDim, Variant};

use candle_core::{Device, Tensor};

use crate::checkpoint::{Checkpoint, Loader};
use crate::compare::{all_close, Tolerance};
use crate::config::Config;
use crate::diff::floats;
use crate::dump::Dump;
use crate::error::Result;
use crate::hooks::{HookPoint, LayerHook, NoObserver, Observer};
use crate::model::indexer::Selection;
use crate::model::mla::Attention;
use crate::model::rope::{RopeTables, RotaryEmbedding};
use crate::reading::Tail;

/// Positions rerun at most (and this many past `index_topk`, for the attention).
const PREFIX: usize = 512;
const PAST_TOPK: usize = 256;

/// A variant's error against ours, at most this share of the checkpoint's, explains it.
const EXPLAINS: f64 = 1.0 / 200.0;
/// The next best variant's error, at least this many times the best's, leaves the best alone.
/// (Errors are sums over a whole tensor: a bf16 port's noise moves them little, and a port of
/// the scale without mscale² in bf16 has its next best, a scale 1.4% off, at 7 times its error.)
const ALONE: f64 = 3.0;

/// Which part of a layer was rerun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The attention, for `attn.out`.
    Attention,
    /// The DSA indexer, for `dsa.scores` (or `dsa.topk` where the scores are not recorded).
    Indexer,
}

impl Part {
    pub fn label(self) -> &'static str {
        match self {
            Part::Attention => "attention",
            Part::Indexer => "indexer",
        }
    }
}

/// Ours's tensor is the checkpoint's `part` rerun with `variant` (softmax scale `scale`, where
/// the checkpoint's is `checkpoint_scale`; YaRN's `mscale`, 1 without), or, nearly as close, with
/// `or`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rerun {
    pub part: Part,
    pub variant: Variant,
    pub scale: f64,
    pub or: Option<(Variant, f64)>,
    pub checkpoint_scale: f64,
    pub mscale: f64,
}

/// What a rerun is compared on, over the first positions: a float tensor (`[B, P, W]`, or the
/// indexer's `[B, P, P]` scores), or the selections' causal keys as sets.
pub(crate) enum Output {
    Floats(Vec<f32>),
    Sets(Selection),
}

impl Output {
    /// The dump `d`'s `name` over its first `p` positions (of `seq`).
    fn read(d: &Dump, name: &str, seq: usize, p: usize) -> Option<Output> {
        let shape = d.shape(name)?;
        if name.ends_with(".dsa.topk") {
            return Some(Output::Sets(prefix_selection(&d.selection(name, *shape.first()?, seq).ok()?, p)));
        }
        let (v, &[b, s, w]) = (floats(d, name)?, &shape[..]) else { return None };
        if s != seq || v.len() != b * s * w || (name.ends_with(".dsa.scores") && w != s) {
            return None;
        }
        // Scores are [B, S, S]: the first p keys of the first p queries.
        let keep = if name.ends_with(".dsa.scores") { p } else { w };
        let rows = (0..b).flat_map(|r| (0..p).map(move |q| (r * s + q) * w));
        Some(Output::Floats(rows.flat_map(|at| v[at..at + keep].iter().copied()).collect()))
    }

    /// How far `other` is from this: the NMSE of floats, over this one's energy (infinite where a
    /// non-finite value is not the other's), the number of rows whose causal keys differ.
    pub(crate) fn distance(&self, other: &Output) -> f64 {
        match (self, other) {
            (Output::Floats(x), Output::Floats(y)) if x.len() == y.len() => {
                let (mut err, mut norm) = (0f64, 0f64);
                for (&a, &e) in x.iter().zip(y) {
                    match a.is_finite() && e.is_finite() {
                        true => (err, norm) = (err + (a as f64 - e as f64).powi(2), norm + (a as f64).powi(2)),
                        false if a.to_bits() == e.to_bits() => {}
                        false => return f64::INFINITY,
                    }
                }
                err / norm.max(f64::MIN_POSITIVE)
            }
            (Output::Sets(x), Output::Sets(y)) if (x.batch, x.seq) == (y.batch, y.seq) => {
                let rows = (0..x.batch).flat_map(|b| (0..x.seq).map(move |q| (b, q)));
                rows.filter(|&(b, q)| causal_keys(x, b, q) != causal_keys(y, b, q)).count() as f64
            }
            _ => f64::INFINITY,
        }
    }

    /// Whether this (ours) is `other` (a rerun) within `tol`, or off it by rounding's tail alone
    /// ([`Tail`]: a few scattered elements, as a bf16 run's own rounding leaves against a rerun
    /// in f32 of its input); rows of `width` values.
    pub(crate) fn matches(&self, other: &Output, tol: Tolerance, width: usize) -> bool {
        match (self, other) {
            (Output::Floats(x), Output::Floats(y)) if width > 0 && x.len().is_multiple_of(width) => {
                all_close(x, y, tol) || Tail::of(x, y, &[x.len() / width, width], tol).is_some()
            }
            _ => self.close(other, tol),
        }
    }

    /// Whether `other` is this within `tol` (sets: every row's causal keys the same).
    pub(crate) fn close(&self, other: &Output, tol: Tolerance) -> bool {
        match (self, other) {
            (Output::Floats(x), Output::Floats(y)) => all_close(x, y, tol),
            _ => self.distance(other) == 0.0,
        }
    }
}

impl Rerun {
    /// For `name`, the first divergence, with the checkpoint `ckpt`: `layers.{i}.attn.out`,
    /// `dsa.scores` or `dsa.topk` (where it is computed, a full indexer layer's); the variant
    /// whose rerun on ours's input explains ours's within `tol`. None where none does, where the
    /// dumps lack `input_norm`, or where the checkpoint's own rerun does not give the reference's.
    pub(crate) fn of(a: &Dump, b: &Dump, name: &str, ckpt: &Checkpoint, tol: Tolerance) -> Option<Rerun> {
        let (i, part) = match HookPoint::parse(name)? {
            HookPoint::Layer(i, LayerHook::AttnOut) => (i, Part::Attention),
            HookPoint::Layer(i, LayerHook::DsaScores | LayerHook::DsaTopk) => (i, Part::Indexer),
            _ => return None,
        };
        let c = &ckpt.config;
        if part == Part::Indexer && c.indexer_source(i) != i {
            return None; // a shared layer's selection is another layer's (`Notes::not_reused`)
        }
        let input = HookPoint::Layer(i, LayerHook::InputNorm).name();
        let x = |d: &Dump| Tensor::from_vec(floats(d, &input)?, d.shape(&input)?, &Device::Cpu).ok();
        let x = [x(a)?, x(b)?];
        let seq = x[0].dims3().ok()?.1;
        if x[1].dims3().ok()?.1 != seq {
            return None;
        }
        let mut loader = Loader::new(ckpt);
        let attention = Attention::load(&mut loader, c, i);
        let attention = loader.finish(attention).ok()?;
        let checkpoint_scale = attention.scale;
        let mut layer = Layer { dumps: [a, b], name, i, part, config: c, attention, x, seq, tol };
        // The scales and RoPE show from position 1, on the first positions; dense attention from
        // `index_topk` on, past it (only where nothing else explains ours: it costs a rerun of
        // index_topk positions and more).
        let found = match part {
            Part::Attention => layer.search(seq.min(PREFIX), Variant::candidates(c)).or_else(|| {
                let k = c.index_k(seq);
                (k < seq).then(|| layer.search(seq.min(k + PAST_TOPK), vec![(Variant::AllKeys, checkpoint_scale)]))?
            }),
            Part::Indexer => layer.search(seq.min(PREFIX), Variant::candidates_of_indexer(c)),
        };
        let ((variant, scale), or) = found?;
        Some(Rerun { part, variant, scale, or, checkpoint_scale, mscale: c.softmax_mscale() })
    }
}

/// The variant (and its softmax scale) that explains ours, and another as close, if one is.
type Found = ((Variant, f64), Option<(Variant, f64)>);

/// One layer's attention (and indexer) as the checkpoint has it, and the two dumps' inputs to it.
struct Layer<'d> {
    /// Ours, the reference.
    dumps: [&'d Dump; 2],
    /// The first divergence.
    name: &'d str,
    i: usize,
    part: Part,
    config: &'d Config,
    attention: Attention,
    /// Ours's `input_norm` and the reference's: [B, seq, hidden].
    x: [Tensor; 2],
    seq: usize,
    tol: Tolerance,
}

impl Layer<'_> {
    /// Of `candidates`, the variant that explains ours over the first `p` positions; None where
    /// none does, or where the checkpoint's own rerun is not the reference's there.
    fn search(&mut self, p: usize, candidates: Vec<(Variant, f64)>) -> Option<Found> {
        let (c, i, seq, tol) = (self.config, self.i, self.seq, self.tol);
        let x =
            [self.x[0].narrow(1, 0, p).ok()?.contiguous().ok()?, self.x[1].narrow(1, 0, p).ok()?.contiguous().ok()?];
        let [ours, reference] = self.dumps.map(|d| Output::read(d, self.name, seq, p));
        let (ours, reference) = (ours?, reference?);
        let rope = RotaryEmbedding::new(c).tables(&(0..p).collect::<Vec<_>>());
        let scores = self.name.ends_with(".dsa.scores");
        let run = |attention: &Attention, x: &Tensor, rope: &RopeTables, sel: Option<&Selection>| match sel {
            Some(sel) => rerun(attention, i, x, rope, sel).map(Output::Floats),
            None => index(attention, i, x, rope, scores),
        };
        let sels = match self.part {
            Part::Attention => {
                let of = |side: usize| selection(&self.attention, self.dumps[side], i, &x[side], seq, &rope);
                Some((of(0)?, of(1)?))
            }
            Part::Indexer => None,
        };
        let (sel_ours, sel_reference) = sels.unzip();
        let mut progress = crate::progress::Steps::reruns(i, self.part, candidates.len() + 2);
        progress.step(1);
        if !run(&self.attention, &x[1], &rope, sel_reference.as_ref())?.close(&reference, tol) {
            return None;
        }
        progress.step(2);
        let checkpoint_scale = self.attention.scale;
        let checkpoint = run(&self.attention, &x[0], &rope, sel_ours.as_ref())?;
        let unexplained = ours.distance(&checkpoint);
        if unexplained == 0.0 {
            return None; // ours parts from the checkpoint's only past these positions
        }
        // Each variant that gives ours within `tol` and is no rerun of the checkpoint's, with its
        // error against ours.
        let mut found: Vec<((Variant, f64), f64)> = Vec::new();
        for (n, (variant, scale)) in candidates.into_iter().enumerate() {
            progress.step(n + 3);
            self.attention.scale = scale;
            let sel = sel_ours.as_ref().map(|s| variant.selection(s));
            let out = run(&self.attention, &x[0], &variant.rope(c, p), sel.as_ref());
            self.attention.scale = checkpoint_scale;
            match out {
                Some(out) if out.close(&ours, tol) && !out.close(&checkpoint, tol) => {
                    found.push(((variant, scale), ours.distance(&out)))
                }
                _ => {}
            }
        }
        pick(found, unexplained)
    }
}

/// Of the variants `found` (each with its error against ours), the one that explains ours, where
/// the checkpoint's error is `unexplained`: the best, where its error is under [`EXPLAINS`] of it,
/// and the next best where it does so too and is as close (under [`ALONE`] times the best's
/// error): two the input tells apart too little. None where a third is as close too.
pub(crate) fn pick<T: Copy>(mut found: Vec<(T, f64)>, unexplained: f64) -> Option<(T, Option<T>)> {
    found.sort_by(|x, y| x.1.total_cmp(&y.1));
    found.retain(|f| f.1 <= EXPLAINS * unexplained);
    let &(variant, error) = found.first()?;
    let mut near = found.iter().skip(1).filter(|f| f.1 < ALONE * error || f.1 == 0.0);
    match (near.next(), near.next()) {
        (None, _) => Some((variant, None)),
        (Some(&(v, _)), None) => Some((variant, Some(v))),
        _ => None,
    }
}

/// The selection `d` attended over in layer `i` for the first positions `x` holds: its
/// `dsa.topk` (of `seq` positions), else the indexer's on `x`.
fn selection(
    attention: &Attention,
    d: &Dump,
    i: usize,
    x: &Tensor,
    seq: usize,
    rope: &RopeTables,
) -> Option<Selection> {
    let (batch, p, _) = x.dims3().ok()?;
    if let Ok(recorded) = d.selection(&HookPoint::Layer(i, LayerHook::DsaTopk).name(), batch, seq) {
        return Some(prefix_selection(&recorded, p));
    }
    let q_latent = attention.project(i, x, rope, &mut NoObserver).ok()?.q_latent;
    let mut sel = None;
    attention.select(i, x, &q_latent, rope, None, &mut sel, &mut NoObserver).ok()?;
    sel
}

/// `sel`'s rows of the first `p` queries, each its causal keys (in any order the dump holds them)
/// padded past the query to `min(k, p)` keys: what a run of those positions alone selects.
fn prefix_selection(sel: &Selection, p: usize) -> Selection {
    let (p, k) = (p.min(sel.seq), sel.k.min(p));
    let mut idx = Vec::with_capacity(sel.batch * p * k);
    for b in 0..sel.batch {
        for q in 0..p {
            let keys = causal_keys(sel, b, q);
            idx.extend(keys.iter().copied().chain(q + 1..).take(k));
        }
    }
    Selection { batch: sel.batch, seq: p, k, idx, margin: vec![f32::NAN; sel.batch * p] }
}

/// Row `(b, q)`'s causal keys, sorted, once each.
fn causal_keys(sel: &Selection, b: usize, q: usize) -> Vec<usize> {
    let mut keys: Vec<usize> = sel.row(b, q).iter().copied().filter(|&k| k <= q).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Layer `i`'s attention of `x` over `sel`, flattened.
fn rerun(attention: &Attention, i: usize, x: &Tensor, rope: &RopeTables, sel: &Selection) -> Option<Vec<f32>> {
    let out = attention.forward(i, x, rope, &mut Some(sel.clone()), &mut Replay(sel)).ok()?;
    out.flatten_all().ok()?.to_vec1().ok()
}

/// Layer `i`'s indexer on `x`: its scores (`scores`), or its selection.
fn index(attention: &Attention, i: usize, x: &Tensor, rope: &RopeTables, scores: bool) -> Option<Output> {
    let q_latent = attention.project(i, x, rope, &mut NoObserver).ok()?.q_latent;
    let (mut sel, mut obs) = (None, Scores(None));
    attention.indexer.select(i, x, &q_latent, rope, None, &mut sel, &mut obs).ok()?;
    match scores {
        true => Some(Output::Floats(obs.0?.flatten_all().ok()?.to_vec1().ok()?)),
        false => sel.map(Output::Sets),
    }
}

/// The observer that keeps the indexer's scores.
struct Scores(Option<Tensor>);

impl Observer for Scores {
    fn wants(&self, point: HookPoint) -> bool {
        matches!(point, HookPoint::Layer(_, LayerHook::DsaScores))
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        if self.wants(point) {
            self.0 = Some(value.clone());
        }
        Ok(())
    }
}

/// The observer that wants nothing and replays one selection (the indexer's own is dropped).
struct Replay<'s>(&'s Selection);

impl Observer for Replay<'_> {
    fn wants(&self, _: HookPoint) -> bool {
        false
    }
    fn observe(&mut self, _: HookPoint, _: &Tensor) -> Result<()> {
        Ok(())
    }
    fn forced_selection(&mut self, _: usize) -> Result<Option<Selection>> {
        Ok(Some(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The best variant is named alone when the next is three times as far, beside it when
    /// closer, and not at all when it explains too little or a third is as close.
    #[test]
    fn a_variant_is_named_where_it_explains_ours_and_stands_apart() {
        let (a, b, c) = (Variant::RopeHalves, Variant::YarnFrequencies, Variant::AllKeys);
        let unexplained = 2e-2; // explained: an error under 1e-4
        assert_eq!(pick(vec![((b, 0.2), 5e-5), ((a, 0.1), 1e-6)], unexplained), Some(((a, 0.1), None)));
        assert_eq!(pick(vec![((a, 0.1), 2e-5), ((b, 0.2), 5e-5)], unexplained), Some(((a, 0.1), Some((b, 0.2)))));
        // (The next best, as close but explaining too little, leaves the best alone.)
        assert_eq!(pick(vec![((a, 0.1), 9e-5), ((b, 0.2), 2e-4)], unexplained), Some(((a, 0.1), None)));
        assert_eq!(pick(vec![((a, 0.1), 2e-4)], unexplained), None);
        assert_eq!(pick(vec![((a, 0.1), 2e-5), ((b, 0.2), 3e-5), ((c, 0.3), 4e-5)], unexplained), None);
        assert_eq!(pick(vec![((a, 0.1), 0.0), ((b, 0.2), 0.0)], unexplained), Some(((a, 0.1), Some((b, 0.2)))));
        assert_eq!(pick(Vec::<((Variant, f64), f64)>::new(), unexplained), None);
    }

    /// Two variants as close are both said, the second after the checkpoint's scale.
    #[test]
    fn a_close_second_is_named_after_the_first() {
        let scale = |dim, mscale_power| Variant::Scale { dim, mscale_power, also: None };
        let r = Rerun {
            part: Part::Attention,
            variant: scale(ScaleDim::QkHead, 0),
            scale: 0.2041,
            or: Some((scale(ScaleDim::Absorbed, 1), 0.2013)),
            checkpoint_scale: 0.2646,
            mscale: 1.1386,
        };
        assert_eq!(
            r.reading(),
            "ours is this layer's attention rerun on its input with the softmax scale qk_head_dim^-0.5 = 0.204100 \
             (YaRN's mscale² left out), where the checkpoint's is 0.264600 (or, nearly as close, the softmax scale \
             (kv_lora_rank + qk_rope_head_dim)^-0.5 x mscale (once, not squared) = 0.201300)"
        );
    }
}
