//! Past what rounding explains: where the first divergence reads as rounding (a bf16 run's
//! near-tie flips, or its tail of noise), the first divergence rounding does not explain, whose
//! reading may name a bug. A near-tie flip changes its row for good, and attention carries the
//! change to every later position of its batch row (causally, never to an earlier one): a
//! difference confined to the positions at or past a batch row's first near-tie is the flips',
//! not a bug's. A bug of every token shows at the positions before.
//!
//! In a port whose noise grows past the tolerance over a few layers, the first divergence
//! rounding does not explain may have no reading (its noise, grown). Past it, what can be read on
//! ours's own inputs, where that noise does not enter, is read ([`Own`]): its routing against the
//! checkpoint's rule on its own gate logits, its latents' norms, and its first MoE output and
//! first attention output (or indexer scores) rerun on its own input.

use super::{notes_of, with_compared, DiffOptions, DiffReport};
use crate::compare::{element_ok, Comparison, Detail, Flip, Tolerance};
use crate::dump::{Dump, Values};
use crate::error::Result;
use crate::flips::Class;
use crate::hooks::{HookPoint, LayerHook};
use crate::reading::{Notes, Tail};

/// A (batch row, position) of the run.
type Row = (usize, usize);

/// Per batch row, the first position a flip rounding can make flipped (a near-tie, one of
/// unknown margin, or a real one where an earlier such flip reaches): it and every later one may
/// carry the flip's difference.
#[derive(Default)]
struct Flipped(std::collections::HashMap<usize, usize>);

