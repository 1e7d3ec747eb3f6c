//! Readings of a comparison: what its first divergence looks like where a pattern names a
//! likely cause (a factor, near-ties, rounding's tail, flips a rule made on matching scores,
//! where along the sequence it starts or ends, rows each rescaled, routing weights another rule
//! made, experts chosen without the bias, a shared expert left out, a head fed the state before
//! the final norm, a mask that leaves out the diagonal, an attention or indexer that a rerun with
//! a port's scale, RoPE or keys reproduces), and what the reference holds that ours does not. `diff` prints them beside the numbers; they are hints, each said only where its
//! pattern holds.

mod between;
mod latent;
mod moe_rerun;
mod mtp;
mod onset;
mod rerun;
mod routing;
mod rows;

pub use between::Between;
pub use latent::{Latent, LatentNorm};
pub use moe_rerun::{MoeRerun, MoeVariant};
pub use onset::{Leading, Onset};
pub use rerun::{Part, Rerun, ScaleDim, Variant};
pub use routing::{BiasLeftOut, UnbiasedTies, WeightsRule};
pub use rows::RowScale;

use crate::compare::{element_ok, Comparison, Detail, Flip, Side, Tolerance};
use crate::config::Config;
use crate::diff::{floats, ints, DiffOptions, DiffReport};
use crate::dump::Dump;
use crate::flips::Class;
use crate::hooks::{HookPoint, LayerHook};

/// Two tensors (of `total` elements) whose least-squares `scale` and `cosine` say they are a
/// factor apart: what is left once the scale is taken out (1 - cos², of the squared norm) is
/// small against it, and at most a tenth of the tensor (a factor of 120 fitted to a tensor a few
/// rows of which went wrong explains nothing), and it is past rounding (bf16's half ulp is
/// 2e-3). One element always has a cosine of 1.
fn factor(scale: f64, cosine: f64, total: usize) -> Option<String> {
    // (A NaN or an unshared infinity leaves both undefined: no factor.)
    if total < 2
        || !scale.is_finite()
        || !cosine.is_finite()
        || (scale - 1.0).abs() <= 1e-2
        || 1.0 - cosine * cosine >= (1e-2 * (scale - 1.0).powi(2)).min(0.1)
    {
        return None;
    }
    // Exactly, up to rounding (a missing scaling: one bf16 rounding leaves 1 - cos² near 3e-6),
    // or mostly (a per-token factor, like a skipped normalisation).
    let how = if 1.0 - cosine * cosine < 1e-4 { "a constant factor apart" } else { "mostly a factor apart" };
    Some(format!("ours = {scale:.4} x reference, cosine {cosine:.6}: {how}"))
}

impl DiffReport {
    /// The spec's hook points the reference holds and ours does not: not compared, which a
    /// partial recording means, and so does a port that names its tensors otherwise.
    pub fn missing_spec_names(&self) -> Vec<&str> {
        let in_spec = |n: &&String| HookPoint::parse(n).is_some_and(|p| p.in_spec());
        self.only_b.iter().filter(in_spec).map(String::as_str).collect()
    }

    /// Why ours may lack them, where its own names say: the same names behind a prefix
    /// (`model.layers.0.input_norm`), or layers numbered one up (from 1).
    pub(crate) fn missing_names_hint(&self, missing: &[&str]) -> Option<String> {
        // A layer's activation both hold that matches says the names line up (two windows or
        // partial recordings that overlap): what ours lacks it did not record. (Not a selection
        // or margin: a prompt no longer than index_topk keeps every key, the same in every layer.)
        let lines_up = |c: &Comparison| {
            let activation = HookPoint::parse(&c.name).is_some_and(|p| p.layer().is_some() && p.in_spec());
            c.ok && activation && matches!(c.detail, Detail::Float { .. })
        };
        if self.results.iter().any(lines_up) {
            return None;
        }
        // A prefix: ours's names outside the spec that end with most of the missing ones after
        // the same prefix (not `mtp.logits`, a name of its own ending with `logits`).
        let foreign: Vec<&str> =
            self.only_a.iter().map(String::as_str).filter(|a| HookPoint::parse(a).is_none()).collect();
        let prefix_of =
            |m: &str| foreign.iter().find_map(|a| a.strip_suffix(m).filter(|p| p.ends_with('.') || p.ends_with('/')));
        let mut prefixes: Vec<&str> = missing.iter().filter_map(|m| prefix_of(m)).collect();
        prefixes.sort_unstable();
        let most = prefixes.chunk_by(|x, y| x == y).max_by_key(|run| run.len());
        if let Some(run) = most.filter(|run| run.len() * 2 > missing.len()) {
            return Some(format!("ours names them with a `{}` prefix", run[0]));
        }
        // Layers numbered from 1: most missing `layers.{i}.X` are ours's `layers.{i+1}.X`, and
        // ours holds a layer past the reference's last (a window that starts at 1 does not).
        // Not where the dumps ran different configs: two models' layers need not line up.
        if self.configs_differ {
            return None;
        }
        let ours: std::collections::HashSet<&str> =
            self.results.iter().map(|c| c.name.as_str()).chain(self.only_a.iter().map(String::as_str)).collect();
        let last = |names: &mut dyn Iterator<Item = &str>| names.filter_map(|n| HookPoint::parse(n)?.layer()).max();
        let theirs_last =
            last(&mut self.results.iter().map(|c| c.name.as_str()).chain(self.only_b.iter().map(String::as_str)));
        let ours_last = last(&mut ours.iter().copied());
        let shifted: Vec<String> = missing
            .iter()
            .filter_map(|m| match HookPoint::parse(m)? {
                HookPoint::Layer(i, h) => Some(HookPoint::Layer(i + 1, h).name()),
                _ => None,
            })
            .collect();
        let found = shifted.iter().filter(|n| ours.contains(n.as_str())).count();
        (found * 2 > shifted.len() && ours_last > theirs_last).then(|| "ours numbers its layers from 1".into())
    }

