//! An attention output, or a full indexer layer's scores, that parts from the reference's while
//! its inputs match: with `--model`, that part of the layer is rerun on ours's `input_norm` (the
//! attention over ours's DSA selection) with each softmax scale and RoPE a port commonly gets
//! wrong, the attention also over every causal key, and the variant that gives ours's tensor is
//! named. A wrong scale or RoPE leaves position 0 alone (its one key takes the whole softmax at
//! any scale, and it does not rotate), so where the divergence starts cannot tell them apart.
//!
//! The rerun is the checkpoint's own layer (`model::mla`, checked against transformers), and it
//! is trusted only where, as the checkpoint says, it gives the reference's tensor from the
//! reference's `input_norm`: a dump of other positions (a decode step, a later chunk) or of
//! another checkpoint gets no reading.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::checkpoint::{Checkpoint, Loader};
use crate::compare::{all_close, Tolerance};
use crate::config::{Config, Rope};
use crate::diff::floats;
use crate::dump::Dump;
use crate::error::Result;
use crate::hooks::{HookPoint, LayerHook, NoObserver, Observer};
use crate::model::indexer::Selection;
use crate::model::mla::Attention;
use crate::model::rope::{Pairs, RopeTables, RotaryEmbedding};

/// The widths a port may take the softmax scale's square root of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDim {
    /// `qk_nope_head_dim + qk_rope_head_dim`: the checkpoint's.
    QkHead,
    /// `qk_nope_head_dim` alone.
    Nope,
    /// `v_head_dim`.
    V,
    /// `kv_lora_rank + qk_rope_head_dim`: the absorbed query's width, which decode kernels use.
    Absorbed,
}

impl ScaleDim {
    fn width(self, c: &Config) -> usize {
        match self {
            ScaleDim::QkHead => c.qk_head_dim(),
            ScaleDim::Nope => c.qk_nope_head_dim,
            ScaleDim::V => c.v_head_dim,
            ScaleDim::Absorbed => c.kv_lora_rank + c.qk_rope_head_dim,
        }
    }

    fn label(self) -> &'static str {
        match self {
            ScaleDim::QkHead => "qk_head_dim",
            ScaleDim::Nope => "qk_nope_head_dim",
            ScaleDim::V => "v_head_dim",
            ScaleDim::Absorbed => "(kv_lora_rank + qk_rope_head_dim)",
        }
    }
}

/// An attention computed otherwise than the checkpoint says, as ports have shipped it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Variant {
    /// The softmax scale `width^-0.5 * mscale^mscale_power` (the checkpoint's: `QkHead`, 2).
    Scale { dim: ScaleDim, mscale_power: i32 },
    /// RoPE rotating the pairs `(x[j], x[j + half])` (`rotate_half`), not neighbours.
    RopeHalves,
    /// YaRN's frequencies left out (`rope_theta`'s own), its softmax scale kept.
    YarnFrequencies,
    /// YaRN left out altogether: `rope_theta`'s frequencies and the plain `qk_head_dim^-0.5`.
    NoYarn,
    /// Every causal key attended to: the DSA selection left out (dense attention).
    AllKeys,
}

impl Variant {
    /// The variants that compute otherwise than the checkpoint `c` says, most likely first, each
    /// with its softmax scale: a scale equal to the checkpoint's, or to an earlier one, is left
    /// out (without YaRN every mscale power is the same), and so is dense attention where the
    /// selection (of `k` keys, over `seq` positions) keeps every causal key.
    fn candidates(c: &Config, k: usize, seq: usize) -> Vec<(Variant, f64)> {
        let m = c.softmax_mscale();
        let mut out: Vec<(Variant, f64)> = Vec::new();
        for dim in [ScaleDim::QkHead, ScaleDim::Nope, ScaleDim::V, ScaleDim::Absorbed] {
            for mscale_power in [2, 0, 1] {
                let scale = (dim.width(c) as f64).powf(-0.5) * m.powi(mscale_power);
                let seen = |s: f64| (s / scale - 1.0).abs() < 1e-9;
                if !seen(c.softmax_scale()) && !out.iter().any(|&(_, s)| seen(s)) {
                    out.push((Variant::Scale { dim, mscale_power }, scale));
                }
            }
        }
        out.push((Variant::RopeHalves, c.softmax_scale()));
        if matches!(c.rope, Rope::Yarn(_)) {
            out.push((Variant::YarnFrequencies, c.softmax_scale()));
            out.push((Variant::NoYarn, (c.qk_head_dim() as f64).powf(-0.5)));
        }
        if k < seq {
            out.push((Variant::AllKeys, c.softmax_scale()));
        }
        out
    }

