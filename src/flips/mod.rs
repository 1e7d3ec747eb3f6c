//! Flips (a routing or DSA selection that differs between two runs) and the margins that decided
//! them, so a near-tie, which rounding alone can flip, is told from a bug. A margin is what a dump
//! records (`dsa.margin`, `moe.margin`) or is recomputed from what a transformers dump records
//! (`dsa.scores`; `moe.router_logits` with the checkpoint's routers): the recorded choice's own
//! lead over what it left out, known only where those scores admit that choice. `verify`, `diff`
//! and the terminal UI class flips here.

use crate::compare::{row_set, Comparison, Detail, Flip, Movement, RuleBreak, Side};
use crate::config::Config;
use crate::diff::{floats, ints};
use crate::dump::{Dump, Values};
use crate::hooks::{HookPoint, LayerHook};
use crate::model::moe::{choice_scores, route, sigmoid, RouterConfig};

/// How close the decision a flip overturned was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Decided by less than the near-tie threshold on both sides.
    NearTie,
    /// Decided by at least the threshold on one side at least.
    Real,
    /// Neither side's margin is known, or only one, below the threshold.
    Unknown,
}

impl Class {
    /// A flip overturns both sides' decisions (a key or expert each kept over the other by at
    /// least its margin), so the scores moved by at least the sum of the two margins between
    /// them: rounding alone flips it only when both are small. (Classing by the smaller one
    /// misclassed a bug's flips: a reference margin of 1e-2 with ours at 1e-4 read as a
    /// near-tie.) With grouped routing a margin is the smaller of the experts' gap and the
    /// groups' (`Route::margin`), so a flip of a near-tied group choice reads as a near-tie too.
    ///
    /// A side's margin is the larger of its row's and the flipped keys' own lead where its
    /// scores are known ([`Flip::decided_by`]): a key far above the cut swapped with one at it is
    /// no near-tie, whatever the row's k-th and (k+1)-th scores. And a row that kept fewer
    /// distinct causal keys than the other (duplicates, padding, a later key) is no rule's
    /// choice at all: real.
    pub fn of(fl: &Flip, near_tie: f64) -> Class {
        let clear = |m: Option<f32>| m.is_some_and(|m| m as f64 >= near_tie);
        match (fl.decided_by(Side::Ours), fl.decided_by(Side::Reference)) {
            _ if fl.fewer_keys().is_some() => Class::Real,
            // One clear margin is enough: the scores moved by at least that much.
            (a, b) if clear(a) || clear(b) => Class::Real,
            // Both known and small: rounding alone can flip it.
            (Some(_), Some(_)) => Class::NearTie,
            // One small margin, the other side's unknown (or neither known): it could be either.
            _ => Class::Unknown,
        }
    }

    /// Counts by class, in the order near-tie, real, unknown.
    pub fn counts<'a>(flips: impl IntoIterator<Item = &'a Flip>, near_tie: f64) -> [usize; 3] {
        let mut c = [0; 3];
        for f in flips {
            c[Class::of(f, near_tie) as usize] += 1;
        }
        c
    }

    /// Whether `flips` are rounding's alone: at least one, and every one a near-tie that its own
    /// side's scores do not contradict ([`Flip::unexplained`]: a choice that is no top-k of its
    /// own side's scores is a rule's difference however close the cut).
    pub fn all_rounding(flips: &[Flip], near_tie: f64) -> bool {
        !flips.is_empty() && flips.iter().all(|f| !f.unexplained() && Class::of(f, near_tie) == Class::NearTie)
    }

    pub fn label(self) -> &'static str {
        match self {
            Class::NearTie => "near-tie",
            Class::Real => "real",
            Class::Unknown => "unknown",
        }
    }
}