    /// The side that leaves out the query's own key in every DSA flip (`at` = [b, s]) where the
    /// other keeps it, over two flips or more none of which is a near-tie (a bf16 run's one
    /// near-tie can be a query's own key); None otherwise.
    fn own_key_left_out(&self, flips: &[Flip]) -> Option<Side> {
        // (A key only the other side keeps is one this side left out.)
        let left_out = |f: &Flip, side: Side| {
            let kept_by_other = if side == Side::Ours { &f.only_reference } else { &f.only_ours };
            f.at.get(1).is_some_and(|&s| kept_by_other.contains(&(s as i64)))
        };
        if flips.len() < 2 || flips.iter().any(|f| Class::of(f, self.near_tie) == Class::NearTie) {
            return None;
        }
        [Side::Ours, Side::Reference].into_iter().find(|&side| flips.iter().all(|f| left_out(f, side)))
    }

    /// What DSA flips say from the selections themselves: one side always leaving out the query's
    /// own key, in two flips or more and no near-tie (its causal mask leaves out the diagonal; the
    /// scores would say it too, where recorded); else, where the two do not both hold the indexer
    /// scores, how to have the flips read (a `run --dump` leaves the S x S scores out unless
    /// asked), or, where both hold other layers' and neither this one's, that it is a
    /// shared-indexer layer's selection, which no scores of its own decide.
    fn dsa_sets(&self, name: &str, flips: &[Flip]) -> Option<String> {
        if let Some(side) = self.own_key_left_out(flips) {
            return Some(format!(
                "in every flip {} keeps the query's own key and {} leaves it out: a causal mask off by one (`<` for \
                 `<=`)",
                side.other().label(),
                side.label()
            ));
        }
        let scores = name.replace("topk", "scores");
        let named = |n: &String| *n == scores;
        let side = match (self.only_a.iter().any(named), self.only_b.iter().any(named)) {
            _ if self.results.iter().any(|c| c.name == scores) => return None,
            (true, _) => "the reference holds no",
            (_, true) => "ours holds no",
            // Both record other layers' scores and neither this one's: a shared-indexer layer,
            // which scores nothing (it reuses an earlier full layer's selection).
            _ if self.results.iter().any(|c| c.name.ends_with(".dsa.scores")) => {
                return Some(format!(
                    "neither dump holds {scores}, and both hold other layers': a shared-indexer layer, whose \
                     selection is an earlier full layer's{}",
                    if self.with_model { "" } else { " (--model DIR checks that ours reuses it)" }
                ));
            }
            _ => "neither dump holds",
        };
        Some(format!("{side} {scores}: record it (`--record '*,*.dsa.scores'`) to have these flips read"))
    }

    /// What the first divergence looks like, where a pattern names a likely cause: among them two
    /// tensors a factor apart (exactly, or mostly: a per-token factor), selections that differ
    /// only by near-ties, selections made from scores that match (the rule differs, not its
    /// input), and the reruns of its operations on ours's inputs ([`Self::reading_with`]).
    pub(crate) fn reading(&self, c: &Comparison) -> Option<String> {
        self.reading_with(c, &self.notes)
    }

