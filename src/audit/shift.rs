//! `audit --against`: the load of the audited runs against a reference's runs of the same
//! prompts (a quantised port's against the original's): per layer, the net load moved, the
//! tokens and routing slots that changed token by token, the experts that gained and lost most,
//! and both MaxVios; the reference must have run the same tokens.

use std::fmt::Write;

use serde_json::{json, Value};

use super::{max_vio, Audit, LayerLoad, Run};
use crate::error::{Error, Result};

/// How one layer's load moved against a reference's (`Audit::shift`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerShift {
    pub layer: usize,
    /// The reference's routing slots (tokens x k).
    pub slots: u64,
    /// The share of them that went to other experts.
    pub moved: f64,
    /// Up to three experts that gained most, and lost most: (expert, tokens gained or lost).
    pub gained: Vec<(usize, i64)>,
    pub lost: Vec<(usize, i64)>,
    /// Experts past the three listed whose change equals the third's (gained, lost): a cut
    /// through a tie, said rather than left to read as the three alone.
    pub tied: [usize; 2],
    /// Token by token, where both audits kept their sets: the tokens whose expert set changed,
    /// and the routing slots that did (an expert chosen on one side only, counted once), gross
    /// where `moved` is net.
    pub changed: Option<Changed>,
    /// The layer's MaxVio on each side: whether the moves made it more or less balanced.
    pub max_vio: f64,
    pub reference_max_vio: f64,
}

/// Routing that changed token by token between two audits of the same tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Changed {
    pub tokens: u64,
    pub of_tokens: u64,
    pub slots: u64,
    /// Of the tokens changed: those both sides decided by a margin below [`NEAR_TIE`] (f32
    /// rounding may flip them), and those one side decided by at least that (f32 rounding does
    /// not; bf16's may, its near-tie margin being 4e-2; a token's margin is a lower bound of its
    /// flipped experts' lead). The rest are unknown (a side's margin was not recorded, or one is
    /// small and the other unknown), as `diff` classes flips.
    pub near_ties: u64,
    pub past_ties: u64,
}

/// The margin below which a routing choice is a near-tie: `diff`'s in f32 (its bf16 one is
/// 4e-2: a bf16 port's changes read as past ties here may be rounding's).
pub const NEAR_TIE: f32 = 1e-3;

/// `Audit::shift` as JSON: per layer, slots, moved share, and the gained / lost experts.
pub fn shift_json(shift: &[LayerShift]) -> Value {
    let pairs = |v: &[(usize, i64)]| v.iter().map(|(e, d)| json!({"expert": e, "tokens": d})).collect::<Vec<_>>();
    Value::Array(
        shift
            .iter()
            .map(|l| {
                json!({
                    "layer": l.layer, "slots": l.slots, "moved": l.moved,
                    "gained": pairs(&l.gained), "lost": pairs(&l.lost),
                    "gained_tied": l.tied[0], "lost_tied": l.tied[1],
                    "tokens_changed": l.changed.map(|c| c.tokens), "tokens": l.changed.map(|c| c.of_tokens),
                    "max_vio": l.max_vio, "reference_max_vio": l.reference_max_vio,
                    "slots_changed": l.changed.map(|c| c.slots),
                    "tokens_changed_near_tie": l.changed.map(|c| c.near_ties),
                    "tokens_changed_past_tie": l.changed.map(|c| c.past_ties),
                })
            })
            .collect(),
    )
}

/// The net load moved from `reference`'s counts to `ours` (one layer's, per expert): half the
/// sum of `|ours - reference|` over the reference's routing slots. Tokens that swapped experts
/// both ways cancel out.
pub fn net_moved(ours: &[u64], reference: &[u64]) -> f64 {
    moved(&delta(ours, reference), reference.iter().sum())
}

/// Per expert, `ours - reference` (two guessed expert counts may differ: a missing expert has
/// no tokens).
fn delta(ours: &[u64], reference: &[u64]) -> Vec<i64> {
    let count = |c: &[u64], e: usize| c.get(e).copied().unwrap_or(0) as i64;
    (0..ours.len().max(reference.len())).map(|e| count(ours, e) - count(reference, e)).collect()
}