/// The selection whose margins decided `selection`'s rows: itself, or for a shared-indexer
/// layer's `dsa.topk` that of the full layer whose keys it reuses (`Config::indexer_source`),
/// since a shared layer records no margin or scores of its own.
pub fn deciding(selection: HookPoint, config: &Config) -> HookPoint {
    match selection {
        HookPoint::Layer(i, LayerHook::DsaTopk) => HookPoint::Layer(config.indexer_source(i), LayerHook::DsaTopk),
        p => p,
    }
}

/// The margins that decided the rows of `selection` (`dsa.topk` or `moe.topk_ids`) in `d`: its
/// recorded margin tensor; else recomputed from the indexer scores for DSA, and for routing from
/// the gate logits with the layer's `router` when given. A recomputed margin is the recorded
/// choice's own lead, the lowest score it kept minus the highest it left out, where that is not
/// negative (the recorded set is a top-k of those scores; 0 for an exact tie at the cut, however
/// the recording broke it), and NaN (unknown) where it is: a margin that does not describe the
/// recorded decision would misclass its flip. (Grouped routing takes the recomputed route's
/// margin where it chooses what was recorded.) None when the dump holds neither, or its shapes
/// do not fit each other.
pub fn margins_in(d: &Dump, selection: HookPoint, router: Option<(&RouterConfig, &[f32])>) -> Option<Vec<f32>> {
    if let Some(recorded) = recorded(d, selection) {
        return Some(recorded);
    }
    match selection {
        HookPoint::Layer(i, LayerHook::DsaTopk) => {
            let [b, s, _] = d.shape(&selection.name())?[..] else { return None };
            dsa_margins(d, i, 0..b * s)
        }
        HookPoint::Layer(i, LayerHook::TopkIds) => {
            let chosen = ints(d, &selection.name())?;
            let (rc, bias) = router?;
            let e = bias.len();
            let name = HookPoint::Layer(i, LayerHook::RouterLogits).name();
            let (logits, rows) = (floats(d, &name)?, d.shape(&name)?);
            if rows.last() != Some(&e) || chosen.len() != logits.len() / e * rc.top_k {
                return None;
            }
            let rows = logits.chunks_exact(e).zip(chosen.chunks_exact(rc.top_k));
            if rc.is_flat() {
                let choice = |l: &[f32]| choice_scores(rc, &l.iter().map(|&l| sigmoid(l)).collect::<Vec<_>>(), bias).0;
                return Some(rows.map(|(l, ids)| lead(&choice(l), ids, rc.top_k)).collect());
            }
            // With groups the experts left out of dropped groups may score above the kept ones:
            // the recomputed route's margin, where it makes the recorded choice (so a tie the
            // recording broke otherwise stays unknown here).
            let routes: Vec<_> = logits.chunks_exact(e).map(|row| route(rc, row, bias)).collect();
            let ids: Vec<i64> = routes.iter().flat_map(|r| r.ids.iter().map(|&j| j as i64)).collect();
            reproduced(routes.iter().map(|r| r.margin).collect(), rc.top_k, &chosen, &ids, |_, _| true)
        }
        _ => None,
    }
}

/// `selection`'s margin tensor in `d`, where it holds one margin a row of the selection (another
/// tool's of another length, say from a cut or stitched run, would give flips other rows'
/// margins): else the margins are recomputed, as where none is recorded. A negative one (another
/// tool's: a choice that is not a top-k of its own scores) is unknown, NaN, as a recomputed lead
/// is there: it would otherwise pass for a small margin and class a rule break a near-tie.
fn recorded(d: &Dump, selection: HookPoint) -> Option<Vec<f32>> {
    let margins = floats(d, &selection.margin()?.name())?;
    let shape = d.shape(&selection.name())?;
    let rows: usize = shape.iter().rev().skip(1).product();
    let known = |m: f32| if m >= 0.0 { m } else { f32::NAN };
    (margins.len() == rows).then(|| margins.into_iter().map(known).collect())
}