    /// [`Self::reading`] of a divergence `c` whose values say `notes` (the first divergence past
    /// near-ties or rounding's tail: [`DiffReport::past_rounding`]).
    pub(crate) fn reading_with(&self, c: &Comparison, notes: &Notes) -> Option<String> {
        // The scores the selection ranked, where they match, and how far they moved.
        // The scores the selection ranks, where they match: their name, how far they moved, and
        // their comparison.
        let input = || {
            let name = HookPoint::parse(&c.name).and_then(crate::flips::ranked_scores)?.0.name();
            let scores = self.results.iter().find(|r| r.name == name && r.ok)?;
            Some((name, scores.detail.max_abs()?, scores))
        };
        let rule = |name: &str| match name.ends_with("router_logits") {
            true => "the routing rule or the correction bias differs",
            false => "the top-k rule differs",
        };
        let mostly_real = |flips: &[Flip]| {
            let [near_ties, real, _] = Class::counts(flips, self.near_tie);
            near_ties == 0 && 2 * real > flips.len()
        };
        // (The notes are `c`'s, which is what this reads.)
        if let Some(rule) = notes.weights_reading() {
            return Some(rule);
        }
        if let Some(fed) = notes.mtp_input {
            return Some(fed.reading());
        }
        if let Some(moe) = notes.moe_rerun {
            return Some(moe.reading());
        }
        if let Some((norm, latent)) = notes.latent_norm {
            return Some(norm.reading(latent));
        }
        if let Some(rerun) = notes.rerun {
            return Some(rerun.reading());
        }
        if let Some(left_out) = notes.bias_left_out {
            return Some(left_out.reading());
        }
        if let Some(source) = notes.not_reused {
            return Some(format!(
                "a shared-indexer layer: the reference's selection is layer {source}'s, ours's is not (it must reuse \
                 layer {source}'s, not choose its own)"
            ));
        }
        let dsa_sets = match &c.detail {
            Detail::Sets { flips, .. } if c.name.ends_with(".dsa.topk") => self.dsa_sets(&c.name, flips),
            _ => None,
        };
        match &c.detail {
            // The scale explains the difference.
            Detail::Float { cosine, scale, total, .. } if factor(*scale, *cosine, *total).is_some() => {
                // A factor of the routed experts' scaling: a port that applies it twice, or not.
                let named = notes.routed_scaling.and_then(|rsf| {
                    let near = |x: f64| (scale / x - 1.0).abs() < 1e-3;
                    if near(rsf) {
                        Some(format!(" (routed_scaling_factor {rsf}: applied twice?)"))
                    } else if near(1.0 / rsf) {
                        Some(format!(" (1 / routed_scaling_factor {rsf}: left out?)"))
                    } else {
                        None
                    }
                });
                factor(*scale, *cosine, *total).map(|f| f + &named.unwrap_or_default())
            }
            Detail::Float { .. } if notes.row_scale.is_some() => notes.row_scale.map(|r| r.reading(&c.name)),
            // (Masking a causal key the reference scores is no position-wise effect: said beside an onset.)
            Detail::Float { .. } if notes.mask.is_some_and(|m| m.ours > 0 || notes.onset.is_none()) => {
                notes.mask.map(|m| m.reading())
            }
            Detail::Float { .. } => notes.tail.map(Tail::reading),
            Detail::Exact { .. } => notes.unbiased_ties.map(UnbiasedTies::reading),
            // Rows that kept fewer distinct causal keys than the other side: no rule's choice.
            Detail::Sets { flips, .. } if flips.iter().any(|f| f.fewer_keys().is_some()) => {
                let sides: Vec<Side> = flips.iter().filter_map(Flip::fewer_keys).collect();
                let n = sides.len();
                let side = match sides.iter().all(|&s| s == Side::Ours) {
                    true => "ours keeps",
                    false => "one side keeps",
                };
                Some(format!(
                    "{n} of {} flips are rows where {side} fewer distinct causal keys (duplicates, padding or later \
                     keys where a causal key belongs: a causality or selection bug)",
                    flips.len()
                ))
            }
            Detail::Sets { flips, .. } if Class::all_rounding(flips, self.near_tie) => {
                Some("every flip a near-tie".into())
            }
            // (Said of DSA selections from the selections alone: `dsa_sets`.)
            Detail::Sets { .. } if dsa_sets.is_some() => dsa_sets,
            // Real flips over scores that match: the rule differs, not its input. A flip under one
            // rule needs its scores to move by half its two margins, so at least half the larger:
            // scores that moved less than that for every flip (measured on the input, gate logits
            // moving more than the sigmoid of them) leave the rule. ("Matches" alone says too
            // little: at a loose tolerance scores move past the margins.) Most flips real and the
            // rest unknown says so too: a side whose choice is no top-k of its own scores under the
            // checkpoint's rule (a port's other bias) has an unknown margin.
            Detail::Sets { flips, .. } if mostly_real(flips) => {
                let (name, moved, _) = input()?;
                let larger = |f: &Flip| {
                    let sides = [Side::Ours, Side::Reference].map(|s| f.decided_by(s));
                    sides.into_iter().flatten().fold(0f32, f32::max) as f64
                };
                let real: Vec<&Flip> = flips.iter().filter(|f| Class::of(f, self.near_tie) == Class::Real).collect();
                let needed = real.iter().map(|f| larger(f)).fold(f64::INFINITY, f64::min);
                let which = match real.len() == flips.len() {
                    true => "the flips are real".to_string(),
                    false => format!("{} of {} flips are real (the rest unknown)", real.len(), flips.len()),
                };
                (2.0 * moved < needed).then(|| {
                    format!(
                        "its input {name} matches (max_abs {moved:.1e}, under half of every real flip's margin) and \
                         {which}: {}",
                        rule(&name)
                    )
                })
            }
            // Flips none of which is a near-tie (their margins unknown: routing without --model)
            // over gate logits that moved by m: one rule flips only choices tied within 2m, which
            // chance makes of about rows x 2m x E tokens (the k-th and next scores' gap has a
            // density of about E, the experts, near 0).
            // Ten times that many flips, and two at least, are no such ties.
            Detail::Sets { flips, rows, .. }
                if flips.len() > 1 && flips.iter().all(|f| Class::of(f, self.near_tie) == Class::Unknown) =>
            {
                let (name, moved, logits) = input().filter(|(n, ..)| n.ends_with("router_logits"))?;
                // E: the gate logits' width (their elements a token), 256 where they do not say.
                let experts = match logits.detail {
                    Detail::Float { elements, .. } if elements >= *rows => elements / (*rows).max(1),
                    _ => 256,
                };
                let chance = *rows as f64 * 2.0 * moved * experts as f64;
                let test = if self.with_model { "" } else { "; --model DIR tests each flip" };
                (flips.len() as f64 >= 10.0 * chance).then(|| {
                    format!(
                        "its input {name} matches (max_abs {moved:.1e}, so one rule flips only choices tied within \
                         {:.1e}, about {chance:.1} of {rows} tokens by chance): {} flips say {}{test}",
                        2.0 * moved,
                        flips.len(),
                        rule(&name)
                    )
                })
            }
            _ => None,
        }
    }
}