    /// The variants of the indexer's scores: its RoPE (its scale is no YaRN's, and a scale
    /// would move every score by one factor, which `diff` reads already).
    fn candidates_of_indexer(c: &Config) -> Vec<(Variant, f64)> {
        let mut out = vec![(Variant::RopeHalves, c.softmax_scale())];
        if matches!(c.rope, Rope::Yarn(_)) {
            out.push((Variant::YarnFrequencies, c.softmax_scale()));
        }
        out
    }

    /// The selection this variant attends over, where `sel` is the one the run made.
    fn selection(self, sel: &Selection) -> Selection {
        match self {
            Variant::AllKeys => {
                let idx = (0..sel.batch * sel.seq).flat_map(|_| 0..sel.seq).collect();
                let margin = vec![f32::INFINITY; sel.batch * sel.seq];
                Selection { batch: sel.batch, seq: sel.seq, k: sel.seq, idx, margin }
            }
            _ => sel.clone(),
        }
    }

    /// The RoPE tables of this variant for positions `0..seq`.
    fn rope(self, c: &Config, seq: usize) -> RopeTables {
        let positions: Vec<usize> = (0..seq).collect();
        match (self, &c.rope) {
            (Variant::YarnFrequencies | Variant::NoYarn, Rope::Yarn(y)) => {
                let plain = Config { rope: Rope::Default { theta: y.theta }, ..c.clone() };
                RotaryEmbedding::new(&plain).tables(&positions)
            }
            (Variant::RopeHalves, _) => {
                RopeTables { pairs: Pairs::Halves, ..RotaryEmbedding::new(c).tables(&positions) }
            }
            _ => RotaryEmbedding::new(c).tables(&positions),
        }
    }
}

/// Which part of a layer was rerun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The attention, for `attn.out`.
    Attention,
    /// The DSA indexer, for `dsa.scores` (or `dsa.topk` where the scores are not recorded).
    Indexer,
}

/// Ours's tensor is the checkpoint's `part` rerun with `variant` (softmax scale `scale`, where
/// the checkpoint's is `checkpoint_scale`; YaRN's `mscale`, 1 without).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rerun {
    pub part: Part,
    pub variant: Variant,
    pub scale: f64,
    pub checkpoint_scale: f64,
    pub mscale: f64,
}

/// What a rerun is compared on: a float tensor, or the selections' causal keys as sets.
enum Output {
    Floats(Vec<f32>),
    Sets(Selection),
}

impl Output {
    /// Whether the dump `d`'s `name` is this output: floats within `tol`, every row's causal keys
    /// the same set.
    fn matches(&self, d: &Dump, name: &str, tol: Tolerance) -> bool {
        match self {
            Output::Floats(v) => floats(d, name).is_some_and(|x| all_close(&x, v, tol)),
            Output::Sets(sel) => d.selection(name, sel.batch, sel.seq).is_ok_and(|x| same_sets(&x, sel)),
        }
    }
}

impl Rerun {
    /// For `name`, the first divergence, with the checkpoint in `model`: `layers.{i}.attn.out`,
    /// `dsa.scores` or `dsa.topk` (where it is computed, a full indexer layer's); the variant
    /// whose rerun on ours's input gives ours's within `tol`. None where none does, where the
    /// dumps lack `input_norm`, or where the checkpoint's own rerun does not give the reference's.
    pub(crate) fn of(a: &Dump, b: &Dump, name: &str, model: &Path, tol: Tolerance) -> Option<Rerun> {
        let (i, part) = match HookPoint::parse(name)? {
            HookPoint::Layer(i, LayerHook::AttnOut) => (i, Part::Attention),
            HookPoint::Layer(i, LayerHook::DsaScores | LayerHook::DsaTopk) => (i, Part::Indexer),
            _ => return None,
        };
        let ckpt = Checkpoint::open(model).ok()?;
        let c = &ckpt.config;
        if part == Part::Indexer && c.indexer_source(i) != i {
            return None; // a shared layer's selection is another layer's (`Notes::not_reused`)
        }
        let mut loader = Loader::new(&ckpt);
        let attention = Attention::load(&mut loader, c, i);
        let mut attention = loader.finish(attention).ok()?;
        let input = HookPoint::Layer(i, LayerHook::InputNorm).name();
        let x = |d: &Dump| Tensor::from_vec(floats(d, &input)?, d.shape(&input)?, &Device::Cpu).ok();
        let (x_ours, x_reference) = (x(a)?, x(b)?);
        let seq = x_ours.dims3().ok()?.1;
        let rope = RotaryEmbedding::new(c).tables(&(0..seq).collect::<Vec<_>>());
        let scores = name.ends_with(".dsa.scores");
        let run = |attention: &Attention, x: &Tensor, rope: &RopeTables, sel: Option<&Selection>| match sel {
            Some(sel) => rerun(attention, i, x, rope, sel).map(Output::Floats),
            None => index(attention, i, x, rope, scores),
        };
        let sels = match part {
            Part::Attention => {
                Some((selection(&attention, a, i, &x_ours, &rope)?, selection(&attention, b, i, &x_reference, &rope)?))
            }
            Part::Indexer => None,
        };
        let (sel_ours, sel_reference) = sels.unzip();
        if !run(&attention, &x_reference, &rope, sel_reference.as_ref())?.matches(b, name, tol) {
            return None;
        }
        let checkpoint_scale = attention.scale;
        let candidates = match &sel_ours {
            Some(sel) => Variant::candidates(c, sel.k, seq),
            None => Variant::candidates_of_indexer(c),
        };
        let mut progress = crate::progress::Steps::reruns(i, candidates.len());
        let (variant, scale) = candidates.into_iter().enumerate().find_map(|(n, (variant, scale))| {
            progress.step(n + 1);
            attention.scale = scale;
            let sel = sel_ours.as_ref().map(|s| variant.selection(s));
            let out = run(&attention, &x_ours, &variant.rope(c, seq), sel.as_ref());
            out.is_some_and(|out| out.matches(a, name, tol)).then_some((variant, scale))
        })?;
        Some(Rerun { part, variant, scale, checkpoint_scale, mscale: c.softmax_mscale() })
    }