/// The DSA margins of layer `i`'s query rows `rows` (batch rows flattened) in `d`, recorded or
/// recomputed from its `dsa.scores` as [`margins_in`] does. The scores and the selection are read
/// a slice of rows at a time, so a long context's `[B, S, S]` never sits in memory whole (at 32k
/// positions one batch row's is 4 GB, its `[B, S, 2048]` selection 512 MB).
pub fn dsa_margins(d: &Dump, i: usize, rows: std::ops::Range<usize>) -> Option<Vec<f32>> {
    dsa_margins_by(d, i, rows, SLICE)
}

/// Scores read at a time by [`dsa_margins`] (16 MB of f32).
const SLICE: usize = 1 << 22;

/// [`dsa_margins`], reading about `slice` scores at a time.
fn dsa_margins_by(d: &Dump, i: usize, rows: std::ops::Range<usize>, slice: usize) -> Option<Vec<f32>> {
    let selection = HookPoint::Layer(i, LayerHook::DsaTopk);
    if let Some(recorded) = recorded(d, selection) {
        return recorded.get(rows).map(<[f32]>::to_vec);
    }
    let scores = HookPoint::Layer(i, LayerHook::DsaScores).name();
    let [b, s, k] = d.shape(&selection.name())?[..] else { return None };
    if d.shape(&scores)? != [b, s, s] || s == 0 || k == 0 || rows.end > b * s {
        return None;
    }
    // Query q of a row chooses among its causal keys 0..=q (the rest is padding): it keeps
    // min(k, q + 1) of them.
    let chunk = (slice / s).max(1);
    let mut margins = Vec::with_capacity(rows.len());
    for start in rows.clone().step_by(chunk) {
        let count = chunk.min(rows.end - start);
        let (Values::F32(scores), Values::I64(chosen)) =
            (d.rows(&scores, start, count).ok()?, d.rows(&selection.name(), start, count).ok()?)
        else {
            return None;
        };
        for ((r, row), ids) in (start..).zip(scores.chunks_exact(s)).zip(chosen.chunks_exact(k)) {
            margins.push(lead(&row[..=r % s], ids, k.min(r % s + 1)));
        }
    }
    Some(margins)
}

/// How far the recorded choice `ids` (of which `want` distinct ones must index `values`) leads
/// the values it left out: the lowest chosen minus the highest not chosen (+inf when none is
/// left out); NaN when the choice is not `want` distinct indices or is not a top-`want` of
/// `values` (a lead below 0).
fn lead(values: &[f32], ids: &[i64], want: usize) -> f32 {
    let mut kept = vec![false; values.len()];
    for &j in ids {
        if let Some(slot) = usize::try_from(j).ok().and_then(|j| kept.get_mut(j)) {
            *slot = true;
        }
    }
    if kept.iter().filter(|&&x| x).count() != want {
        return f32::NAN;
    }
    let (mut low, mut high, mut left_out) = (f32::INFINITY, f32::NEG_INFINITY, false);
    for (&v, &k) in values.iter().zip(&kept) {
        if v.is_nan() {
            return f32::NAN;
        }
        if k {
            low = low.min(v);
        } else {
            high = high.max(v);
            left_out = true;
        }
    }
    match low - high {
        // Nothing left out: no cut.
        _ if !left_out => f32::INFINITY,
        m if m >= 0.0 => m,
        // A masked key kept over masked keys left out: an exact tie.
        m if m.is_nan() && low == f32::NEG_INFINITY && high == f32::NEG_INFINITY => 0.0,
        _ => f32::NAN,
    }
}