/// A float difference that looks like rounding's tail, not a bug's pattern (`Tail`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tail {
    /// Elements outside the tolerance, of `total` finite ones.
    pub bad: usize,
    pub total: usize,
    pub nmse: f64,
    /// The NMSE the tolerance allows: `sum((atol + rtol |e|)^2) / sum(e^2)`.
    pub allowed: f64,
}

impl Tail {
    /// `ours` against `reference` (of `shape`, rows along its last dimension) when the elements
    /// outside the tolerance are a tail of noise that covers the whole tensor:
    /// - noise everywhere: at least half the finite elements differ at all (a bug in a few rows
    ///   or channels leaves the rest exact);
    /// - at most 1% of the finite elements outside the tolerance, scattered: over at least half
    ///   as many distinct rows, and columns, as that many elements dropped at random would
    ///   cover (a bug's elements share rows, a position, or columns, a channel);
    /// - no NaN, and every infinity the same on both sides;
    /// - an NMSE at most a quarter of what the tolerance allows (an rms error under half of it).
    ///
    /// None otherwise, when every element is inside the tolerance, or when the reference is 0.
    pub fn of(ours: &[f32], reference: &[f32], shape: &[usize], tol: Tolerance) -> Option<Tail> {
        let width = match shape {
            [.., w] if shape.len() > 1 => (*w).max(1),
            _ => 1,
        };
        if ours.len() != reference.len() {
            return None;
        }
        let (mut rows, mut cols) = (Vec::new(), Vec::new());
        let (mut finite, mut differ) = (0usize, 0usize);
        let (mut err, mut norm, mut allowed) = (0f64, 0f64, 0f64);
        for (i, (&a, &e)) in ours.iter().zip(reference).enumerate() {
            // An infinity both sides hold matches; a NaN never does (the spec), so no tail.
            if !a.is_finite() || !e.is_finite() {
                if a.is_nan() || a != e {
                    return None;
                }
                continue;
            }
            (finite, differ) = (finite + 1, differ + usize::from(a != e));
            let (a64, e64) = (a as f64, e as f64);
            (err, norm) = (err + (a64 - e64).powi(2), norm + e64 * e64);
            allowed += (tol.atol + tol.rtol * e64.abs()).powi(2);
            if !element_ok(a, e, tol) {
                if (rows.len() + 1) * 100 > ours.len() {
                    return None;
                }
                rows.push(i / width);
                cols.push(i % width);
            }
        }
        let bad = rows.len();
        // Distinct values among `bad` drawn at random from `n`: n (1 - (1 - 1/n)^bad).
        let scattered = |mut v: Vec<usize>, n: usize| {
            v.sort_unstable();
            v.dedup();
            let n = n.max(1) as f64;
            2.0 * v.len() as f64 >= n * (1.0 - (1.0 - 1.0 / n).powi(bad as i32))
        };
        let (nmse, allowed) = (err / norm, allowed / norm);
        let tail = bad > 0
            && bad * 100 <= finite
            && 2 * differ >= finite
            && scattered(rows, ours.len() / width)
            && scattered(cols, width)
            && norm > 0.0
            && nmse.is_finite()
            && nmse <= allowed / 4.0;
        tail.then_some(Tail { bad, total: finite, nmse, allowed })
    }

