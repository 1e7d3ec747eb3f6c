//! The comparison rules of the dump spec, tensor by tensor. Floats match when every element has
//! `|a - e| <= atol + rtol * |e|` (NaN never matches, Inf only the same Inf); DSA selections are
//! compared as causal *sets* per query; expert choices as sets per token, with their weights
//! aligned by expert id. Each comparison keeps what a person needs to judge it: the worst element
//! with its coordinate and both values, or the first row whose set differs.

use crate::config::MAX_EXPERTS;
use crate::dump::Values;

/// `|a - e| <= atol + rtol * |e|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Default for Tolerance {
    /// The spec's default for float32 compute.
    fn default() -> Self {
        Tolerance { atol: 1e-4, rtol: 1e-4 }
    }
}

impl Tolerance {
    /// The margin below which a flip is a near-tie unless the user says otherwise: 1e-3, or twice
    /// `atol` where that is larger (bf16's 2e-2 gives 4e-2). A rule of thumb: each of the two
    /// scores a margin compares may be off by `atol` (and by `rtol` of its size) and still match,
    /// so a closer decision can flip by roundings the tolerance accepts.
    pub fn near_tie(&self) -> f64 {
        (2.0 * self.atol).max(1e-3)
    }
}

/// How a tensor name is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Float,
    /// `layers.{i}.dsa.topk`: causal sets per (batch, query) row.
    DsaSelection,
    /// `layers.{i}.moe.topk_ids`: sets per token.
    ExpertSet,
    /// `layers.{i}.moe.topk_weights`: aligned with the ids by expert.
    ExpertWeights,
    /// Other integer tensors (`input_ids`): exact.
    Exact,
}