/// Each flip of `c` (a `dsa.topk` or `moe.topk_ids` comparison of `a` against `b`, its margins
/// set) with the flipped keys' lead on each side whose dump holds the scores ([`RankedRow::lead`],
/// each side on its own), and, where both do, with how far its keys' scores moved between the two dumps against the layer's noise
/// ([`Movement`]): the scores the selection ranked, `dsa.scores` (of the layer that decided it,
/// for a shared indexer) or the gate's `sigmoid(router_logits)` (the correction bias cancels
/// where both sides apply the same one; where they do not, the keys move too little for the
/// flip, which is what that test finds). The noise is over causal keys' finite changes; a key
/// masked on one side only (`-inf` there) moved infinitely. Nothing where either dump lacks the scores, their
/// shapes differ from each other or from the selection's rows, or they are larger than
/// [`MOVEMENT_MAX`] values.
///
/// And whether one rule cannot have made the flip ([`RuleBreak`]), tested where it can be
/// trusted, so a flip that reads as real or unknown is told to be a rule's:
/// - *Own scores*, for DSA and (with `router`, the checkpoint's bias, and `config` saying the
///   routing is flat) for routing: a side left out a flipped key that its own scores rank above
///   one it kept by `near_tie` or more (below, the recomputation's rounding could do it). Such a
///   side's recomputed margin is unknown ([`margins_in`]), so this is the test that sees a port
///   whose gate logits match but whose rule differs.
/// - *Too little*, for flat routing (a grouped margin may be the groups' gap, made of experts
///   that did not flip): a flip that swapped experts both ways, both margins known, finite and
///   summing to at least `near_tie`, whose experts moved less than half of them. (For DSA a
///   selection that is a top-k of its own scores always moved enough.)
pub fn add_movement(
    c: &mut Comparison,
    a: &Dump,
    b: &Dump,
    config: Option<&Config>,
    router: Option<(&RouterConfig, &[f32])>,
    near_tie: f64,
) {
    let Some(point) = HookPoint::parse(&c.name) else { return };
    let Some((scores, dsa)) = ranked_scores(config.map_or(point, |cfg| deciding(point, cfg))) else { return };
    let name = scores.name();
    let rows = match &c.detail {
        Detail::Sets { rows, flips, .. } if !flips.is_empty() => *rows,
        _ => return,
    };
    // Each side's scores, read once, where they lay out the selection's rows.
    let read = |d: &Dump| {
        let shape = scores_shape(d, &name, &c.name, dsa)?;
        let width = *shape.last()?;
        if rows.saturating_mul(width) > MOVEMENT_MAX {
            return None;
        }
        let values = floats(d, &name).filter(|v| v.len() == rows * width)?;
        Some((shape, values))
    };
    let sides = [read(a), read(b)];
    let flat = !dsa && config.is_some_and(|c| RouterConfig::new(c).is_flat());
    let [ours, theirs] = [&sides[0], &sides[1]]
        .map(|side| side.as_ref().and_then(|(shape, v)| Ranked::new(v, *shape.last()?, dsa, flat, router)));
    let Detail::Sets { flips, .. } = &mut c.detail else { return };
    // Each side's lead on its own: a glimpse dump records no S x S `dsa.scores` by default, and
    // the reference's lead alone must class a flip as `verify` classes it.
    for f in flips.iter_mut() {
        f.lead_ours = ours.as_ref().and_then(|r| r.row(f.row)?.lead(f, Side::Ours));
        f.lead_reference = theirs.as_ref().and_then(|r| r.row(f.row)?.lead(f, Side::Reference));
    }
    // The movement needs both, of one shape.
    let (Some((shape, x)), Some((other, y))) = (&sides[0], &sides[1]) else { return };
    let Some(&width) = shape.last().filter(|_| shape == other) else { return };
    let n = rows * width;
    // DSA: query q of a row of S sees keys 0..=T-S+q.
    let seq = if dsa { shape[1].max(1) } else { 1 };
    let causal = |i: usize| !dsa || i % width <= width - seq.min(width) + (i / width) % seq;
    let squash = |v: f32| if dsa { v } else { sigmoid(v) };
    let delta = |i: usize| {
        let (p, q) = (squash(x[i]), squash(y[i]));
        match (p.is_finite(), q.is_finite()) {
            (true, true) => Some((p - q).abs()),
            // Masked on one side only (a key one side excluded): as far as a key can move.
            (true, false) | (false, true) if !p.is_nan() && !q.is_nan() => Some(f32::INFINITY),
            _ => None,
        }
    };
    // (Finite changes only: a key masked on one side is a choice, not the run's noise.)
    let mut all: Vec<f32> = (0..n).filter(|&i| causal(i)).filter_map(delta).filter(|d| d.is_finite()).collect();
    if all.is_empty() {
        return;
    }
    let at = ((all.len() - 1) as f64 * 0.99).round() as usize;
    let noise = *all.select_nth_unstable_by(at, f32::total_cmp).1;
    drop(all);
    for f in flips.iter_mut() {
        let [kept, left] = f.keys_in(width);
        let deltas: Vec<Option<f32>> = kept.iter().chain(&left).map(|&k| delta(f.row * width + k)).collect();
        let Some(moved) = deltas.iter().flatten().copied().reduce(f32::max) else { continue };
        let rows = [(Side::Ours, &ours), (Side::Reference, &theirs)]
            .map(|(side, r)| (side, r.as_ref().and_then(|r| r.row(f.row))));
        let own = own_scores(f, &rows, near_tie);
        let too_little = match f.margin_ours.zip(f.margin_reference) {
            Some((mo, mr))
                if flat
                    && !kept.is_empty()
                    && !left.is_empty()
                    && kept.len() == f.only_ours.len()
                    && left.len() == f.only_reference.len()
                    && deltas.iter().all(|d| d.is_some_and(f32::is_finite))
                    && mo.is_finite()
                    && mr.is_finite()
                    && (mo + mr) as f64 >= near_tie =>
            {
                // 0.9: room for the rounding of the margins themselves.
                2.0 * moved < 0.9 * (mo + mr)
            }
            _ => false,
        };
        f.rule_break = own.or(too_little.then_some(RuleBreak::TooLittle));
        // Only grouped routing (known from a config) lets other experts' moves flip a token.
        let grouped = !dsa && config.is_some_and(|c| !RouterConfig::new(c).is_flat());
        f.moved = Some(Movement { keys: moved, noise, alone: !grouped });
    }
}