    pub(crate) fn reading(self) -> String {
        let what = match self.variant {
            Variant::Scale { dim, mscale_power } => {
                let mscale = match (self.mscale == 1.0, mscale_power) {
                    (true, _) | (false, 0) => String::new(),
                    (false, 1) => " x mscale (once, not squared)".into(),
                    (false, _) => " x mscale²".into(),
                };
                let without = match (self.mscale != 1.0 && mscale_power == 0, dim) {
                    (true, ScaleDim::QkHead) => " (YaRN's mscale² left out)",
                    (true, _) => " (and no YaRN mscale²)",
                    _ => "",
                };
                format!(
                    "the softmax scale {}^-0.5{mscale} = {:.6}{without}, where the checkpoint's is {:.6}",
                    dim.label(),
                    self.scale,
                    self.checkpoint_scale
                )
            }
            Variant::RopeHalves => {
                let whose = match self.part {
                    Part::Attention => "GLM-5",
                    Part::Indexer => "GLM-5's indexer (not DeepSeek-V3.2's)",
                };
                format!("RoPE rotating halves (`rotate_half`: x[j] with x[j + d/2]), where {whose} rotates neighbours (x[2j] with x[2j+1])")
            }
            Variant::YarnFrequencies => "RoPE at rope_theta's frequencies: YaRN's interpolation left out".into(),
            Variant::NoYarn => format!(
                "YaRN left out: RoPE at rope_theta's frequencies and the softmax scale {:.6} without its mscale² (the \
                 checkpoint's is {:.6})",
                self.scale, self.checkpoint_scale
            ),
            Variant::AllKeys => "every causal key: the DSA selection is not applied".into(),
        };
        let part = match self.part {
            Part::Attention => "attention",
            Part::Indexer => "indexer",
        };
        format!("ours is this layer's {part} rerun on its input with {what}")
    }
}

/// The selection `d` attended over in layer `i`: its `dsa.topk`, else the indexer's on `x`.
fn selection(attention: &Attention, d: &Dump, i: usize, x: &Tensor, rope: &RopeTables) -> Option<Selection> {
    let (batch, seq, _) = x.dims3().ok()?;
    if let Ok(recorded) = d.selection(&HookPoint::Layer(i, LayerHook::DsaTopk).name(), batch, seq) {
        return Some(recorded);
    }
    let q_latent = attention.project(i, x, rope, &mut NoObserver).ok()?.q_latent;
    let mut sel = None;
    attention.select(i, x, &q_latent, rope, None, &mut sel, &mut NoObserver).ok()?;
    sel
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

/// Whether every row of `x` and `y` keeps the same causal keys (padding past the query, and
/// order, aside).
fn same_sets(x: &Selection, y: &Selection) -> bool {
    let causal = |sel: &Selection, b: usize, q: usize| {
        let mut keys: Vec<usize> = sel.row(b, q).iter().copied().filter(|&k| k <= q).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    };
    (x.batch, x.seq) == (y.batch, y.seq) && (0..x.batch).all(|b| (0..x.seq).all(|q| causal(x, b, q) == causal(y, b, q)))
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
