//! The comparison rules' tests: floats, sets, expert weights, positions, flips within the noise.

use super::*;
use crate::flips::Class;

/// The first element outside, and the first flip, are the earliest position's in any batch
/// row: here row 1 broke at position 1 and row 0 at position 3, in a `[B, S, ...]` tensor, in
/// the routing's `[B*S, k]` rows of a run of batch 2, in a `[B, S]` tensor (`dsa.margin`)
/// and in DSA and expert selections; with no positions, the first in row-major order.
#[test]
fn the_first_outside_is_the_earliest_position_in_any_batch_row() {
    let reference = vec![0f32; 16];
    let mut ours = reference.clone();
    (ours[7], ours[10]) = (1.0, 1.0); // [0, 3, 1] and [1, 1, 0] of [2, 4, 2]
    let tol = Tolerance::default();
    let first = |name: &str, shape: &[usize], batch: Option<usize>| {
        let (a, e) = (Values::F32(ours.clone()), Values::F32(reference.clone()));
        match compare_tensor(name, (&a, shape), (&e, shape), None, tol, batch).detail {
            Detail::Float { first_at, .. } => first_at,
            d => panic!("{d:?}"),
        }
    };
    assert_eq!(first("layers.0.output", &[2, 4, 2], None), [1, 1, 0]);
    assert_eq!(first("layers.0.moe.router_logits", &[8, 2], Some(2)), [5, 0], "row 5 is [1, 1]");
    assert_eq!(first("layers.0.moe.router_logits", &[8, 2], None), [3, 1], "batch unknown: row-major");
    assert_eq!(first("x", &[16], None), [7]);
    let (mut margin, zeros) = (vec![0f32; 8], vec![0f32; 8]);
    (margin[3], margin[5]) = (1.0, 1.0); // [0, 3] and [1, 1] of [2, 4]
    let (a, e) = (Values::F32(margin), Values::F32(zeros));
    let c = compare_tensor("layers.0.dsa.margin", (&a, &[2, 4]), (&e, &[2, 4]), None, tol, Some(2));
    assert!(matches!(c.detail, Detail::Float { first_at, .. } if first_at == [1, 1]));
    // Selections: keys of [2, 4, 1] rows, and experts of [8, 1] rows of a batch of 2.
    let (sel, mut moved) = (vec![0i64; 8], vec![0i64; 8]);
    (moved[3], moved[5]) = (1, 1);
    let flips = |d: Detail| match d {
        Detail::Sets { flips, .. } => flips.iter().map(|f| f.row).collect::<Vec<_>>(),
        d => panic!("{d:?}"),
    };
    assert_eq!(flips(compare_dsa(&moved, &sel, &[2, 4, 1]).1), [5, 3]);
    assert_eq!(flips(compare_expert_sets(&moved, &sel, &[8, 1], Some(2)).1), [5, 3]);
    assert_eq!(flips(compare_expert_sets(&moved, &sel, &[8, 1], None).1), [3, 5]);
}

/// A swap of keys that moved no more than the layer's noise is the noise's; a row that kept
/// fewer distinct keys, or one a rule break explains, is not, however little it moved.
#[test]
fn only_a_swap_one_rule_could_make_is_within_the_noise() {
    // (Grouped routing, or routing of unknown rule: other experts' moves can flip its groups.)
    let still = Some(Movement { keys: 0.0, noise: 1e-3, alone: false });
    let swap = Flip { moved: still, ..Flip::with_margins(Some(0.1), Some(0.1)) };
    assert!(swap.within_noise());
    assert!(!Flip { moved: Some(Movement { keys: 2e-3, noise: 1e-3, alone: false }), ..swap.clone() }.within_noise());
    assert!(!Flip { moved: None, ..swap.clone() }.within_noise());
    assert!(!Flip { only_ours: vec![], ..swap.clone() }.within_noise(), "a duplicate in ours");
    assert!(!Flip { only_reference: vec![], ..swap.clone() }.within_noise(), "a duplicate in the reference");
    assert!(!Flip { rule_break: Some(RuleBreak::TooLittle), ..swap.clone() }.within_noise());
    // Scores the same bits on both sides: there is no noise to explain it (a tie, or a rule).
    let unmoved = Flip { moved: Some(Movement { keys: 0.0, noise: 0.0, alone: false }), ..swap.clone() };
    assert!(!unmoved.within_noise() && unmoved.unmoved());
    // Keys whose own scores decide them (DSA, flat routing) and did not move: whatever the rest
    // of the layer did, no noise flipped them.
    let alone = Flip { moved: Some(Movement { keys: 0.0, noise: 1e-3, alone: true }), ..swap.clone() };
    assert!(!alone.within_noise() && alone.unmoved());
    let moved_a_little = Flip { moved: Some(Movement { keys: 1e-4, noise: 1e-3, alone: true }), ..swap };
    assert!(moved_a_little.within_noise() && !moved_a_little.unmoved());
}