/// The scores a selection (`dsa.topk`, `moe.topk_ids`) ranked: `dsa.scores` (true: DSA) or the
/// gate's `router_logits`.
pub(crate) fn ranked_scores(selection: HookPoint) -> Option<(HookPoint, bool)> {
    match selection {
        HookPoint::Layer(i, LayerHook::DsaTopk) => Some((HookPoint::Layer(i, LayerHook::DsaScores), true)),
        HookPoint::Layer(i, LayerHook::TopkIds) => Some((HookPoint::Layer(i, LayerHook::RouterLogits), false)),
        _ => None,
    }
}

/// The shape of the scores `scores` in `d` where they lay out the rows of `selection` (its
/// `[B, S, K]` or `[N, k]`) in order: `[B, S, T]` for DSA, `[N, E]` for routing, T and E not 0.
/// None otherwise: another layout of the same values would pair rows with other rows' scores.
fn scores_shape(d: &Dump, scores: &str, selection: &str, dsa: bool) -> Option<Vec<usize>> {
    let (s, sel) = (d.shape(scores)?, d.shape(selection)?);
    let fits = match dsa {
        true => s.len() == 3 && sel.len() == 3 && s[..2] == sel[..2],
        false => s.len() == 2 && sel.len() == 2 && s[0] == sel[0],
    };
    (fits && s.last().is_some_and(|&w| w > 0)).then_some(s)
}

/// The values a selection's rule ranks, of one dump: DSA's `dsa.scores` as they are, flat
/// routing's `sigmoid(router_logits) + bias` (with the checkpoint's bias); `width` a row.
struct Ranked<'a> {
    values: &'a [f32],
    width: usize,
    /// The correction bias, for routing.
    bias: Option<&'a [f32]>,
}