    pub(crate) fn reading(self) -> String {
        format!(
            "{} of {} elements outside, scattered over a difference everywhere, and its rms error under half the tolerance (nmse {:.1e}, which \
             it allows to {:.1e}): the tail of rounding noise, as a lower-precision run leaves; a bug moves whole \
             rows, columns or the tensor",
            self.bad, self.total, self.nmse, self.allowed
        )
    }
}

/// What the first divergence's values say beyond its numbers, found while `diff` has them (where
/// along the sequence it starts, the rule that made ours's routing weights, the reruns of its
/// operations on ours's inputs, and the rest below): the readings' evidence.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Notes {
    pub onset: Option<Onset>,
    pub leading: Option<Leading>,
    pub weights_rule: Option<WeightsRule>,
    /// The position from which the weights follow `weights_rule`, where the earlier ones follow
    /// the checkpoint's (the tokens past an onset).
    pub weights_rule_from: Option<usize>,
    /// For a shared-indexer layer's selection: the layer whose selection it reuses, where the
    /// reference's is that layer's and ours's is not (ours recomputed it, or reused another).
    pub not_reused: Option<usize>,
    /// A float difference that looks like rounding's tail ([`Tail`]).
    pub tail: Option<Tail>,
    /// For indexer scores: causal keys one side masked (`-inf`) and the other scored.
    pub mask: Option<Mask>,
    /// For `moe.bias_changed` (with `--model`'s routers): how many of its differences are
    /// near-ties of the choice without the bias.
    pub unbiased_ties: Option<UnbiasedTies>,
    /// For routing weights and a MoE layer's output, with `--model`: its `routed_scaling_factor`
    /// (not 1), which a factor between the two may be.
    pub routed_scaling: Option<f64>,
    /// For a MoE layer's output, with `--model`: the variant of the MoE whose rerun gives ours's
    /// (the shared expert missing or twice, the experts' gate and up swapped).
    pub moe_rerun: Option<MoeRerun>,
    /// For a latent, with `--model`: the norm whose rerun gives ours's.
    pub latent_norm: Option<(LatentNorm, Latent)>,
    /// For an attention output or the indexer's scores, with `--model`: the softmax scale, RoPE or
    /// keys whose rerun gives ours's.
    pub rerun: Option<Rerun>,
    /// Every row a scaled copy of the reference's, by factors of its own.
    pub row_scale: Option<RowScale>,
    /// For routing, with `--model`: a side that chose without the correction bias.
    pub bias_left_out: Option<BiasLeftOut>,
    /// For `mtp.input_hidden`: what a side fed its MTP head instead of its final norm ([`mtp`]).
    pub mtp_input: Option<mtp::MtpInput>,
}

/// Causal keys of `dsa.scores` (`[B, S, T]`) that one side masked and the other scored: a causal
/// mask off by one shows as ours masking each query's own key, which no position-wise reading
/// (RoPE, YaRN) explains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mask {
    /// Masked by ours only, and of those on the diagonal (a query's own key).
    pub ours: usize,
    pub diagonal: usize,
    /// Masked by the reference only.
    pub reference: usize,
    /// The queries (`B x S`): an off-by-one mask masks the diagonal of most of them.
    pub queries: usize,
    pub positions: usize,
    /// The first query position where ours masks a causal key: a decode path's mask may break
    /// from the first decoded position only.
    pub from: Option<usize>,
}

impl Mask {
    /// Ours masks each query's own key, for most queries from the first it masks one (two at
    /// least), and nothing else.
    pub fn off_by_one(&self) -> bool {
        let after = self.from.map_or(self.queries, |f| self.queries / self.positions.max(1) * (self.positions - f));
        self.ours == self.diagonal && self.diagonal >= 2 && 2 * self.diagonal > after
    }
}