/// Only decisions flip: a differing `moe.bias_changed` (a consequence of the logits) is a
/// mismatch, not a flip, while the same difference in `moe.topk_ids` is one.
/// The infinities both sides hold (the masked keys of `dsa.scores`, a `+inf` margin) are no
/// data: the elements counted and the mean error leave them out (the masked upper triangle halved
/// a layer's mean and its share outside the tolerance); one side's alone is an error.
#[test]
fn infinities_both_sides_hold_are_not_counted() {
    let ninf = f32::NEG_INFINITY;
    let (ours, reference) = ([0.1, ninf, 0.3, 0.5], [0.2, ninf, 0.3, 0.7]);
    let (ok, detail) = compare_floats(&ours, &reference, &[1, 2, 2], Tolerance::default());
    let Detail::Float { bad, total, elements, mean_abs, .. } = detail else { panic!("{detail:?}") };
    assert!(!ok);
    assert_eq!((bad, total, elements), (2, 3, 4));
    approx::assert_abs_diff_eq!(mean_abs, (0.1 + 0.2) / 3.0, epsilon = 1e-7);
    let (_, detail) = compare_floats(&[0.1, ninf], &[0.1, 0.2], &[2], Tolerance::default());
    let Detail::Float { bad, total, mean_abs, .. } = detail else { panic!("{detail:?}") };
    assert_eq!((bad, total, mean_abs), (1, 2, f64::INFINITY));
}

#[test]
fn only_decisions_flip() {
    let compared = |name: &str| {
        compare_tensor(
            name,
            (&Values::I64(vec![0, 1]), &[2, 1]),
            (&Values::I64(vec![1, 1]), &[2, 1]),
            None,
            Tolerance::default(),
            None,
        )
    };
    let results = [compared("layers.1.moe.bias_changed"), compared("layers.1.moe.topk_ids")];
    assert!(!results[0].ok && !results[1].ok);
    let names: Vec<&str> = flips(&results).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["layers.1.moe.topk_ids"]);
}

/// A difference from position 2 on (of 4, in both batch rows): 2 matching positions; one
/// that stops again, or starts at 0, has no onset.
#[test]
fn a_difference_that_starts_at_a_position_is_found() {
    let (t, shape) = (Tolerance::default(), [2, 4, 3]);
    let reference = vec![1.0f32; 24];
    let mut ours = reference.clone();
    for (b, p) in [(0, 2), (0, 3), (1, 3)] {
        ours[(b * 4 + p) * 3 + 1] = 2.0;
    }
    assert_eq!(matching_positions(&ours, &reference, &shape, t), Some(2), "position 2 differs in row 0");
    ours[3 + 1] = 2.0; // position 1 of row 0 too
    assert_eq!(matching_positions(&ours, &reference, &shape, t), Some(1));
    ours[(4 + 3) * 3 + 1] = 1.0; // position 3 matches again, in both rows
    ours[(3) * 3 + 1] = 1.0;
    assert_eq!(matching_positions(&ours, &reference, &shape, t), None);
    assert_eq!(matching_positions(&[2.0; 24], &reference, &shape, t), None, "from position 0");
}