impl Rule {
    pub fn for_name(name: &str, values: &Values) -> Rule {
        if name.ends_with(".dsa.topk") {
            Rule::DsaSelection
        } else if name.ends_with(".moe.topk_ids") {
            Rule::ExpertSet
        } else if name.ends_with(".moe.topk_weights") {
            Rule::ExpertWeights
        } else if matches!(values, Values::I64(_)) {
            Rule::Exact
        } else {
            Rule::Float
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    Float {
        max_abs: f64,
        /// Coordinate of the worst element (largest excess over the tolerance, else largest error).
        worst_at: Vec<usize>,
        /// Coordinate of the first element outside the tolerance, empty when none is: for
        /// `[B, S, ...]` tensors the earliest position that broke in any batch row (a decode
        /// bug's first step), else the first in row-major order; the worst element, often
        /// downstream, does not give it.
        first_at: Vec<usize>,
        ours: f32,
        reference: f32,
        max_rel: f64,
        /// Elements outside the tolerance, of `total`: the elements but the infinities both
        /// sides hold (the masked keys of `dsa.scores`), which `mean_abs` leaves out too.
        bad: usize,
        total: usize,
        /// The tensor's elements, those infinities included.
        elements: usize,
        mean_abs: f64,
        /// `sum((a - e)^2) / sum(e^2)` over the elements finite on both sides; infinite with a NaN
        /// or an infinity only one side holds.
        nmse: f64,
        /// Cosine similarity of the flattened tensors, over the same elements; NaN where nmse is
        /// infinite for a NaN or an unshared infinity.
        cosine: f64,
        /// The factor `c` that best fits `ours ≈ c · reference` over the same elements
        /// (`sum(a e) / sum(e^2)`; NaN where undefined): with a cosine of 1, a constant factor
        /// apart (a missing scaling, a wrong softmax scale).
        scale: f64,
    },
    Sets {
        rows: usize,
        /// Mean and minimum over rows of |ours ∩ reference| / |reference|.
        mean_recall: f64,
        min_recall: f64,
        /// Every row whose set differs, in order.
        flips: Vec<Flip>,
    },
    /// An exact integer tensor (`input_ids`, `moe.bias_changed`): element by element. Its
    /// differences are mismatches, not flips: no margin decided them.
    Exact {
        elements: usize,
        /// Every element that differs, in order.
        differing: Vec<Difference>,
    },
    Shape {
        ours: Vec<usize>,
        reference: Vec<usize>,
    },
    /// A `moe.topk_ids` that is no set of `k` experts on one side (an id outside the experts,
    /// an expert chosen twice: a port's top-k bug): a difference, named, not compared as sets.
    Invalid {
        side: Side,
        problem: String,
    },
}

/// An element of an exact integer tensor that differs: its flat index and coordinate.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub index: usize,
    pub at: Vec<usize>,
    pub ours: i64,
    pub reference: i64,
}

impl Detail {
    /// The largest absolute difference of a float comparison; None for sets and shapes.
    pub fn max_abs(&self) -> Option<f64> {
        match self {
            Detail::Float { max_abs, .. } => Some(*max_abs),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub name: String,
    pub ok: bool,
    pub detail: Detail,
}

impl Comparison {
    /// Attaches to each flip the margin that decided its row on each side (`margins` indexed by
    /// the same flat row as the selection; NaN is an unknown margin). Nothing for comparisons
    /// that are not of sets.
    pub fn set_margins(&mut self, ours: Option<&[f32]>, reference: Option<&[f32]>) {
        if let Detail::Sets { flips, .. } = &mut self.detail {
            for f in flips {
                let at = |m: Option<&[f32]>| m.and_then(|m| m.get(f.row).copied()).filter(|v| !v.is_nan());
                (f.margin_ours, f.margin_reference) = (at(ours), at(reference));
            }
        }
    }
}

/// Row-major coordinate of flat index `i` in `shape`.
pub fn coord(shape: &[usize], mut i: usize) -> Vec<usize> {
    let mut c = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        let n = shape[d].max(1);
        c[d] = i % n;
        i /= n;
    }
    c
}

/// Whether `x` is a bf16 value (its low 16 bits 0): a run in bf16, stored in f32.
pub(crate) fn is_bf16(x: f32) -> bool {
    x.to_bits() & 0xFFFF == 0
}

/// Whether `x` is an f16 value (it survives the round trip; NaN counts).
pub(crate) fn is_f16(x: f32) -> bool {
    x.is_nan() || half::f16::from_f32(x).to_f32().to_bits() == x.to_bits()
}

/// Whether `v` holds a value that tells a format: one finite and not 0 (zeros and NaN are every
/// format's values, so a tensor of them says nothing of bf16 or f16).
pub(crate) fn tells_a_format(v: &[f32]) -> bool {
    v.iter().any(|x| x.is_finite() && *x != 0.0)
}

/// Whether `ours` and `reference` are as long and every element matches within `tol`.
pub(crate) fn all_close(ours: &[f32], reference: &[f32], tol: Tolerance) -> bool {
    ours.len() == reference.len() && ours.iter().zip(reference).all(|(&a, &e)| element_ok(a, e, tol))
}

pub(crate) fn element_ok(a: f32, e: f32, tol: Tolerance) -> bool {
    if e.is_nan() || a.is_nan() {
        return false;
    }
    if e.is_infinite() || a.is_infinite() {
        return a == e;
    }
    ((a - e).abs() as f64) <= tol.atol + tol.rtol * (e.abs() as f64)
}

/// Where a tensor's elements sit along the run's positions, so that the first element outside
/// the tolerance, and the first flip, are the earliest position's in any batch row (a decode
/// bug's first step), not batch row 0's first: its `lead` leading dimensions count the run's
/// tokens (`[B, S, ...]`: 2; the routing's `[B*S, ...]`: 1), in `batch` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Positions {
    lead: usize,
    batch: usize,
}

impl Positions {
    /// For the tensor `name` of `shape` in a run of `batch` rows (None: unknown, and the
    /// routing's `[B*S, ...]` rows then have no positions); a name that is no hook point, by its
    /// shape. None where its elements have none.
    pub fn of(name: &str, shape: &[usize], batch: Option<usize>) -> Option<Positions> {
        use crate::hooks::HookPoint;
        match HookPoint::parse(name) {
            Some(HookPoint::Layer(_, h)) if h.token_rows() => Some(Positions { lead: 1, batch: batch? }),
            // Every other hook point leads with [B, S] (`dsa.margin` is no more than that).
            Some(_) => (shape.len() >= 2).then(|| Positions { lead: 2, batch: shape[0] }),
            None => Positions::of_shape(shape),
        }
    }

    /// A `[B, S, ...]` tensor's, by its shape alone (three dimensions or more).
    pub fn of_shape(shape: &[usize]) -> Option<Positions> {
        (shape.len() >= 3).then(|| Positions { lead: 2, batch: shape[0] })
    }

    /// The position of the token whose elements start at leading index `row` (counted over the
    /// `lead` dimensions of `shape`).
    fn of_row(self, shape: &[usize], row: usize) -> usize {
        let tokens: usize = shape.iter().take(self.lead).product();
        let seq = match self.batch {
            b if b > 0 && tokens.is_multiple_of(b) => tokens / b,
            _ => tokens,
        };
        row % seq.max(1)
    }