impl Mask {
    fn of(ours: &[f32], reference: &[f32], shape: &[usize]) -> Option<Mask> {
        let &[b, s, t] = shape else { return None };
        if s == 0 || t < s || ours.len() != reference.len() {
            return None;
        }
        let mut m = Mask { ours: 0, diagonal: 0, reference: 0, queries: b * s, positions: s, from: None };
        for (i, (&a, &e)) in ours.iter().zip(reference).enumerate() {
            let (q, k) = ((i / t) % s, i % t);
            let own = t - s + q;
            if k > own {
                continue;
            }
            match (a == f32::NEG_INFINITY, e == f32::NEG_INFINITY) {
                (true, false) if !e.is_nan() => {
                    m.ours += 1;
                    m.diagonal += usize::from(k == own);
                    m.from = Some(m.from.map_or(q, |f| f.min(q)));
                }
                (false, true) if !a.is_nan() => m.reference += 1,
                _ => {}
            }
        }
        (m.ours + m.reference > 0).then_some(m)
    }

    pub fn reading(&self) -> String {
        let theirs = match self.reference {
            0 => String::new(),
            n => format!("; the reference masks {n} that ours scores"),
        };
        // (From a later position: a decode path's mask, where the prefill's is right. An off-by-one
        // mask leaves position 0 alone where it keeps a query's only key.)
        let later = |after: usize| match self.from {
            Some(f) if f > after && self.ours > 1 => format!(", from position {f} on"),
            _ => String::new(),
        };
        match (self.ours, self.diagonal) {
            (0, _) => format!("the reference masks {} causal keys ours scores", self.reference),
            (n, _) if self.off_by_one() => format!(
                "ours masks {n} causal keys the reference scores, every one a query's own key (the diagonal){}: a \
                 causal mask off by one (`<` for `<=`){theirs}",
                later(1)
            ),
            (n, d) => {
                format!("ours masks {n} causal keys the reference scores ({d} on the diagonal){}{theirs}", later(0))
            }
        }
    }
}