impl Flipped {
    fn add(&mut self, (b, s): Row) {
        let first = self.0.entry(b).or_insert(s);
        *first = (*first).min(s);
    }
    fn covers(&self, (b, s): Row) -> bool {
        self.0.get(&b).is_some_and(|&first| s >= first)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Past what rounding explains ([`past_rounding`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Past {
    /// The first divergence rounding does not explain, and what its values say.
    pub name: String,
    pub notes: Notes,
    /// Where that one has no reading: the first divergence after it whose values, on ours's own
    /// inputs, read as a bug ([`Own`]), and what they say.
    pub own: Option<(String, Notes)>,
}

/// Readings made on ours's own inputs, which hold whatever noise ours carries in from earlier
/// layers: its routing against the checkpoint's rule on its own gate logits (read from the dump),
/// a latent's norm and a MoE layer's output rerun on its own input (one block of the checkpoint
/// each; the MoE's, all of a layer's experts, for the first MoE output only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Own {
    Routing,
    Latent,
    MoeOut,
    /// An attention output or indexer scores, rerun on ours's own `input_norm` with the softmax
    /// scales, RoPEs and keys ports get wrong (`reading::rerun`).
    Attention,
    Indexer,
}

impl Own {
    fn of(c: &Comparison, opts: &DiffOptions) -> Option<Own> {
        let moe = |i: usize| opts.config.as_ref().is_some_and(|c| c.is_moe(i));
        match HookPoint::parse(&c.name)? {
            HookPoint::Layer(_, LayerHook::TopkIds | LayerHook::TopkWeights) => Some(Own::Routing),
            HookPoint::Layer(_, LayerHook::QLatent | LayerHook::KvLatent) => Some(Own::Latent),
            HookPoint::Layer(i, LayerHook::MlpOut) if moe(i) => Some(Own::MoeOut),
            HookPoint::Layer(_, LayerHook::AttnOut) => Some(Own::Attention),
            HookPoint::Layer(_, LayerHook::DsaScores) => Some(Own::Indexer),
            _ => None,
        }
    }

    /// `c`'s notes where they read as a bug on ours's own inputs.
    fn read(r: &DiffReport, a: &Dump, b: &Dump, c: &Comparison, opts: &DiffOptions) -> Result<Option<Notes>> {
        let notes = notes_of(a, b, c, opts)?;
        Ok(Own::reads_as_bug(r, c, &notes).then_some(notes))
    }

    /// Whether `c`'s `notes` read as a bug on ours's own inputs.
    fn reads_as_bug(r: &DiffReport, c: &Comparison, notes: &Notes) -> bool {
        // (A mlp.out recorded before the shared expert is added is where a hook sits, no bug.)
        let moe = notes.moe_rerun.is_some_and(|m| m.variant != crate::reading::MoeVariant::RecordedBefore);
        let own = notes.weights_rule.is_some()
            || notes.bias_left_out.is_some()
            || moe
            || notes.latent_norm.is_some()
            || notes.rerun.is_some();
        own && r.reading_with(c, notes).is_some()
    }
}

/// The first divergence past what rounding explains in `r`, and what its values say (and, where
/// they say nothing, the first divergence after it read on ours's own inputs); None where the
/// first divergence does not read as rounding ([`DiffReport::first_reads_as_rounding`]) or as
/// where a hook sits ([`DiffReport::first_is_the_hooks_place`]), or they explain every one.
pub(super) fn past_rounding(r: &DiffReport, a: &Dump, b: &Dump, opts: &DiffOptions) -> Result<Option<Past>> {
    if !r.first_reads_as_rounding() && !r.first_is_the_hooks_place() {
        return Ok(None);
    }
    // A MoE layer's mlp.out that differs while its layer's output matches: recorded before the
    // shared expert is added (a port that keeps the routed and shared outputs apart), in every
    // MoE layer where the first one was.
    let hooks = r.first_is_the_hooks_place();
    let output_matches = |c: &Comparison| match HookPoint::parse(&c.name) {
        Some(HookPoint::Layer(i, LayerHook::MlpOut)) if hooks => {
            let output = HookPoint::Layer(i, LayerHook::Output).name();
            r.results.iter().any(|o| o.name == output && o.ok)
        }
        _ => false,
    };
    // (The run's batch rows: where routing's token rows sit, S positions a row, the MTP layer's
    // S - 1.)
    let batch = b.batch().or_else(|| a.batch());
    let mut flipped = Flipped::default();
    let diverging: Vec<&Comparison> = r.results.iter().filter(|c| !c.ok).collect();
    for (n, c) in diverging.iter().enumerate() {
        if output_matches(c) {
            continue;
        }
        // Routing that reads as another rule on ours's own gate logits is no rounding's, however
        // its flips' margins class them (a loose tolerance's near-tie threshold takes in a
        // bias's whole effect). (Its notes are kept for where rounding ends at it anyway.)
        let routing = match Own::of(c, opts) == Some(Own::Routing) {
            true => Some(notes_of(a, b, c, opts)?),
            false => None,
        };
        if let Some(notes) = routing.filter(|n| Own::reads_as_bug(r, c, n)) {
            return Ok(Some(Past { name: c.name.clone(), notes, own: None }));
        }
        if let Detail::Sets { flips, rows, .. } = &c.detail {
            let seq = positions(*rows, batch);
            let rows: Vec<Option<Row>> = flips.iter().map(|f| flip_row(&f.at, seq)).collect();
            // A flip rounding makes: a near-tie (or one of unknown margin) that its own side's
            // scores do not contradict, or a real one where an earlier near-tie reaches.
            let rounding = |(f, row): (&Flip, &Option<Row>)| {
                !f.unexplained()
                    && (Class::of(f, opts.near_tie) != Class::Real || row.is_some_and(|r| flipped.covers(r)))
            };
            if flips.iter().zip(&rows).all(rounding) {
                rows.into_iter().flatten().for_each(|r| flipped.add(r));
                continue;
            }
        }
        if !matches!(c.detail, Detail::Sets { .. }) && rounding_explains(a, b, c, opts, &flipped, batch) {
            continue;
        }
        let notes = match routing {
            Some(notes) => notes,
            None => notes_of(a, b, c, opts)?,
        };
        let own = match r.reading_with(c, &notes) {
            Some(_) => None,
            None => own_read(r, a, b, &diverging[n + 1..], opts)?,
        };
        return Ok(Some(Past { name: c.name.clone(), notes, own }));
    }
    Ok(None)
}

/// Where the first divergence has no reading and reads as neither rounding nor a hook's place
/// (which [`past_rounding`] reads past): the first divergence after it that reads as a bug on
/// ours's own inputs ([`Own`]), with the first's name and notes.
pub(super) fn past_unread_first(r: &DiffReport, a: &Dump, b: &Dump, opts: &DiffOptions) -> Result<Option<Past>> {
    let Some(first) = r.first_divergence() else { return Ok(None) };
    if r.reading(first).is_some() || r.first_reads_as_rounding() || r.first_is_the_hooks_place() {
        return Ok(None);
    }
    let after: Vec<&Comparison> = r.results.iter().filter(|c| !c.ok && c.name != first.name).collect();
    let own = own_read(r, a, b, &after, opts)?;
    Ok(own.map(|own| Past { name: first.name.clone(), notes: r.notes, own: Some(own) }))
}

/// Of the divergences `after` the first rounding does not explain, the first that reads as a bug
/// on ours's own inputs ([`Own`]).
fn own_read(
    r: &DiffReport,
    a: &Dump,
    b: &Dump,
    after: &[&Comparison],
    opts: &DiffOptions,
) -> Result<Option<(String, Notes)>> {
    // (The MoE rerun, all of a layer's experts, and the attention's and the indexer's, seconds a
    // variant at GLM-5's size, are tried at their first divergence only.)
    let (mut moe_rerun, mut attention, mut indexer) = (true, true, true);
    let mut progress = crate::progress::Steps::own_reads(after.len());
    for (n, c) in after.iter().enumerate() {
        progress.step(n + 1);
        let read = match Own::of(c, opts) {
            Some(Own::Routing | Own::Latent) => true,
            Some(Own::MoeOut) => std::mem::replace(&mut moe_rerun, false),
            Some(Own::Attention) => std::mem::replace(&mut attention, false),
            Some(Own::Indexer) => std::mem::replace(&mut indexer, false),
            None => false,
        };
        if read {
            if let Some(notes) = Own::read(r, a, b, c, opts)? {
                return Ok(Some((c.name.clone(), notes)));
            }
        }
    }
    Ok(None)
}

/// The positions a batch row of `rows` token rows over `batch` batch rows holds.
fn positions(rows: usize, batch: Option<usize>) -> Option<usize> {
    batch.filter(|&b| b > 0 && rows.is_multiple_of(b)).map(|b| rows / b)
}

/// The (batch row, position) of a flip at `at`: DSA's `[b, s]`, routing's token `[t]` (of `seq`
/// positions a row).
fn flip_row(at: &[usize], seq: Option<usize>) -> Option<Row> {
    match *at {
        [b, s] => Some((b, s)),
        [t] => seq.filter(|&s| s > 0).map(|s| (t / s, t % s)),
        _ => None,
    }
}

/// Whether floats `c`'s difference is rounding's: its tail (`reading::Tail`), or every element
/// outside the tolerance where near-tie flips reach ([`within`]). Read from the two dumps as
/// compared (scores past each query masked, as `compare_tensor` masks them).
fn rounding_explains(
    a: &Dump,
    b: &Dump,
    c: &Comparison,
    opts: &DiffOptions,
    flipped: &Flipped,
    batch: Option<usize>,
) -> bool {
    let (Ok((va, _)), Ok((vb, sb))) = (a.values(&c.name), b.values(&c.name)) else { return false };
    let tol = opts.tol_for(&c.name);
    with_compared((a, b), &c.name, (&va, &vb, &sb), |x, y| match (x, y) {
        (Values::F32(x), Values::F32(y)) => {
            Tail::of(x, y, &sb, tol).is_some() || within((x, y, &sb), &c.name, tol, flipped, batch)
        }
        _ => false,
    })
}

/// Whether every element of floats `x` against `y` (of `shape`) outside the tolerance lies where
/// near-tie flips reach (none: false): tensors `[B, S, ...]`, or `[B*S, ...]` token rows over
/// `batch` batch rows (the MTP layer's `[B*(S-1), ...]`).
fn within(
    (x, y, shape): (&[f32], &[f32], &[usize]),
    name: &str,
    tol: Tolerance,
    flipped: &Flipped,
    batch: Option<usize>,
) -> bool {
    let token_rows = HookPoint::parse(name).is_some_and(|p| matches!(p, HookPoint::Layer(_, h) if h.token_rows()));
    let (positions, width) = match (token_rows, shape) {
        (true, [rows, w, ..]) => match positions(*rows, batch) {
            Some(s) => (s, *w),
            None => return false,
        },
        (false, [_, s, rest @ ..]) => (*s, rest.iter().product()),
        _ => return false,
    };
    if flipped.is_empty() || positions == 0 || width == 0 || x.len() != y.len() {
        return false;
    }
    let row = |i: usize| ((i / width) / positions, (i / width) % positions);
    x.iter().zip(y).enumerate().all(|(i, (&u, &v))| element_ok(u, v, tol) || flipped.covers(row(i)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flip reaches its position and the later ones of its batch row, not the earlier ones nor
    /// another row; routing's token rows map to (batch row, position), the MTP layer's by its own
    /// positions.
    #[test]
    fn a_flip_reaches_its_position_and_the_later_ones_of_its_row() {
        let mut f = Flipped::default();
        assert!(f.is_empty() && !f.covers((0, 5)));
        f.add((0, 7));
        f.add((0, 3));
        assert!(f.covers((0, 3)) && f.covers((0, 30)) && !f.covers((0, 2)) && !f.covers((1, 30)));
        assert_eq!(flip_row(&[1, 4], None), Some((1, 4)));
        assert_eq!(flip_row(&[45], Some(40)), Some((1, 5)));
        assert_eq!(flip_row(&[45], None), None);
        // The MTP layer's 30 rows over 2 batch rows: 15 positions a row, not the run's 16.
        assert_eq!(flip_row(&[16], positions(30, Some(2))), Some((1, 1)));
        assert_eq!((positions(32, Some(2)), positions(31, Some(2)), positions(4, Some(0))), (Some(16), None, None));
    }
}