    /// Flat element `i` of `shape` ordered by position first, then by index.
    fn key(this: Option<Positions>, shape: &[usize], i: usize) -> (usize, usize) {
        match this {
            Some(p) => (p.of_row(shape, i / shape.iter().skip(p.lead).product::<usize>().max(1)), i),
            None => (0, i),
        }
    }
}

/// The absolute error of one element: 0 where the two are equal (an infinity both hold too, as
/// the `-inf` past each query in `dsa.scores`), infinite with a NaN or an unshared infinity.
pub fn element_error(a: f64, e: f64) -> f64 {
    match (a - e).abs() {
        _ if a == e => 0.0,
        err if err.is_nan() => f64::INFINITY,
        err => err,
    }
}

/// Floats element by element; the first element outside is the earliest position's in any
/// batch row where `shape` is `[B, S, ...]` ([`compare_floats_at`] takes the positions).
pub fn compare_floats(ours: &[f32], reference: &[f32], shape: &[usize], tol: Tolerance) -> (bool, Detail) {
    compare_floats_at(ours, reference, shape, tol, Positions::of_shape(shape))
}

/// [`compare_floats`] with the elements' positions given.
pub fn compare_floats_at(
    ours: &[f32],
    reference: &[f32],
    shape: &[usize],
    tol: Tolerance,
    positions: Option<Positions>,
) -> (bool, Detail) {
    compare_floats_keyed(ours, reference, shape, tol, |i| Positions::key(positions, shape, i))
}

/// The comparison of floats, the first element outside being the one of least `key(index)`.
fn compare_floats_keyed(
    ours: &[f32],
    reference: &[f32],
    shape: &[usize],
    tol: Tolerance,
    key: impl Fn(usize) -> (usize, usize),
) -> (bool, Detail) {
    let (mut max_abs, mut max_rel, mut bad, mut sum_abs) = (0f64, 0f64, 0usize, 0f64);
    let (mut err2, mut ref2, mut ours2, mut dot) = (0f64, 0f64, 0f64, 0f64);
    let (mut worst, mut worst_ok) = ((f64::NEG_INFINITY, None::<usize>), (f64::NEG_INFINITY, 0usize));
    let (mut undefined, mut first) = (false, None::<usize>);
    // Infinities both sides hold (the `-inf` past each query in `dsa.scores`, the `+inf` margin
    // of a query that keeps every key) are no data: the counts and the mean leave them out.
    let mut shared_infinities = 0usize;
    for (i, (&a, &e)) in ours.iter().zip(reference).enumerate() {
        shared_infinities += usize::from(a == e && a.is_infinite());
        let ok = element_ok(a, e, tol);
        let err = element_error(a as f64, e as f64);
        max_abs = max_abs.max(err);
        sum_abs += err;
        let (a64, e64) = (a as f64, e as f64);
        if a.is_finite() && e.is_finite() {
            err2 += err * err;
            ref2 += e64 * e64;
            ours2 += a64 * a64;
            dot += a64 * e64;
        } else if a != e {
            undefined = true; // a NaN, or infinities the two sides do not share
        }
        // Against a zero, a NaN or an infinity any error is infinitely relative (err / |e| would
        // be NaN there, which `max` skips).
        let rel = match err {
            0.0 => 0.0,
            _ if e.is_finite() && e != 0.0 => err / e64.abs(),
            _ => f64::INFINITY,
        };
        max_rel = max_rel.max(rel);
        // The worst *offender* is the one furthest past the tolerance; with none, the largest
        // error is shown.
        if ok {
            if err > worst_ok.0 {
                worst_ok = (err, i);
            }
        } else {
            bad += 1;
            if first.is_none_or(|f| key(i) < key(f)) {
                first = Some(i);
            }
            let excess = err - (tol.atol + tol.rtol * e64.abs());
            let excess = if excess.is_nan() { f64::INFINITY } else { excess };
            if excess > worst.0 {
                worst = (excess, Some(i));
            }
        }
    }
    let total = reference.len() - shared_infinities;
    let n = total.max(1) as f64;
    let i = worst.1.unwrap_or(worst_ok.1);
    let detail = Detail::Float {
        max_abs,
        worst_at: coord(shape, i),
        first_at: first.map(|f| coord(shape, f)).unwrap_or_default(),
        ours: ours.get(i).copied().unwrap_or(f32::NAN),
        reference: reference.get(i).copied().unwrap_or(f32::NAN),
        max_rel,
        bad,
        total,
        elements: reference.len(),
        mean_abs: sum_abs / n,
        // Over the elements finite on both sides: an infinity both hold (the `-inf` past each
        // query in `dsa.scores`) is equal, not error; a NaN or an unshared infinity makes the
        // error infinite and the cosine undefined.
        nmse: if undefined {
            f64::INFINITY
        } else if ref2 > 0.0 {
            err2 / ref2
        } else if err2 > 0.0 {
            f64::INFINITY
        } else {
            0.0
        },
        cosine: if undefined {
            f64::NAN
        } else if ours2 > 0.0 && ref2 > 0.0 {
            dot / (ours2.sqrt() * ref2.sqrt())
        } else if err2 == 0.0 {
            1.0
        } else {
            0.0
        },
        scale: if undefined || ref2 == 0.0 { f64::NAN } else { dot / ref2 },
    };
    (bad == 0, detail)
}

/// Of a float tensor `[B, S, ...]` that does not match: how many leading positions match on every
/// batch row, when every position after them does not (a difference that starts at a position:
/// RoPE leaves position 0 alone; a DSA bug spares the queries that keep every causal key).
/// None otherwise, and for tensors without two positions.
pub fn matching_positions(ours: &[f32], reference: &[f32], shape: &[usize], tol: Tolerance) -> Option<usize> {
    let ok = positions_ok(ours, reference, shape, tol)?;
    let p = ok.iter().take_while(|&&x| x).count();
    (p >= 1 && p < ok.len() && ok[p..].iter().all(|&x| !x)).then_some(p)
}

/// The mirror of [`matching_positions`]: how many leading positions differ (in a batch row at
/// least), when every position after them matches on every row (a bug of the queries whose
/// selections are padded past the query).
pub fn differing_positions(ours: &[f32], reference: &[f32], shape: &[usize], tol: Tolerance) -> Option<usize> {
    let ok = positions_ok(ours, reference, shape, tol)?;
    let p = ok.iter().take_while(|&&x| !x).count();
    (p >= 1 && p < ok.len() && ok[p..].iter().all(|&x| x)).then_some(p)
}

/// Whether each position of a float tensor `[B, S, ...]` matches on every batch row; None for
/// tensors without two positions or of other sizes.
fn positions_ok(ours: &[f32], reference: &[f32], shape: &[usize], tol: Tolerance) -> Option<Vec<bool>> {
    let [b, s, ..] = shape[..] else { return None };
    if s < 2 || b == 0 || ours.len() != reference.len() || !reference.len().is_multiple_of(b * s) {
        return None;
    }
    let width = reference.len() / (b * s);
    let ok_at = |p: usize| {
        (0..b).all(|r| {
            let start = (r * s + p) * width;
            (start..start + width).all(|i| element_ok(ours[i], reference[i], tol))
        })
    };
    Some((0..s).map(ok_at).collect())
}

/// Row `r` of `k` ids as a set: the ids `keep(r, id)` admits, ascending, each once.
pub(crate) fn row_set(ids: &[i64], k: usize, r: usize, keep: impl Fn(usize, i64) -> bool) -> Vec<i64> {
    let mut s: Vec<i64> = ids[r * k..(r + 1) * k].iter().copied().filter(|&x| keep(r, x)).collect();
    s.sort_unstable();
    s.dedup();
    s
}

/// Compares rows as sets. `keep(row, value)` filters members (the causal rule for DSA). Flips
/// come in order of position (`positions` of the rows), then of row: the first is the earliest
/// position's in any batch row.
fn compare_sets(
    (ours, ours_k): (&[i64], usize),
    reference: &[i64],
    shape: &[usize],
    positions: Option<Positions>,
    keep: impl Fn(usize, i64) -> bool,
) -> (bool, Detail) {
    let k = shape.last().copied().unwrap_or(1).max(1);
    let rows = reference.len() / k;
    let row_shape = &shape[..shape.len().saturating_sub(1)];
    let (mut recall_sum, mut min_recall) = (0f64, 1f64);
    let mut flips = Vec::new();
    for r in 0..rows {
        let (a, e) = (row_set(ours, ours_k.max(1), r, &keep), row_set(reference, k, r, &keep));
        let common = a.iter().filter(|x| e.contains(x)).count();
        let recall = if e.is_empty() { 1.0 } else { common as f64 / e.len() as f64 };
        recall_sum += recall;
        min_recall = min_recall.min(recall);
        if a != e {
            let past = |ids: &[i64], k: usize| row_set(ids, k, r, |row, x| x >= 0 && !keep(row, x));
            flips.push(Flip {
                row: r,
                at: coord(row_shape, r),
                only_ours: a.iter().copied().filter(|x| !e.contains(x)).collect(),
                only_reference: e.iter().copied().filter(|x| !a.contains(x)).collect(),
                past: [past(ours, ours_k.max(1)), past(reference, k)],
                recall,
                margin_ours: None,
                margin_reference: None,
                lead_ours: None,
                lead_reference: None,
                moved: None,
                rule_break: None,
            });
        }
    }
    let mean_recall = if rows == 0 { 1.0 } else { recall_sum / rows as f64 };
    let row_shape = &shape[..shape.len().saturating_sub(1)];
    flips.sort_by_key(|f| Positions::key(positions, row_shape, f.row));
    (flips.is_empty(), Detail::Sets { rows, mean_recall, min_recall, flips })
}

/// DSA rows of `[B, S, K]`: only positions `j <= s` count.
pub fn compare_dsa(ours: &[i64], reference: &[i64], shape: &[usize]) -> (bool, Detail) {
    compare_dsa_widths((ours, shape.last().copied().unwrap_or(1)), reference, shape)
}

/// [`compare_dsa`] of selections of different widths over the same `[B, S]` (`shape` the
/// reference's): a row's causal set is the same whatever padding follows it, so a port that
/// keeps `min(index_topk, S)` columns compares with one that pads to `index_topk`, and one that
/// keeps a key too few shows as the rows that lost it.
pub fn compare_dsa_widths(ours: (&[i64], usize), reference: &[i64], shape: &[usize]) -> (bool, Detail) {
    let seq = if shape.len() >= 2 { shape[shape.len() - 2].max(1) } else { 1 };
    let positions = Positions::of_shape(shape);
    compare_sets(ours, reference, shape, positions, |row, j| j >= 0 && (j as usize) <= row % seq)
}

/// What is wrong with a `moe.topk_ids` tensor `[N, k]`, if anything: an id outside
/// `0..experts` (when the expert count is known; else outside `0..MAX_EXPERTS`), or an expert chosen twice
/// by one token. Such a tensor is malformed, not a flip.
pub fn invalid_expert_ids(ids: &[i64], shape: &[usize], experts: Option<usize>) -> Option<String> {
    let k = shape.last().copied().unwrap_or(1).max(1);
    let row_shape = &shape[..shape.len().saturating_sub(1)];
    let (bound, known) = (experts.unwrap_or(MAX_EXPERTS), experts.is_some());
    for (r, row) in ids.chunks(k).enumerate() {
        for (j, &id) in row.iter().enumerate() {
            if id < 0 || id as u64 >= bound as u64 {
                let range = match known {
                    true => format!("0-{}", bound.saturating_sub(1)),
                    false => format!("0-{} (the most glimpse reads)", MAX_EXPERTS - 1),
                };
                return Some(format!(
                    "holds expert id {id} at {:?}, outside the experts {range}",
                    coord(shape, r * k + j)
                ));
            }
            if row[..j].contains(&id) {
                return Some(format!("chooses expert {id} twice for token {:?}", coord(row_shape, r)));
            }
        }
    }
    None
}

/// The comparison of a `moe.topk_ids` whose rows are no sets of distinct experts in range on one
/// side (ours first), `experts` being each side's expert count where known; None when both are.
pub fn invalid_selection(
    name: &str,
    [ours, reference]: [(&Values, &[usize]); 2],
    experts: [Option<usize>; 2],
) -> Option<Comparison> {
    let sides = [(Side::Ours, ours, experts[0]), (Side::Reference, reference, experts[1])];
    sides.into_iter().find_map(|(side, (v, shape), experts)| {
        let Values::I64(ids) = v else { return None };
        let problem = invalid_expert_ids(ids, shape, experts)?;
        Some(Comparison { name: name.into(), ok: false, detail: Detail::Invalid { side, problem } })
    })
}

/// Expert sets of `[B*S, k]` rows, in a run of `batch` rows where known.
pub fn compare_expert_sets(ours: &[i64], reference: &[i64], shape: &[usize], batch: Option<usize>) -> (bool, Detail) {
    let k = shape.last().copied().unwrap_or(1);
    compare_sets((ours, k), reference, shape, batch.map(|batch| Positions { lead: 1, batch }), |_, _| true)
}

/// Weights `[N, k]` aligned by expert id. Rows whose chosen sets differ are flips (reported by the
/// ids comparison); only the experts both sides chose are compared here.
pub fn compare_expert_weights(
    our_ids: &[i64],
    ours: &[f32],
    ref_ids: &[i64],
    reference: &[f32],
    shape: &[usize],
    tol: Tolerance,
    batch: Option<usize>,
) -> (bool, Detail) {
    let k = shape.last().copied().unwrap_or(1).max(1);
    let (aligned_ours, aligned_ref, positions) = align_by_expert(our_ids, ours, ref_ids, reference, k);
    let at = batch.map(|batch| Positions { lead: 1, batch });
    let key = |j: usize| Positions::key(at, shape, positions[j]);
    let (ok, mut detail) = compare_floats_keyed(&aligned_ours, &aligned_ref, &[aligned_ref.len()], tol, key);
    // Report the worst and the first element outside at their coordinates in the reference tensor,
    // and the tensor's elements (`total` counts those compared: the experts both chose).
    if let Detail::Float { worst_at, first_at, elements, .. } = &mut detail {
        *elements = reference.len();
        for at in [worst_at, first_at] {
            if let Some(&p) = at.first().and_then(|&p| positions.get(p)) {
                *at = coord(shape, p);
            }
        }
    }
    (ok, detail)
}

/// The weights of the experts both sides chose, in the reference's order: (ours, reference, flat
/// index of each in the reference tensor). Rows hold `k` experts.
pub fn align_by_expert<T: Copy>(
    our_ids: &[i64],
    ours: &[T],
    ref_ids: &[i64],
    reference: &[T],
    k: usize,
) -> (Vec<T>, Vec<T>, Vec<usize>) {
    let mut aligned_ours = Vec::with_capacity(reference.len());
    let mut aligned_ref = Vec::with_capacity(reference.len());
    let mut positions = Vec::with_capacity(reference.len());
    for (i, (&id, &w)) in ref_ids.iter().zip(reference).enumerate() {
        let row = i / k;
        if let Some(j) = (row * k..(row + 1) * k).find(|&j| our_ids.get(j) == Some(&id)) {
            aligned_ours.push(ours[j]);
            aligned_ref.push(w);
            positions.push(i);
        }
    }
    (aligned_ours, aligned_ref, positions)
}

/// `v`'s rows of `k` values (each an expert's, `ids` saying which; all three of one length) put
/// in the order of `order_ids`' experts: a row of the same experts lines up with it value for
/// value, and one that differs keeps its other experts' values, in their order, in the places
/// left. Readings by
/// position see routing weights paired as [`compare_expert_weights`] pairs them (the experts
/// both chose; in a flipped row the others pair as they fall), whatever order each side's top-k
/// lists its experts in (transformers' is unsorted).
pub fn in_order_of<T: Copy>(order_ids: &[i64], ids: &[i64], v: &[T], k: usize) -> Vec<T> {
    let k = k.max(1);
    let mut out = Vec::with_capacity(v.len());
    for ((order, row_ids), row) in order_ids.chunks(k).zip(ids.chunks(k)).zip(v.chunks(k)) {
        let mut taken = vec![false; row.len()];
        let placed: Vec<Option<T>> = (order.iter())
            .map(|id| {
                let j = (0..row.len()).find(|&j| !taken[j] && row_ids.get(j) == Some(id))?;
                taken[j] = true;
                Some(row[j])
            })
            .collect();
        let mut rest = (0..row.len()).filter(|&j| !taken[j]).map(|j| row[j]);
        // (As many places are left as values: the flatten drops nothing.)
        out.extend(placed.into_iter().flat_map(|p| p.or_else(|| rest.next())));
    }
    out
}

/// Each row of `k` values sorted, largest first (NaN first: `total_cmp`).
pub(crate) fn sorted_rows(v: &[f32], k: usize) -> Vec<f32> {
    let mut v = v.to_vec();
    for row in v.chunks_mut(k.max(1)) {
        row.sort_by(|x, y| y.total_cmp(x));
    }
    v
}

/// What a `moe.topk_weights` line adds where `results` hold no `moe.topk_ids` of its layer (one
/// side lacks them): its rows were compared sorted, not aligned by expert.
pub fn weights_note(c: &Comparison, results: &[Comparison]) -> Option<&'static str> {
    let layer = c.name.strip_suffix(".moe.topk_weights")?;
    let ids = format!("{layer}.moe.topk_ids");
    (!results.iter().any(|r| r.name == ids)).then_some(
        "  (each row's weights sorted, largest first: the two do not both hold moe.topk_ids to align them by expert)",
    )
}