impl Notes {
    /// For the tensor `name`, its values (ours, the reference's) and shape (the reference's).
    pub(crate) fn of(
        a: &Dump,
        b: &Dump,
        name: &str,
        (ours, reference, shape): (&[f32], &[f32], &[usize]),
        opts: &DiffOptions,
    ) -> Notes {
        let point = HookPoint::parse(name);
        let tail = Tail::of(ours, reference, shape, opts.tol_for(name));
        // A row's width as stored, whatever the positions below make of the rows.
        let width = shape.last().copied();
        // Router tensors are [B*S, ...]: by position as [B, S, ...], where the reference says B
        // (`Dump::batch`; the MTP layer's rows are one position short a batch row: [B, S - 1, ...]).
        let shape = match point {
            Some(HookPoint::Layer(_, h)) if h.token_rows() => match (b.batch(), shape.split_first()) {
                (Some(batch), Some((&rows, rest))) if batch > 0 && rows % batch == 0 => {
                    [&[batch, rows / batch][..], rest].concat()
                }
                _ => Vec::new(),
            },
            _ => shape.to_vec(),
        };
        let index_topk = b
            .names()
            .iter()
            .find(|n| n.ends_with(".dsa.topk"))
            .and_then(|n| b.shape(n))
            .and_then(|s| Some((*s.get(1)?, *s.last()?)))
            .and_then(|(seq, k)| (k < seq).then_some(k));
        // Scores, and what is made before them (the embeddings, before any attention), are not
        // the selection's doing.
        let before_attention = match point {
            Some(HookPoint::Layer(_, h)) => h < LayerHook::AttnOut,
            Some(p) => p == HookPoint::Embeddings,
            None => false,
        };
        let index_topk = index_topk.filter(|_| !before_attention);
        let matching = crate::compare::matching_positions(ours, reference, &shape, opts.tol_for(name));
        // The elements past the onset, of positions `p..` in each batch row of `[B, S, width]`:
        // what a bug of decode steps or later chunks alone made.
        fn late<T: Copy>(v: &[T], seq: usize, p: usize, width: usize) -> Vec<T> {
            v.chunks_exact((seq * width).max(1)).flat_map(|row| row.get(p * width..).unwrap_or(&[])).copied().collect()
        }
        let seq = shape.get(1).copied().unwrap_or(0);
        let onset = matching.map(|matching| {
            let width = ours.len() / shape.iter().take(2).product::<usize>().max(1);
            let (x, y) = (late(ours, seq, matching, width), late(reference, seq, matching, width));
            let factor = match crate::compare::compare_floats(&x, &y, &[x.len()], opts.tol_for(name)).1 {
                Detail::Float { scale, cosine, total, .. } => factor(scale, cosine, total).map(|_| (scale, cosine)),
                _ => None,
            };
            Onset { matching, index_topk, batch: shape[0], factor }
        });
        let weights_rule = || {
            let Some(HookPoint::Layer(i, LayerHook::TopkWeights)) = point else { return None };
            let (rc, bias) = opts.routers.as_ref()?.layer(i)?;
            let logits = floats(a, &HookPoint::Layer(i, LayerHook::RouterLogits).name())?;
            let ids = ints(a, &HookPoint::Layer(i, LayerHook::TopkIds).name())?;
            let (e, k) = (bias.len(), rc.top_k);
            if let Some(rule) = WeightsRule::of(&logits, &ids, ours, rc, bias, opts.tol_for(name)) {
                return Some((rule, None));
            }
            // Else, past an onset, the rule of the tokens there (a decode path's own rule).
            let p = matching?;
            let (logits, ids, weights) = (late(&logits, seq, p, e), late(&ids, seq, p, k), late(ours, seq, p, k));
            WeightsRule::of(&logits, &ids, &weights, rc, bias, opts.tol_for(name)).map(|rule| (rule, Some(p)))
        };
        let (weights_rule, weights_rule_from) = weights_rule().unzip();
        let weights_rule_from = weights_rule_from.flatten();
        let mask = match point {
            Some(HookPoint::Layer(_, LayerHook::DsaScores)) => Mask::of(ours, reference, &shape),
            _ => None,
        };
        // A mask off by one parts the two by keys, not positions: the onset's reading (RoPE)
        // would mislead. (A few masked keys leave it.)
        let onset = onset.filter(|_| !mask.is_some_and(|m| m.off_by_one()));
        let routed_scaling = match point {
            Some(HookPoint::Layer(i, LayerHook::TopkWeights | LayerHook::MlpOut)) => opts
                .config
                .as_ref()
                .and_then(|c| (c.is_moe(i) && c.routed_scaling_factor != 1.0).then_some(c.routed_scaling_factor)),
            _ => None,
        };
        // (Rows that part at an onset, the earlier ones exact, are read by where it starts.)
        let row_scale = width.filter(|_| onset.is_none()).and_then(|w| RowScale::of(ours, reference, w));
        let ckpt = opts.checkpoint.as_deref();
        let moe_rerun = ckpt.and_then(|m| MoeRerun::of(a, b, name, m, |n| opts.tol_for(n)));
        let latent_norm = ckpt.and_then(|m| LatentNorm::of(a, b, name, m, opts.tol_for(name)));
        let leading = crate::compare::differing_positions(ours, reference, &shape, opts.tol_for(name))
            .map(|differing| Leading { differing, index_topk });
        let mtp_input = (point == Some(HookPoint::MtpInputHidden))
            .then(|| mtp::MtpInput::of(a, Side::Ours).or_else(|| mtp::MtpInput::of(b, Side::Reference)))
            .flatten();
        Notes {
            onset,
            leading,
            weights_rule,
            weights_rule_from,
            not_reused: None,
            tail,
            mask,
            unbiased_ties: None,
            bias_left_out: None,
            routed_scaling,
            row_scale,
            moe_rerun,
            latent_norm,
            rerun: None,
            mtp_input,
        }
    }

    /// The routing weights' rule, said of the tokens it holds for.
    pub fn weights_reading(&self) -> Option<String> {
        let rule = self.weights_rule?.reading();
        Some(match self.weights_rule_from {
            Some(p) => format!("from position {p} on, {rule}"),
            None => rule.into(),
        })
    }