impl<'a> Ranked<'a> {
    /// None where the rule's values cannot be had: routing that is not flat (a grouped choice
    /// ranks experts of dropped groups at -inf, and that choice's rounding is another test's),
    /// or without the checkpoint's bias of `width` experts.
    fn new(
        values: &'a [f32],
        width: usize,
        dsa: bool,
        flat: bool,
        router: Option<(&RouterConfig, &'a [f32])>,
    ) -> Option<Ranked<'a>> {
        match dsa {
            true => Some(Ranked { values, width, bias: None }),
            false => {
                let bias = router.map(|(_, bias)| bias).filter(|b| flat && b.len() == width)?;
                Some(Ranked { values, width, bias: Some(bias) })
            }
        }
    }

    /// The values of `row`; None outside those held.
    fn row(&self, row: usize) -> Option<RankedRow<'a>> {
        let start = row * self.width;
        Some(RankedRow { values: self.values.get(start..start + self.width)?, bias: self.bias })
    }
}

/// One row of [`Ranked`] values: a flip's, from a whole tensor or read alone (`verify` keeps only
/// the rows of its flips, not whole S x S scores).
#[derive(Clone, Copy)]
struct RankedRow<'a> {
    values: &'a [f32],
    bias: Option<&'a [f32]>,
}

impl RankedRow<'_> {
    /// Key `k`'s value as the rule ranks it.
    fn at(&self, k: usize) -> f32 {
        match self.bias {
            Some(b) => sigmoid(self.values[k]) + b.get(k).copied().unwrap_or(f32::NAN),
            None => self.values[k],
        }
    }

    /// The lead of `side`'s own choice in flip `f`: the lowest of the keys it alone kept minus
    /// the highest of the keys the other side alone kept; None where either set is empty (a row
    /// that kept fewer keys) or the lead is negative or NaN (a choice its own scores contradict:
    /// [`own_scores`] tells that).
    fn lead(&self, f: &Flip, side: Side) -> Option<f32> {
        let [kept, other] = f.kept_by(side, self.values.len());
        let (low, high) = (kept.iter().map(|&k| self.at(k)), other.iter().map(|&k| self.at(k)));
        // (`f32::min` and `max` would pass over a NaN key.)
        if low.clone().chain(high.clone()).any(f32::is_nan) {
            return None;
        }
        Some(low.reduce(f32::min)? - high.reduce(f32::max)?).filter(|l| *l >= 0.0)
    }
}

/// [`RankedRow::lead`] of `side` in flip `f` from that side's values of the flip's own row:
/// DSA's scores, or the gate's logits with `bias` (flat routing: ranked as `sigmoid + bias`).
pub fn row_lead(f: &Flip, side: Side, row: &[f32], bias: Option<&[f32]>) -> Option<f32> {
    RankedRow { values: row, bias }.lead(f, side)
}

/// A side whose choice its own ranked values of the flip's row contradict: it left out a flipped
/// key (or expert) that they rank above one it kept, by `near_tie` or more (below, the
/// recomputation's rounding could do it); the largest such lead over the `sides` tested.
fn own_scores(f: &Flip, sides: &[(Side, Option<RankedRow>)], near_tie: f64) -> Option<RuleBreak> {
    let mut found: Option<RuleBreak> = None;
    for &(side, row) in sides {
        let Some(r) = row else { continue };
        let [kept, left] = f.kept_by(side, r.values.len());
        for (&k, &l) in kept.iter().flat_map(|k| left.iter().map(move |l| (k, l))) {
            let by = r.at(l) - r.at(k);
            let larger = match found {
                Some(RuleBreak::OwnScores { by: b, .. }) => by > b,
                _ => true,
            };
            if by as f64 >= near_tie && larger {
                found = Some(RuleBreak::OwnScores { side, kept: k as i64, left_out: l as i64, by });
            }
        }
    }
    found
}