/// Whether a comparison compared nothing but the tokens (`input_ids`): two dumps, or a run and
/// its reference, that share no hook point do not pass, whatever the tokens say.
pub fn tokens_only(results: &[Comparison]) -> bool {
    !results.iter().any(|c| c.name != "input_ids")
}

/// Flat indices of the elements outside the tolerance.
pub fn elements_outside<'a>(ours: &'a [f32], reference: &'a [f32], tol: Tolerance) -> impl Iterator<Item = usize> + 'a {
    ours.iter().zip(reference).enumerate().filter(move |(_, (&a, &e))| !element_ok(a, e, tol)).map(|(i, _)| i)
}

/// Compares one tensor by the rule its name calls for. `ids` gives, for `moe.topk_weights`, the
/// ids both sides chose (ours, reference) so weights align by expert; `batch`, the run's batch
/// rows where known, places the routing's `[B*S, ...]` rows at their positions.
pub fn compare_tensor(
    name: &str,
    ours: (&Values, &[usize]),
    reference: (&Values, &[usize]),
    ids: Option<(&[i64], &[i64])>,
    tol: Tolerance,
    batch: Option<usize>,
) -> Comparison {
    let (ours, shape) = ours;
    let (reference, ref_shape) = reference;
    let rows_alike =
        |a: &[usize], b: &[usize]| a.len() == 3 && b.len() == 3 && a[..2] == b[..2] && a[2] > 0 && b[2] > 0;
    if let (Rule::DsaSelection, Values::I64(a), Values::I64(e)) = (Rule::for_name(name, reference), ours, reference) {
        if shape != ref_shape && rows_alike(shape, ref_shape) {
            // Ours keeping more keys than the reference's width: its width is wrong (a dense
            // port, another index_topk), not the reference's rows short.
            let seq = shape[1].max(1);
            let most = (0..a.len() / shape[2])
                .map(|r| row_set(a, shape[2], r, |row, j| j >= 0 && j as usize <= row % seq).len())
                .max();
            if let Some(n) = most.filter(|&n| n > ref_shape[2]) {
                let problem =
                    format!("keeps up to {n} causal keys a query, past the reference's width {}", ref_shape[2]);
                return Comparison {
                    name: name.into(),
                    ok: false,
                    detail: Detail::Invalid { side: Side::Ours, problem },
                };
            }
            let (ok, detail) = compare_dsa_widths((a, shape[2]), e, ref_shape);
            return Comparison { name: name.into(), ok, detail };
        }
    }
    if shape != ref_shape {
        return Comparison {
            name: name.into(),
            ok: false,
            detail: Detail::Shape { ours: shape.to_vec(), reference: ref_shape.to_vec() },
        };
    }
    let masked;
    let (ours, reference) = match causal_scores(name, shape, ours, reference) {
        Some(m) => {
            masked = m;
            (&masked.0, &masked.1)
        }
        None => (ours, reference),
    };
    let positions = Positions::of(name, shape, batch);
    let (ok, detail) = match (Rule::for_name(name, reference), ours, reference) {
        (Rule::DsaSelection, Values::I64(a), Values::I64(e)) => compare_dsa(a, e, shape),
        (Rule::ExpertSet, Values::I64(a), Values::I64(e)) => compare_expert_sets(a, e, shape, batch),
        (Rule::Exact, Values::I64(a), Values::I64(e)) => compare_exact(a, e, shape),
        (Rule::ExpertWeights, Values::F32(a), Values::F32(e)) => match ids {
            Some((ia, ie)) if ia.len() == a.len() && ie.len() == e.len() => {
                compare_expert_weights(ia, a, ie, e, shape, tol, batch)
            }
            // Without ids on both sides, weights cannot be aligned by expert: each row's as a
            // multiset (sorted, largest first), which two correct runs share whatever order their
            // top-k lists the experts in.
            _ => {
                let k = shape.last().copied().unwrap_or(1);
                compare_floats_at(&sorted_rows(a, k), &sorted_rows(e, k), shape, tol, positions)
            }
        },
        (_, Values::F32(a), Values::F32(e)) => compare_floats_at(a, e, shape, tol, positions),
        (_, a, e) => compare_floats_at(&to_f32(a), &to_f32(e), shape, tol, positions),
    };
    Comparison { name: name.into(), ok, detail }
}