/// Expert ids outside the experts, negative ones, and an expert chosen twice by one token are
/// malformed, named with their coordinate; a well-formed tensor passes.
#[test]
fn malformed_expert_ids_are_named_with_their_coordinate() {
    let shape = [3, 2];
    assert_eq!(invalid_expert_ids(&[0, 1, 2, 3, 1, 0], &shape, Some(4)), None);
    let msg = invalid_expert_ids(&[0, 1, 2, 9, 1, 0], &shape, Some(4)).unwrap();
    assert_eq!(msg, "holds expert id 9 at [1, 1], outside the experts 0-3");
    let msg = invalid_expert_ids(&[0, 1, -2, 3, 1, 0], &shape, None).unwrap();
    assert_eq!(msg, "holds expert id -2 at [1, 0], outside the experts 0-65535 (the most glimpse reads)");
    let msg = invalid_expert_ids(&[0, 1, 1 << 16, 3, 1, 0], &shape, None).unwrap();
    assert_eq!(msg, "holds expert id 65536 at [1, 0], outside the experts 0-65535 (the most glimpse reads)");
    let msg = invalid_expert_ids(&[0, 1, 2, 3, 1, 1], &shape, None).unwrap();
    assert_eq!(msg, "chooses expert 1 twice for token [2]");
}

/// A flip is a near-tie below 1e-3, or below twice atol where that is larger; NaN margins
/// (unknown: a replayed decision, or a recomputation that did not make the recorded choice)
/// are not attached, so the flip is unknown rather than real.
#[test]
fn near_ties_follow_the_tolerance_and_unknown_margins_stay_unknown() {
    assert_eq!(Tolerance::default().near_tie(), 1e-3);
    assert_eq!(Tolerance { atol: 2e-2, rtol: 2e-2 }.near_tie(), 4e-2);
    let flip = Flip { row: 1, at: vec![1], ..Flip::with_margins(None, None) };
    let mut c = Comparison {
        name: "layers.0.dsa.topk".into(),
        ok: false,
        detail: Detail::Sets { rows: 2, mean_recall: 0.75, min_recall: 0.5, flips: vec![flip] },
    };
    c.set_margins(Some(&[0.5, f32::NAN]), Some(&[0.5, 2e-2]));
    let Detail::Sets { flips, .. } = &c.detail else { unreachable!() };
    assert_eq!((flips[0].margin_ours, flips[0].margin_reference), (None, Some(2e-2)));
    let near_tie = |f: &Flip, t| Class::of(f, t) == Class::NearTie;
    assert!(!near_tie(&flips[0], 1e-3) && !near_tie(&flips[0], 4e-2), "one side unknown: never a near-tie");
    // Both known: near only when both are (ours close to a tie, the reference's not is a bug).
    let with =
        |ours, reference| Flip { margin_ours: Some(ours), margin_reference: Some(reference), ..flips[0].clone() };
    assert!(!near_tie(&with(1.4e-4, 1.4e-2), 1e-3) && !near_tie(&with(1.4e-2, 1.4e-4), 1e-3));
    assert!(near_tie(&with(1.4e-4, 6e-4), 1e-3));
}

/// Expert weights are compared aligned by expert, and named at their place in the reference
/// tensor: row 1's second expert, where ours holds it first. The weights of an expert one side
/// chose alone are not counted, but the tensor's elements are its own.
#[test]
fn expert_weights_are_named_at_their_coordinate() {
    let tol = Tolerance { atol: 1e-4, rtol: 1e-4 };
    let (ids, ours_ids) = ([3, 5, 2, 7], [3, 5, 7, 2]);
    let (reference, ours) = ([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.45, 0.3]);
    let (ok, d) = compare_expert_weights(&ours_ids, &ours, &ids, &reference, &[2, 2], tol, None);
    let Detail::Float { worst_at, first_at, bad, .. } = d else { panic!() };
    assert!(!ok);
    assert_eq!((worst_at, first_at, bad), (vec![1, 1], vec![1, 1], 1));
    let (_, d) = compare_expert_weights(&[3, 6, 7, 2], &ours, &ids, &reference, &[2, 2], tol, None);
    let Detail::Float { total, elements, .. } = d else { panic!() };
    assert_eq!((total, elements), (3, 4), "expert 5 and 6 chosen by one side each");
}

