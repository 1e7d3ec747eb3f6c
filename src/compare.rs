//! The comparison rules of the dump spec, tensor by tensor. Floats match when every element has
//! `|a - e| <= atol + rtol * |e|` (NaN never matches, Inf only the same Inf); DSA selections are
//! compared as causal *sets* per query; expert choices as sets per token, with their weights
//! aligned by expert id. Each comparison keeps what a person needs to judge it: the worst element
//! with its coordinate and both values, or the first row whose set differs.

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
        ours: f32,
        reference: f32,
        max_rel: f64,
        /// Elements outside the tolerance, of `total`.
        bad: usize,
        total: usize,
    },
    Sets {
        rows: usize,
        differing: usize,
        /// First differing row: its coordinate, members only we chose, members only the reference chose.
        first: Option<(Vec<usize>, Vec<i64>, Vec<i64>)>,
    },
    Shape {
        ours: Vec<usize>,
        reference: Vec<usize>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub name: String,
    pub ok: bool,
    pub detail: Detail,
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

fn element_ok(a: f32, e: f32, tol: Tolerance) -> bool {
    if e.is_nan() || a.is_nan() {
        return false;
    }
    if e.is_infinite() || a.is_infinite() {
        return a == e;
    }
    ((a - e).abs() as f64) <= tol.atol + tol.rtol * (e.abs() as f64)
}

pub fn compare_floats(ours: &[f32], reference: &[f32], shape: &[usize], tol: Tolerance) -> (bool, Detail) {
    let (mut max_abs, mut max_rel, mut bad) = (0f64, 0f64, 0usize);
    let mut worst = (f64::NEG_INFINITY, 0usize);
    for (i, (&a, &e)) in ours.iter().zip(reference).enumerate() {
        let ok = element_ok(a, e, tol);
        let err = if a == e { 0.0 } else { ((a - e) as f64).abs() };
        let err = if err.is_nan() { f64::INFINITY } else { err };
        max_abs = max_abs.max(err);
        if e != 0.0 {
            max_rel = max_rel.max(err / (e as f64).abs());
        } else if err > 0.0 {
            max_rel = f64::INFINITY;
        }
        // Rank by how far past the tolerance an element is, so the worst *offender* is shown.
        let excess = if ok { err - 1e300 } else { err - (tol.atol + tol.rtol * (e as f64).abs()) };
        let excess = if excess.is_nan() { f64::INFINITY } else { excess };
        if !ok {
            bad += 1;
        }
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    let i = worst.1;
    let detail = Detail::Float {
        max_abs,
        worst_at: coord(shape, i),
        ours: ours.get(i).copied().unwrap_or(f32::NAN),
        reference: reference.get(i).copied().unwrap_or(f32::NAN),
        max_rel,
        bad,
        total: reference.len(),
    };
    (bad == 0, detail)
}

/// Compares rows as sets. `keep(row, value)` filters members (the causal rule for DSA).
fn compare_sets(ours: &[i64], reference: &[i64], shape: &[usize], keep: impl Fn(usize, i64) -> bool) -> (bool, Detail) {
    let k = shape.last().copied().unwrap_or(1).max(1);
    let rows = reference.len() / k;
    let row_shape = &shape[..shape.len().saturating_sub(1)];
    let mut differing = 0;
    let mut first = None;
    for r in 0..rows {
        let set = |v: &[i64]| {
            let mut s: Vec<i64> = v[r * k..(r + 1) * k].iter().copied().filter(|&x| keep(r, x)).collect();
            s.sort_unstable();
            s.dedup();
            s
        };
        let (a, e) = (set(ours), set(reference));
        if a != e {
            differing += 1;
            if first.is_none() {
                let only_a = a.iter().copied().filter(|x| !e.contains(x)).collect();
                let only_e = e.iter().copied().filter(|x| !a.contains(x)).collect();
                first = Some((coord(row_shape, r), only_a, only_e));
            }
        }
    }
    (differing == 0, Detail::Sets { rows, differing, first })
}

/// DSA rows of `[B, S, K]`: only positions `j <= s` count.
pub fn compare_dsa(ours: &[i64], reference: &[i64], shape: &[usize]) -> (bool, Detail) {
    let seq = if shape.len() >= 2 { shape[shape.len() - 2].max(1) } else { 1 };
    compare_sets(ours, reference, shape, |row, j| j >= 0 && (j as usize) <= row % seq)
}

pub fn compare_expert_sets(ours: &[i64], reference: &[i64], shape: &[usize]) -> (bool, Detail) {
    compare_sets(ours, reference, shape, |_, _| true)
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
) -> (bool, Detail) {
    let k = shape.last().copied().unwrap_or(1).max(1);
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
    let (ok, detail) = compare_floats(&aligned_ours, &aligned_ref, &[aligned_ref.len()], tol);
    // Report the worst element at its coordinate in the reference tensor.
    let detail = match detail {
        Detail::Float { max_abs, worst_at, ours, reference: r, max_rel, bad, total } => Detail::Float {
            max_abs,
            worst_at: worst_at.first().and_then(|&p| positions.get(p)).map(|&p| coord(shape, p)).unwrap_or_default(),
            ours,
            reference: r,
            max_rel,
            bad,
            total,
        },
        d => d,
    };
    (ok, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_rule_follows_the_spec() {
        let tol = Tolerance { atol: 1e-4, rtol: 1e-2 };
        let (ok, _) = compare_floats(&[100.5, 0.0], &[100.0, 0.00005], &[2], tol);
        assert!(ok, "0.5 <= 1e-4 + 1e-2 * 100");
        let (ok, d) = compare_floats(&[1.0, 2.0, 3.1], &[1.0, 2.0, 3.0], &[3], tol);
        assert!(!ok);
        let Detail::Float { worst_at, bad, .. } = d else { panic!() };
        assert_eq!((worst_at, bad), (vec![2], 1));
        assert!(!compare_floats(&[f32::NAN], &[f32::NAN], &[1], tol).0, "NaN never matches");
        assert!(compare_floats(&[f32::INFINITY], &[f32::INFINITY], &[1], tol).0);
        assert!(!compare_floats(&[f32::NEG_INFINITY], &[f32::INFINITY], &[1], tol).0);
    }

    #[test]
    fn dsa_rows_are_causal_sets() {
        // [B=1, S=2, K=3]: query 0 has one causal key; the padding (1, 2) differs and is ignored.
        let ours = [0, 1, 2, 1, 0, 9];
        let reference = [0, 2, 1, 0, 1, 7];
        let (ok, _) = compare_dsa(&ours, &reference, &[1, 2, 3]);
        assert!(ok);
        let (ok, d) = compare_dsa(&[0, 1, 2, 1, 1, 1], &reference, &[1, 2, 3]);
        assert!(!ok);
        assert_eq!(d, Detail::Sets { rows: 2, differing: 1, first: Some((vec![0, 1], vec![], vec![0])) });
    }

    #[test]
    fn expert_weights_align_by_id() {
        let (ok, _) = compare_expert_weights(&[3, 1], &[0.5, 0.2], &[1, 3], &[0.2, 0.5], &[1, 2], Tolerance::default());
        assert!(ok);
        let (ok, _) = compare_expert_weights(&[3, 1], &[0.2, 0.5], &[1, 3], &[0.2, 0.5], &[1, 2], Tolerance::default());
        assert!(!ok);
    }
}