/// `dsa.scores` (`[B, S, T]`) with every entry past its query's causal keys `-inf` on both sides,
/// where one side holds something else there: those are no key's score (transformers masks them;
/// a port may dump its scores before masking), as `dsa.topk` ignores keys past the query. A
/// selection that used them shows in `dsa.topk`. None when nothing needs masking.
pub(crate) fn causal_scores(
    name: &str,
    shape: &[usize],
    ours: &Values,
    reference: &Values,
) -> Option<(Values, Values)> {
    let (Values::F32(a), Values::F32(e), &[_, s, t]) = (ours, reference, shape) else { return None };
    if !name.ends_with(".dsa.scores") || s == 0 || t < s || a.len() != e.len() {
        return None;
    }
    // Query q of S sees keys 0..=T-S+q.
    let later = |i: usize| i % t > t - s + (i / t) % s;
    let masked = |x: f32| x == f32::NEG_INFINITY;
    if !(0..a.len()).any(|i| later(i) && !(masked(a[i]) && masked(e[i]))) {
        return None;
    }
    let causal = |v: &[f32]| v.iter().enumerate().map(|(i, &x)| if later(i) { f32::NEG_INFINITY } else { x }).collect();
    Some((Values::F32(causal(a)), Values::F32(causal(e))))
}