#[test]
fn float_rule_follows_the_spec() {
    let tol = Tolerance { atol: 1e-4, rtol: 1e-2 };
    let (ok, _) = compare_floats(&[100.5, 0.0], &[100.0, 0.00005], &[2], tol);
    assert!(ok, "0.5 <= 1e-4 + 1e-2 * 100");
    let (ok, d) = compare_floats(&[1.0, 2.0, 3.1], &[1.0, 2.0, 3.0], &[3], tol);
    assert!(!ok);
    let Detail::Float { worst_at, bad, mean_abs, cosine, .. } = d else { panic!() };
    assert_eq!((worst_at, bad), (vec![2], 1));
    approx::assert_abs_diff_eq!(mean_abs, 0.1 / 3.0, epsilon = 1e-6);
    assert!(cosine > 0.999 && cosine < 1.0);
    let (ok, d) = compare_floats(&[f32::NAN], &[f32::NAN], &[1], tol);
    assert!(!ok, "NaN never matches");
    let Detail::Float { max_abs, max_rel, .. } = d else { panic!() };
    assert_eq!((max_abs, max_rel), (f64::INFINITY, f64::INFINITY), "and its error is no smaller than any");
    // The first element outside (row-major) is named beside the worst: a decode bug's first step.
    let (_, d) = compare_floats(&[1.0, 2.1, 3.5], &[1.0, 2.0, 3.0], &[3], tol);
    let Detail::Float { worst_at, first_at, .. } = &d else { panic!() };
    assert_eq!((worst_at.as_slice(), first_at.as_slice()), (&[2][..], &[1][..]));
    let c = Comparison { name: "x".into(), ok: false, detail: d };
    assert!(crate::verify::format_line(&c).ends_with("; first at [1]"), "{}", crate::verify::format_line(&c));
    // With every element inside the tolerance the worst is the largest error, not element 0.
    let (ok, d) = compare_floats(&[1.0, 2.00001, 3.00005], &[1.0, 2.0, 3.0], &[3], tol);
    let Detail::Float { worst_at, first_at, .. } = &d else { panic!() };
    assert!(ok);
    assert_eq!((worst_at.as_slice(), first_at.as_slice()), (&[2][..], &[][..]));
    // Shared -inf (the scores past each query) is equal and left out of nmse and cosine; one
    // side's alone makes them undefined.
    let stats = |a: &[f32], e: &[f32]| match compare_floats(a, e, &[a.len()], tol).1 {
        Detail::Float { nmse, cosine, .. } => (nmse, cosine),
        _ => unreachable!(),
    };
    let inf = f32::NEG_INFINITY;
    let (nmse, cosine) = stats(&[2.0, 1.0, inf], &[1.0, 1.0, inf]);
    approx::assert_abs_diff_eq!(nmse, 0.5, epsilon = 1e-12);
    let Detail::Float { scale, cosine: c, .. } = compare_floats(&[0.8, -2.0], &[2.0, -5.0], &[2], tol).1 else {
        unreachable!()
    };
    approx::assert_abs_diff_eq!(scale, 0.4, epsilon = 1e-6);
    approx::assert_abs_diff_eq!(c, 1.0, epsilon = 1e-6);
    approx::assert_abs_diff_eq!(cosine, 3.0 / (5f64.sqrt() * 2f64.sqrt()), epsilon = 1e-12);
    let (nmse, cosine) = stats(&[1.0, 1.0, inf], &[1.0, 1.0, -1.0]);
    assert!(nmse.is_infinite() && cosine.is_nan());
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
    let Detail::Sets { rows, flips, mean_recall, min_recall } = d else { panic!() };
    assert_eq!((rows, flips.len(), flips[0].at.clone()), (2, 1, vec![0, 1]));
    assert_eq!((flips[0].only_ours.clone(), flips[0].only_reference.clone()), (vec![], vec![0]));
    assert_eq!((min_recall, mean_recall), (0.5, 0.75));
    // Query 0 keeps a later key (2) where key 0 belongs: named as the past key it holds.
    let (ok, d) = compare_dsa(&[2, -1, -1, 1, 0, 9], &reference, &[1, 2, 3]);
    let Detail::Sets { flips, .. } = d else { panic!() };
    assert!(!ok);
    assert_eq!((flips[0].only_ours.clone(), flips[0].past.clone()), (vec![], [vec![2], vec![1, 2]]));
    let text = crate::flips::render(&[("layers.0.dsa.topk", &flips[0])], 1e-3, "");
    assert!(
        text.contains("(ours keeps fewer distinct causal keys: it holds [2], past the query, where one belongs)"),
        "{text}"
    );
}