    /// For the selection `name` of a shared-indexer layer (with `--model`'s config): the layer
    /// it reuses, when the reference's rows are that layer's and ours's are not, as sets of
    /// causal keys.
    pub(crate) fn not_reused(a: &Dump, b: &Dump, name: &str, config: &Config) -> Option<usize> {
        let Some(HookPoint::Layer(i, LayerHook::DsaTopk)) = HookPoint::parse(name) else { return None };
        let source = config.indexer_source(i);
        if source == i {
            return None;
        }
        let reused = |d: &Dump| {
            let src = HookPoint::Layer(source, LayerHook::DsaTopk).name();
            let shape = d.shape(name).filter(|s| Some(s) == d.shape(&src).as_ref())?;
            Some(crate::compare::compare_dsa(&ints(d, name)?, &ints(d, &src)?, &shape).0)
        };
        (reused(b)? && !reused(a)?).then_some(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A few scattered elements past a bf16 tolerance with a small rms error, over a difference
    /// everywhere, are rounding's tail; the same count in one row (a position), one column (a
    /// channel) or a grid of both, over an otherwise exact tensor, errors large enough to weigh
    /// in the NMSE, more than 1% of the elements, or a reference of zeros are not.
    #[test]
    fn a_tail_is_few_scattered_elements_and_a_small_rms_error() {
        let tol = Tolerance { atol: 2e-2, rtol: 2e-2 };
        let shape = [40, 50];
        let reference: Vec<f32> = (0..2000).map(|i| (i as f32 * 0.37).sin()).collect();
        let with = |bumps: &[(usize, usize)], by: f32| {
            let mut ours: Vec<f32> = reference.iter().map(|e| e * (1.0 + 1e-3)).collect();
            bumps.iter().for_each(|&(r, c)| ours[r * 50 + c] += by);
            Tail::of(&ours, &reference, &shape, tol)
        };
        let scattered = [(0, 0), (10, 7), (20, 33), (30, 41)];
        let tail = with(&scattered, 0.1).unwrap();
        assert_eq!((tail.bad, tail.total), (4, 2000));
        assert!(tail.nmse < tail.allowed / 4.0 && tail.reading().contains("4 of 2000 elements outside"));
        assert_eq!(with(&[], 0.1), None, "nothing outside");
        assert_eq!(with(&[(5, 0), (5, 1), (5, 2), (5, 3)], 0.1), None, "one row");
        assert_eq!(with(&[(0, 7), (10, 7), (20, 7), (30, 7)], 0.1), None, "one column");
        assert_eq!(with(&scattered, 30.0), None, "outliers that weigh in the nmse");
        let many: Vec<(usize, usize)> = (0..21).map(|i| (i, (i * 7) % 50)).collect();
        assert_eq!(with(&many, 0.1), None, "more than 1% of the elements");
        assert!(with(&many[..20], 0.1).is_some(), "1% exactly");
        // Three positions of three channels: 9 elements on 3 rows and 3 columns, where 9 dropped
        // at random would cover about 8 of each.
        let grid: Vec<(usize, usize)> = [2, 15, 33].iter().flat_map(|&r| [4, 9, 40].map(|c| (r, c))).collect();
        assert_eq!(with(&grid, 0.1), None, "a grid of positions and channels");
        // The same scattered elements over a tensor otherwise exact: no noise to be a tail of.
        let mut exact = reference.clone();
        scattered.iter().for_each(|&(r, c)| exact[r * 50 + c] += 0.1);
        assert_eq!(Tail::of(&exact, &reference, &shape, tol), None, "exact elsewhere");
        let (zeros, mut one) = (vec![0f32; 2000], vec![1e-3f32; 2000]);
        one[7] = 1000.0;
        assert_eq!(Tail::of(&one, &zeros, &shape, tol), None, "a reference of zeros");
    }

    /// Indexer scores one side masked at causal keys: a mask that drops each query's own key is
    /// read as one off by one; a single masked key is only counted.
    #[test]
    fn masked_causal_keys_are_read() {
        let inf = f32::NEG_INFINITY;
        // [1, 4, 4], lower triangle scored; ours masks the diagonal of queries 1-3.
        let reference: Vec<f32> = (0..16).map(|i| if i % 4 <= i / 4 { i as f32 } else { inf }).collect();
        let mut ours = reference.clone();
        for q in 1..4 {
            ours[q * 4 + q] = inf;
        }
        let m = Mask::of(&ours, &reference, &[1, 4, 4]).unwrap();
        assert_eq!((m.ours, m.diagonal, m.reference), (3, 3, 0));
        assert!(m.reading().contains("every one a query's own key (the diagonal): a causal mask off by one"));
        let mut one = reference.clone();
        one[2 * 4 + 1] = inf;
        let m = Mask::of(&one, &reference, &[1, 4, 4]).unwrap();
        assert_eq!(m.reading(), "ours masks 1 causal keys the reference scores (0 on the diagonal)");
        assert_eq!(
            Mask::of(&reference, &one, &[1, 4, 4]).unwrap().reading(),
            "the reference masks 1 causal keys ours scores"
        );
        assert_eq!(Mask::of(&reference, &reference, &[1, 4, 4]), None);
        // A decode path's: its own key masked from position 2 on only, and key 0 from position 1.
        let mut late = reference.clone();
        for q in 2..4 {
            late[q * 4 + q] = inf;
        }
        let m = Mask::of(&late, &reference, &[1, 4, 4]).unwrap();
        assert!(m.reading().contains("the diagonal), from position 2 on: a causal mask off by one"), "{}", m.reading());
        let mut first = reference.clone();
        for q in 1..4 {
            first[q * 4] = inf;
        }
        let m = Mask::of(&first, &reference, &[1, 4, 4]).unwrap();
        assert_eq!(
            m.reading(),
            "ours masks 3 causal keys the reference scores (0 on the diagonal), from position 1 on"
        );
    }
}