/// `verify`'s rule breaks of a selection `c` (the run against `golden`, its flips): the
/// reference's side alone, against its own recorded scores (the deciding layer's `dsa.scores`,
/// or its `router_logits` with `router`'s bias when `config` says routing is flat). Ours follows
/// the rule by construction; a port's dump given as the reference may not.
pub fn reference_rule_breaks(
    c: &mut Comparison,
    golden: &Dump,
    config: &Config,
    router: Option<(&RouterConfig, &[f32])>,
    near_tie: f64,
) {
    let Some(point) = HookPoint::parse(&c.name) else { return };
    let Some((scores, dsa)) = ranked_scores(deciding(point, config)) else { return };
    let name = scores.name();
    let width = scores_shape(golden, &name, &c.name, dsa).and_then(|s| s.last().copied());
    let (Detail::Sets { flips, .. }, Some(width)) = (&mut c.detail, width) else { return };
    let flat = RouterConfig::new(config).is_flat();
    // Each flip's own row of scores, read alone: a layer's whole `[B, S, S]` is 4 GB a batch
    // row at 32k tokens.
    for f in flips.iter_mut() {
        let Ok(Values::F32(row)) = golden.rows(&name, f.row, 1) else { continue };
        let ranked = Ranked::new(&row, width, dsa, flat, router).and_then(|r| r.row(0));
        f.rule_break = own_scores(f, &[(Side::Reference, ranked)], near_tie);
        f.lead_reference = ranked.and_then(|r| r.lead(f, Side::Reference));
    }
}

/// The most score values (per dump) [`add_movement`] reads: 2^26, a 256 MB f32 tensor each
/// (the `[B, S, S]` scores of 8192 tokens); larger dumps are not measured.
pub const MOVEMENT_MAX: usize = 1 << 26;

/// [`margins_in`] of the selection that decided `selection` ([`deciding`], with `config`). A
/// shared-indexer layer reuses its source layer's selection, so the source's margins describe its
/// rows only where the dump's shared selection is the source's: elsewhere (a port whose shared
/// layer parted from its source) they are unknown, and so is the class of a flip there.
pub fn deciding_margins(
    d: &Dump,
    selection: HookPoint,
    config: Option<&Config>,
    router: Option<(&RouterConfig, &[f32])>,
) -> Option<Vec<f32>> {
    let source = config.map_or(selection, |c| deciding(selection, c));
    let margins = margins_in(d, source, router)?;
    if source == selection {
        return Some(margins);
    }
    let (own, reused) = (ints(d, &selection.name())?, ints(d, &source.name())?);
    let [_, s, k] = d.shape(&selection.name())?[..] else { return None };
    reproduced(margins, k, &own, &reused, |r, j| j >= 0 && j as usize <= r % s)
}

/// `margin`, with NaN (unknown) for each row `r` whose `recomputed` choice differs from the
/// `recorded` one, compared as sets of the ids `keep(r, id)` admits (`k` ids a row); None when the
/// two do not hold `k` ids for every row of `margin`.
fn reproduced(
    mut margin: Vec<f32>,
    k: usize,
    recorded: &[i64],
    recomputed: &[i64],
    keep: impl Fn(usize, i64) -> bool,
) -> Option<Vec<f32>> {
    if recorded.len() != margin.len() * k || recomputed.len() != recorded.len() {
        return None;
    }
    for (r, m) in margin.iter_mut().enumerate() {
        if row_set(recorded, k, r, &keep) != row_set(recomputed, k, r, &keep) {
            *m = f32::NAN;
        }
    }
    Some(margin)
}