#[test]
fn expert_weights_align_by_id() {
    let (ok, _) =
        compare_expert_weights(&[3, 1], &[0.5, 0.2], &[1, 3], &[0.2, 0.5], &[1, 2], Tolerance::default(), None);
    assert!(ok);
    let (ok, _) =
        compare_expert_weights(&[3, 1], &[0.2, 0.5], &[1, 3], &[0.2, 0.5], &[1, 2], Tolerance::default(), None);
    assert!(!ok);
}

/// `layers.0.dsa.topk` of `ours` against `reference` (ids and shapes), at the default tolerance.
fn dsa_selection(ours: &[i64], ours_shape: &[usize], reference: &[i64], ref_shape: &[usize]) -> Comparison {
    let (a, e) = (Values::I64(ours.to_vec()), Values::I64(reference.to_vec()));
    compare_tensor("layers.0.dsa.topk", (&a, ours_shape), (&e, ref_shape), None, Tolerance::default(), None)
}

/// Selections of other widths over the same queries compare as causal sets: a port keeping
/// `min(index_topk, S)` columns matches one padding to `index_topk`, and one keeping a key too
/// few shows as the rows that lost it (a shape mismatch said only that the widths differ).
#[test]
fn dsa_rows_of_other_widths_compare_as_sets() {
    let reference = [0, -1, -1, 1, 0, -1, 2, 0, 1]; // [1, 3, 3]: query 2 keeps 3 keys
    let short = dsa_selection(&[0, -1, 0, 1, 2, 1], &[1, 3, 2], &reference, &[1, 3, 3]);
    assert!(!short.ok);
    let Detail::Sets { rows, flips, .. } = short.detail else { panic!("{short:?}") };
    assert_eq!((rows, flips.len(), flips[0].at.clone()), (3, 1, vec![0, 2]));
    assert_eq!((flips[0].only_ours.clone(), flips[0].only_reference.clone()), (vec![], vec![0]));
    assert_eq!(flips[0].fewer_keys(), Some(Side::Ours));
    // Two of three queries, width 2 against 3: the same causal sets.
    let ours = [0, 5, 0, 1];
    let c = dsa_selection(&ours, &[1, 2, 2], &[0, -1, -1, 1, 0, -1], &[1, 2, 3]);
    assert!(c.ok, "{c:?}");
    // Ours keeping more keys than the reference's width: ours's width is wrong, said as such.
    let c = dsa_selection(&[0, -1, -1, 0, 1, -1], &[1, 2, 3], &[0, 0], &[1, 2, 1]);
    assert!(
        matches!(&c.detail, Detail::Invalid { side: Side::Ours, problem } if problem.contains("up to 2 causal keys")),
        "{c:?}"
    );
    // A reference of width 0 holds no row to compare.
    let c = dsa_selection(&ours, &[1, 2, 2], &[], &[1, 2, 0]);
    assert!(matches!(c.detail, Detail::Shape { .. }), "{c:?}");
    // Other queries are another run's: a shape mismatch still.
    let c = dsa_selection(&ours, &[1, 2, 2], &reference, &[1, 3, 3]);
    assert!(matches!(c.detail, Detail::Shape { .. }), "{c:?}");
}

/// Indexer scores past each query's causal keys are no key's score: a port that dumps its scores
/// before masking (finite there) matches where its causal scores do; a causal score that differs
/// still differs.
#[test]
fn dsa_scores_compare_at_causal_keys_only() {
    let inf = f32::NEG_INFINITY;
    let reference = Values::F32(vec![0.5, inf, 0.25, 0.75]); // [1, 2, 2]: query 0 sees key 0
    let cmp = |ours: Vec<f32>, name: &str| {
        let ours = Values::F32(ours);
        compare_tensor(name, (&ours, &[1, 2, 2]), (&reference, &[1, 2, 2]), None, Tolerance::default(), None)
    };
    assert!(cmp(vec![0.5, 3.0, 0.25, 0.75], "layers.0.dsa.scores").ok);
    assert!(!cmp(vec![0.5, 3.0, 0.25, 0.5], "layers.0.dsa.scores").ok);
    // A tensor of another name compares every element.
    assert!(!cmp(vec![0.5, 3.0, 0.25, 0.75], "layers.0.other").ok);
}