/// Token by token (rows of `k` ascending ids), what changed from `reference` to `ours`, each
/// changed token classed by the margins that decided it on each side (one a token, NaN where
/// unknown; empty where none was kept).
fn changed(ours: (&[u16], &[f32]), reference: (&[u16], &[f32]), k: usize) -> Changed {
    let mut c = Changed { tokens: 0, of_tokens: (ours.0.len() / k) as u64, slots: 0, near_ties: 0, past_ties: 0 };
    for (t, (a, b)) in ours.0.chunks_exact(k).zip(reference.0.chunks_exact(k)).enumerate() {
        let only_ours = a.iter().filter(|x| b.binary_search(x).is_err()).count() as u64;
        c.slots += only_ours;
        if only_ours == 0 {
            continue;
        }
        c.tokens += 1;
        let (m, n) = (ours.1.get(t).copied().unwrap_or(f32::NAN), reference.1.get(t).copied().unwrap_or(f32::NAN));
        if m >= NEAR_TIE || n >= NEAR_TIE {
            c.past_ties += 1;
        } else if m < NEAR_TIE && n < NEAR_TIE {
            c.near_ties += 1;
        }
    }
    c
}

/// Where two runs' rows of tokens first part: the row, the position, and each side's id there
/// (`none` past a shorter row).
pub(super) struct TokenDifference {
    pub row: usize,
    pub position: usize,
    pub ours: String,
    pub theirs: String,
}

/// The first row (in order) where `ours` and `theirs` hold other tokens; None where every row of
/// the shorter list matches.
pub(super) fn first_difference<A: AsRef<[u32]>, B: AsRef<[u32]>>(ours: &[A], theirs: &[B]) -> Option<TokenDifference> {
    ours.iter().zip(theirs).enumerate().find_map(|(row, (a, b))| {
        let (a, b) = (a.as_ref(), b.as_ref());
        let position = (0..a.len().max(b.len())).find(|&p| a.get(p) != b.get(p))?;
        let id = |r: &[u32]| r.get(position).map_or("none".to_string(), u32::to_string);
        Some(TokenDifference { row, position, ours: id(a), theirs: id(b) })
    })
}

/// Half the summed change over the reference's `slots`.
fn moved(delta: &[i64], slots: u64) -> f64 {
    delta.iter().map(|d| d.unsigned_abs()).sum::<u64>() as f64 / 2.0 / slots.max(1) as f64
}

impl Audit {
    /// Refuses a reference whose runs held other tokens (or, where ids are not recorded, another
    /// count of routing slots): their loads would differ by the inputs, not by the routing.
    pub fn check_comparable(&self, reference: &Audit) -> Result<()> {
        if let (Some(ours), Some(theirs)) = (rows(&self.runs), rows(&reference.runs)) {
            if ours.len() != theirs.len() {
                let stopped = match self.stopped {
                    Some(_) => format!(" ({} stopped the prompts early)", crate::interrupt::signal_name()),
                    None => String::new(),
                };
                return Err(Error::Usage(format!(
                    "the audited runs hold {} rows of tokens{stopped}, --against {}: it must run the same prompts",
                    ours.len(),
                    theirs.len()
                )));
            }
            if let Some(TokenDifference { row: r, position: p, ours: a, theirs: b }) = first_difference(&ours, &theirs)
            {
                return Err(Error::Usage(format!(
                    "row {r} of the audited runs differs from --against's at position {p} ({a} vs {b}): it must run the same prompts"
                )));
            }
        }
        let slots = |l: &LayerLoad| l.counts.iter().sum::<u64>();
        let mut common = 0;
        for (i, l) in &self.layers {
            let Some(r) = reference.layers.get(i) else { continue };
            common += 1;
            if l.k != r.k {
                return Err(Error::Usage(format!(
                    "layer {i}: {} experts a token against the reference's {}: one model's routing",
                    l.k, r.k
                )));
            }
            if slots(l) != slots(r) {
                return Err(Error::Usage(format!(
                    "layer {i}: {} routing slots against the reference's {}: --against must run the same tokens",
                    slots(l),
                    slots(r)
                )));
            }
        }
        if common == 0 {
            return Err(Error::Usage("--against shares no MoE layer with the audited runs".into()));
        }
        Ok(())
    }

