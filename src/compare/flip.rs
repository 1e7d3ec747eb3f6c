//! A flip (a row whose selected set differs between two runs: routing or DSA), the margins and
//! leads that decided it on each side, how far its keys moved, and why one rule cannot have made
//! it. `crate::flips` measures these; this is what a comparison records of them.

use super::{Comparison, Detail};

/// A row whose selected set differs between the two sides (a routing or DSA *flip*).
#[derive(Debug, Clone, PartialEq)]
pub struct Flip {
    /// Flat row index, and its coordinate in the tensor's leading dimensions.
    pub row: usize,
    pub at: Vec<usize>,
    pub only_ours: Vec<i64>,
    pub only_reference: Vec<i64>,
    /// DSA: the keys past the query each side's row holds (ours, the reference's), which the
    /// causal sets leave out: a causality bug's later keys, named where a row kept fewer.
    pub past: [Vec<i64>; 2],
    pub recall: f64,
    /// The margin that decided the row on each side, where the dumps hold it.
    pub margin_ours: Option<f32>,
    pub margin_reference: Option<f32>,
    /// Where a side's dump holds the scores its selection ranked: how far they put the keys it
    /// alone kept over the ones the other side alone kept (the lowest of the first minus the
    /// highest of the second), when that is not negative (`flips::add_movement`,
    /// `flips::reference_rule_breaks`). A row's margin only bounds it from below: a swap of a key
    /// far above the cut with one at it has a small margin and a large lead.
    pub lead_ours: Option<f32>,
    pub lead_reference: Option<f32>,
    /// Where both dumps hold the scores the selection ranked: how far the flipped keys' scores
    /// moved between the runs (`flips::add_movement`).
    pub moved: Option<Movement>,
    /// Why one rule cannot have made the flip, where that can be told (`flips::add_movement`,
    /// `flips::reference_rule_breaks`).
    pub rule_break: Option<RuleBreak>,
}

/// How far a flip's keys (or experts) moved between two runs, against the layer's noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Movement {
    /// The largest `|ours - reference|` of the flipped keys' scores.
    pub keys: f32,
    /// The 99th percentile of `|ours - reference|` over every score of the layer.
    pub noise: f32,
    /// Whether the flipped keys' own scores decide them (a plain top-k: DSA, flat routing, and
    /// routing of unknown rule), so that keys that did not move cannot flip whatever the others
    /// did; grouped routing's groups are decided by other experts' scores too.
    pub alone: bool,
}

/// Why a flip is not one rule's choice on two sets of scores: the rule itself differs (a bias,
/// a scale, a top-k), not its input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RuleBreak {
    /// The keys moved less than half the two margins: a rank reversal under one rule needs at
    /// least that (ours kept x over y by `margin_ours`, the reference y over x by its margin, so
    /// `|Δx| + |Δy| >= margin_ours + margin_reference`).
    TooLittle,
    /// One side left out a key (`left_out`) that its own scores, under the rule (the
    /// checkpoint's, for routing), rank above one it kept (`kept`), by `by`: that side's choice
    /// is not the rule's.
    OwnScores { side: Side, kept: i64, left_out: i64, by: f32 },
}

/// Which dump of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Ours,
    Reference,
}

impl Side {
    /// Its name in JSON.
    pub fn key(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::Reference => "reference",
        }
    }

    /// Its name in a sentence.
    pub fn label(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::Reference => "the reference",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Ours => Side::Reference,
            Side::Reference => Side::Ours,
        }
    }
}

impl Flip {
    /// The keys (or experts) only ours kept and only the reference kept, as indices into a row
    /// of `width` scores (ids outside it dropped).
    pub fn keys_in(&self, width: usize) -> [Vec<usize>; 2] {
        let in_row =
            |keys: &[i64]| keys.iter().filter_map(|&k| usize::try_from(k).ok()).filter(|&k| k < width).collect();
        [in_row(&self.only_ours), in_row(&self.only_reference)]
    }

    /// [`Flip::keys_in`] as `side` chose: the keys it alone kept, then those it left out that the
    /// other side kept.
    pub fn kept_by(&self, side: Side, width: usize) -> [Vec<usize>; 2] {
        let [ours, theirs] = self.keys_in(width);
        match side {
            Side::Ours => [ours, theirs],
            Side::Reference => [theirs, ours],
        }
    }

    /// How clearly `side` decided against the other's keys: the larger of its row's margin and
    /// the flipped keys' own lead, where either is known.
    pub fn decided_by(&self, side: Side) -> Option<f32> {
        let (margin, lead) = match side {
            Side::Ours => (self.margin_ours, self.lead_ours),
            Side::Reference => (self.margin_reference, self.lead_reference),
        };
        match (margin, lead) {
            (Some(m), Some(l)) => Some(m.max(l)),
            (m, l) => m.or(l),
        }
    }

    /// Whether one rule cannot have made it ([`RuleBreak`]).
    pub fn unexplained(&self) -> bool {
        self.rule_break.is_some()
    }

    /// Whether the run's own noise explains it: its keys moved no more than the layer's 99th
    /// percentile, and it is a swap of keys one rule could make. A row that kept fewer distinct
    /// keys than the other side (a duplicate, padding or a later key where a causal key belongs)
    /// is a selection bug however little its scores moved, and a run whose scores are the same
    /// bits on both sides has no noise to explain a flip (an exact tie broken otherwise does).
    pub fn within_noise(&self) -> bool {
        let noisy = self.moved.is_some_and(|m| m.keys <= m.noise);
        self.fewer_keys().is_none() && !self.unexplained() && !self.unmoved() && noisy
    }

    /// Whether the scores that decided it are the same bits on both sides (its keys' own, where
    /// they alone decide; else the whole layer's): a flip no noise made (an exact tie broken
    /// otherwise, or another rule).
    pub fn unmoved(&self) -> bool {
        self.moved.is_some_and(|m| m.keys == 0.0 && (m.alone || m.noise == 0.0))
    }

    /// The side whose row kept fewer distinct keys than the other's: it lost keys and gained
    /// none, so it held a duplicate, padding or a key past the query where the other kept a
    /// causal key (a causality or selection bug). None for a swap of keys.
    pub fn fewer_keys(&self) -> Option<Side> {
        match (self.only_ours.is_empty(), self.only_reference.is_empty()) {
            (true, false) => Some(Side::Ours),
            (false, true) => Some(Side::Reference),
            _ => None,
        }
    }
}

#[cfg(test)]
impl Flip {
    /// Row 0 of a selection of two, one key swapped (1 ours, 2 the reference's), with `margins`.
    pub(crate) fn with_margins(ours: Option<f32>, reference: Option<f32>) -> Flip {
        Flip {
            row: 0,
            at: vec![0],
            only_ours: vec![1],
            only_reference: vec![2],
            past: [vec![], vec![]],
            recall: 0.5,
            margin_ours: ours,
            margin_reference: reference,
            lead_ours: None,
            lead_reference: None,
            moved: None,
            rule_break: None,
        }
    }
}

/// Every flip in `results`, with the name of the selection it is in, in order. Only decisions
/// (`dsa.topk`, `moe.topk_ids`: what a margin decided) flip; other integer tensors that differ
/// (`moe.bias_changed`, a consequence of the logits) are `Detail::Exact` mismatches.
pub fn flips(results: &[Comparison]) -> Vec<(&str, &Flip)> {
    fn of(c: &Comparison) -> &[Flip] {
        match &c.detail {
            Detail::Sets { flips, .. } => flips,
            _ => &[],
        }
    }
    results.iter().flat_map(|c| of(c).iter().map(|f| (c.name.as_str(), f))).collect()
}