/// Exact integer tensors compare element by element.
fn compare_exact(ours: &[i64], reference: &[i64], shape: &[usize]) -> (bool, Detail) {
    let differing: Vec<Difference> = ours
        .iter()
        .zip(reference)
        .enumerate()
        .filter(|(_, (a, e))| a != e)
        .map(|(index, (&ours, &reference))| Difference { index, at: coord(shape, index), ours, reference })
        .collect();
    (differing.is_empty(), Detail::Exact { elements: reference.len(), differing })
}

/// A tensor neither dump reads as values (another tool's bool mask, or its own tensor under one
/// of glimpse's extra names) that both hold alike: its elements, how many differ, and the first
/// that does (flat index); integers compared exactly, floats within `tol`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawComparison {
    pub name: String,
    pub elements: usize,
    pub differing: usize,
    pub first: Option<usize>,
    /// The tolerance a float tensor was compared at; None for an exact comparison.
    pub tol: Option<Tolerance>,
}

/// Two such tensors compared element by element: integers exactly (a byte at a time for dtypes
/// narrower than one), floats within `tol`, as the spec compares every float tensor both files
/// have; None where their dtypes or shapes differ, or their bytes do not decode.
pub fn compare_raw(
    name: &str,
    (dtype, shape, ours): (safetensors::Dtype, &[usize], &[u8]),
    (ref_dtype, ref_shape, reference): (safetensors::Dtype, &[usize], &[u8]),
    tol: Tolerance,
) -> Option<RawComparison> {
    use safetensors::Dtype::{BOOL, I16, I32, I64, I8, U16, U32, U64, U8};
    if dtype != ref_dtype || shape != ref_shape || ours.len() != reference.len() {
        return None;
    }
    let (mut differing, mut first) = (0, None);
    let mut count = |i: usize| {
        differing += 1;
        first.get_or_insert(i);
    };
    if crate::st::FLOATS.contains(&dtype) {
        let (a, e) = (crate::st::decode_f32(dtype, ours).ok()?, crate::st::decode_f32(dtype, reference).ok()?);
        elements_outside(&a, &e, tol).for_each(&mut count);
        return Some(RawComparison { name: name.to_string(), elements: e.len(), differing, first, tol: Some(tol) });
    }
    if !matches!(dtype, BOOL | U8 | I8 | U16 | I16 | U32 | I32 | U64 | I64) {
        return None;
    }
    let size = (dtype.bitsize() / 8).max(1);
    let pairs = ours.chunks_exact(size).zip(reference.chunks_exact(size)).enumerate();
    pairs.filter(|(_, (x, y))| x != y).for_each(|(i, _)| count(i));
    Some(RawComparison { name: name.to_string(), elements: ours.len() / size, differing, first, tol: None })
}

pub fn to_f32(v: &Values) -> Vec<f32> {
    match v {
        Values::F32(x) => x.clone(),
        Values::I64(x) => x.iter().map(|&i| i as f32).collect(),
    }
}

mod flip;
pub use flip::{flips, Flip, Movement, RuleBreak, Side};

#[cfg(test)]
mod tests;