    /// Per layer, how the load moved from `reference`'s to this one (same model, the same layers):
    /// the share of routing slots that went to other experts (`sum |ours - reference| / 2` over
    /// the reference's slots) and the experts that gained and lost most. A net measure of load:
    /// tokens that swapped experts both ways cancel out (`diff` counts the flips themselves).
    pub fn shift<'a>(&'a self, reference: &'a Audit) -> Vec<LayerShift> {
        self.layers
            .iter()
            .filter_map(|(i, l)| {
                let r = reference.layers.get(i)?;
                let delta = delta(&l.counts, &r.counts);
                let slots: u64 = r.counts.iter().sum();
                let moved = moved(&delta, slots);
                // The largest changes each way; ties by expert id, lowest first.
                let pick = |sign: i64| {
                    let mut order: Vec<usize> = (0..delta.len()).filter(|&e| delta[e] * sign > 0).collect();
                    order.sort_by(|&a, &b| (delta[b] * sign).cmp(&(delta[a] * sign)).then(a.cmp(&b)));
                    let third = order.get(2).map(|&e| delta[e]);
                    let tied = order.iter().skip(3).filter(|&&e| Some(delta[e]) == third).count();
                    (order.into_iter().take(3).map(|e| (e, delta[e])).collect::<Vec<_>>(), tied)
                };
                let ((gained, gained_tied), (lost, lost_tied)) = (pick(1), pick(-1));
                let tied = [gained_tied, lost_tied];
                let (ours, theirs) = (self.sets.as_ref(), reference.sets.as_ref());
                let margins = |a: &'a Audit| a.set_margins.get(i).map_or(&[][..], Vec::as_slice);
                let changed = (ours.and_then(|s| s.get(i)))
                    .zip(theirs.and_then(|s| s.get(i)))
                    .filter(|(a, b)| a.len() == b.len() && l.k > 0)
                    .map(|(a, b)| changed((a, margins(self)), (b, margins(reference)), l.k));
                let (max_vio, reference_max_vio) = (max_vio(&l.counts), max_vio(&r.counts));
                Some(LayerShift { layer: *i, slots, moved, gained, lost, tied, changed, max_vio, reference_max_vio })
            })
            .collect()
    }

    pub fn shift_table(&self, reference: &Audit) -> String {
        let list = |v: &[(usize, i64)], tied: usize| {
            let mut s = v.iter().map(|(e, d)| format!("{e}:{d:+}")).collect::<Vec<_>>().join(" ");
            if tied > 0 {
                s += &format!(" +{tied} tied");
            }
            s
        };
        let mut s = format!(
            "load shift against the reference ({} prompt(s)): net load moved, sum |ours - reference| / 2 over the \
             reference's slots (tokens that swapped experts both ways cancel); and gross, token by token, the \
             tokens whose expert set changed (of them, near-ties, both sides decided by a margin below 1e-3, which \
             f32 rounding may flip, and past ties, a side decided by 1e-3 or more, which it does not: bf16's rounding \
             reaches 4e-2, which `diff` weighs) and the slots that did\n\
             {:>5} {:>8} {:>7} {:>15} {:>14} {:>14} {:>8} {:>8}  {:<30}  lost most\n",
            reference.prompts(),
            "layer",
            "slots",
            "moved",
            "tokens changed",
            "near/past tie",
            "slots changed",
            "MaxVio",
            "ref's",
            "gained most"
        );
        let pct = |n: u64, of: u64| format!("{:.1}%", 100.0 * n as f64 / of.max(1) as f64);
        for l in self.shift(reference) {
            let moved = format!("{:.1}%", 100.0 * l.moved);
            let (tokens, ties, slots) = match l.changed {
                Some(c) => (
                    format!("{} {}", c.tokens, pct(c.tokens, c.of_tokens)),
                    format!("{}/{}", c.near_ties, c.past_ties),
                    pct(c.slots, l.slots),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                s,
                "{:>5} {:>8} {moved:>7} {tokens:>15} {ties:>14} {slots:>14} {:>8.3} {:>8.3}  {:<30}  {}",
                l.layer,
                l.slots,
                l.max_vio,
                l.reference_max_vio,
                list(&l.gained, l.tied[0]),
                list(&l.lost, l.tied[1])
            );
        }
        for note in self.shift_notes(reference) {
            let _ = writeln!(s, "note: {note}");
        }
        s
    }

    /// The layers one side lacks, which have no shift: said, rather than left to vanish; and,
    /// where tokens changed experts, that some of them may be rounding's.
    pub fn shift_notes(&self, reference: &Audit) -> Vec<String> {
        let mut notes = self.one_sided(reference, "the reference", "no shift there");
        // Changed tokens neither near-tie nor past one: a side's margin is unknown.
        let unknown: Vec<String> = (self.shift(reference).iter())
            .filter_map(|l| Some((l.layer, l.changed?)))
            .filter(|(_, c)| c.near_ties + c.past_ties < c.tokens)
            .map(|(layer, c)| format!("layer {layer}: {} of {}", c.tokens - c.near_ties - c.past_ties, c.tokens))
            .collect();
        if !unknown.is_empty() {
            notes.push(format!(
                "some changed tokens are neither near-tie nor past one ({}): a side recorded no margin for them \
                 (`glimpse diff OURS REFERENCE --model DIR` recomputes margins from gate logits)",
                unknown.join(", ")
            ));
        }
        notes
    }
}

/// Every run's batch rows in order; None when a run's ids are unknown.
fn rows(runs: &[Run]) -> Option<Vec<&[u32]>> {
    let runs =
        runs.iter().map(|r| r.tokens.as_ref().map(|t| t.ids.chunks(t.seq.max(1)))).collect::<Option<Vec<_>>>()?;
    Some(runs.into_iter().flatten().collect())
}