/// Flips counted by class, and the first 50 listed with the margin that decided each on both
/// sides and its class; `more` follows the count of those left out. Nothing when there are none.
pub fn render(flips: &[(&str, &Flip)], near_tie: f64, more: &str) -> String {
    if flips.is_empty() {
        return String::new();
    }
    let [near, real_count, unknown] = Class::counts(flips.iter().map(|(_, fl)| *fl), near_tie);
    // A real flip whose keys moved no more than most of the layer's scores did is one the run's
    // own noise explains (a quantised twin's), though its margins are past the threshold.
    let real = |fl: &Flip| Class::of(fl, near_tie) == Class::Real;
    let real_in_noise = flips.iter().filter(|(_, fl)| real(fl) && fl.within_noise()).count();
    let unexplained = flips.iter().filter(|(_, fl)| fl.unexplained()).count();
    let mut out = format!(
        "{} flips: {} near-tie (both margins < {near_tie:e}), {} real{}, {} of unknown margin{}\n",
        flips.len(),
        near,
        real_count,
        match flips.iter().any(|(_, fl)| fl.moved.is_some()) {
            true => format!(
                " ({real_in_noise} of them within the layer's score changes: their keys moved no more than its \
                 99th percentile, so the scores' difference explains them, whether rounding's or a bug's)"
            ),
            false => String::new(),
        },
        unknown,
        match unexplained {
            0 => String::new(),
            n => format!(
                "; {n} that one rule cannot make (a side's choice its own scores contradict, or keys that moved too \
                 little): the rule differs"
            ),
        }
    );
    for (name, fl) in flips.iter().take(50) {
        let m = |x: Option<f32>| x.map(|v| format!("{v:.3e}")).unwrap_or_else(|| "unknown".into());
        let padded = match fl.fewer_keys() {
            // Its keys past the query, where it holds any: the causality bug itself.
            Some(side) => {
                match &fl.past[usize::from(side == Side::Reference)] {
                    past if !past.is_empty() => {
                        format!(" ({} keeps fewer distinct causal keys: it holds {past:?}, past the query, where one belongs)", side.label())
                    }
                    _ => format!(
                        " ({} keeps fewer distinct causal keys: duplicates, padding or later keys instead)",
                        side.label()
                    ),
                }
            }
            None => String::new(),
        };
        let moved = match fl.moved {
            Some(m) => format!("; keys moved {:.3e}, layer p99 {:.3e}", m.keys, m.noise),
            None => String::new(),
        };
        let why = match (fl.rule_break, fl.within_noise()) {
            (Some(RuleBreak::TooLittle), _) => " (too little to flip it: the rule differs)".to_string(),
            (Some(RuleBreak::OwnScores { side, kept, left_out, by }), _) => format!(
                " ({} left out {left_out}, which its own scores rank {by:.3e} above {kept} it kept: its rule differs)",
                side.label()
            ),
            (None, true) => " (within the layer's score changes)".to_string(),
            (None, false) if fl.unmoved() && fl.fewer_keys().is_none() => {
                " (its keys' scores are the same on both sides: an exact tie broken otherwise, or another rule)"
                    .to_string()
            }
            (None, false) => String::new(),
        };
        // The keys' own lead, where it says more than the row's margin.
        let above = |lead: Option<f32>, margin: Option<f32>| lead.filter(|&l| margin.is_none_or(|m| l > m));
        let lead = match (above(fl.lead_ours, fl.margin_ours), above(fl.lead_reference, fl.margin_reference)) {
            (None, None) => String::new(),
            _ => format!(", flipped keys' lead ours {} ref {}", m(fl.lead_ours), m(fl.lead_reference)),
        };
        out += &format!(
            "  {name} {:?}: only ours {:?}, only ref {:?}, margin ours {} ref {}{lead} -> {}{padded}{moved}{why}\n",
            fl.at,
            fl.only_ours,
            fl.only_reference,
            m(fl.margin_ours),
            m(fl.margin_reference),
            Class::of(fl, near_tie).label()
        );
    }
    if flips.len() > 50 {
        out += &format!("  ... and {} more{more}\n", flips.len() - 50);
    }
    out
}

#[cfg(test)]
mod tests;
