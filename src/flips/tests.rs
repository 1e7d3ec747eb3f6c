//! Margins recomputed from dumps, flips' classes and the rule breaks `add_movement` finds.

use super::*;

/// Near-tie only with both margins small; one clear margin makes it real; one small margin
/// with the other unknown stays unknown.
#[test]
fn classes_take_both_margins() {
    let class = |ours, reference| Class::of(&Flip::with_margins(ours, reference), 1e-3);
    assert_eq!(class(Some(1e-4), Some(5e-4)), Class::NearTie);
    assert_eq!(class(Some(1e-4), Some(1e-2)), Class::Real);
    assert_eq!(class(Some(f32::INFINITY), Some(1e-4)), Class::Real);
    assert_eq!(class(None, Some(1e-2)), Class::Real);
    assert_eq!(class(Some(1e-4), None), Class::Unknown);
    assert_eq!(class(None, None), Class::Unknown);
}

/// Rows whose recomputed set is not the recorded one lose their margin; padding past a DSA
/// row's query and the order within a row do not count; ids that do not fill the rows are
/// refused.
#[test]
fn only_reproduced_rows_keep_their_margin() {
    let causal = |r: usize, j: i64| j >= 0 && j as usize <= r % 3;
    // Rows of k = 2 over 3 queries: [0, pad], [1, 0], [2, 0]; the recording keeps [0, 9],
    // [0, 1] (same set, other order) and [2, 1] (another key).
    let (recomputed, recorded) = ([0, 5, 1, 0, 2, 0], [0, 9, 0, 1, 2, 1]);
    let m = reproduced(vec![f32::INFINITY, 0.5, 0.25], 2, &recorded, &recomputed, causal).unwrap();
    assert_eq!(m[..2], [f32::INFINITY, 0.5]);
    assert!(m[2].is_nan());
    assert!(reproduced(vec![0.5; 3], 2, &recorded[..4], &recomputed[..4], causal).is_none());
    assert!(reproduced(vec![0.5; 3], 2, &recorded, &recomputed[..4], causal).is_none());
}

/// A recorded choice's margin is its own lead over what it left out: the k-th minus the
/// (k+1)-th where it is the top k, 0 where it broke an exact tie either way, unknown where it
/// is no top k of the values (or holds duplicates), +inf where nothing was left out.
#[test]
fn a_recorded_choice_leads_by_its_lowest_kept_value() {
    let v = [0.9f32, 0.0, 0.5, 0.0];
    approx::assert_abs_diff_eq!(lead(&v, &[2, 0], 2), 0.5);
    assert_eq!(lead(&v, &[0, 2, 1], 3), 0.0, "keeps key 1 of the tied 1 and 3");
    assert_eq!(lead(&v, &[0, 2, 3], 3), 0.0, "keeps key 3 of the tied 1 and 3");
    assert!(lead(&v, &[0, 1], 2).is_nan(), "0.0 kept over 0.5: not a top 2");
    assert!(lead(&v, &[0, 0], 2).is_nan(), "a duplicate where a key should be");
    assert!(lead(&v, &[0, 7], 2).is_nan(), "padding where a key should be");
    assert_eq!(lead(&v[..2], &[1, 0, 9], 2), f32::INFINITY, "every value kept (padding past them)");
    assert!(lead(&[f32::NAN, 1.0], &[1], 1).is_nan());
    // A masked key kept over masked keys left out is a tie (it used to read +inf: clear, so real).
    let masked = [1.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
    assert_eq!(lead(&masked, &[0, 1], 2), 0.0);
    assert_eq!(lead(&masked, &[0], 1), f32::INFINITY, "everything left out masked: clear");
}

/// A routing flip's experts against the layer's noise: one whose experts moved past half its
/// two margins is one rule's flip (within the noise when no more than the layer's 99th
/// percentile); one whose experts barely moved cannot be, so the rule (the bias) differs.
#[test]
fn a_flip_whose_experts_did_not_move_enough_has_another_rule() {
    use crate::hooks::Observer;
    use candle_core::{Device, Tensor};
    let logit = |p: f32| (p / (1.0 - p)).ln();
    let dir = tempfile::tempdir().unwrap();
    let point = HookPoint::Layer(0, LayerHook::TopkIds);
    let write = |name: &str, scores: [[f32; 3]; 3], topk: Vec<i64>| {
        let path = dir.path().join(name);
        let mut w = crate::dump::DumpWriter::create(&path, crate::hooks::Selector::default(), 3).unwrap();
        let ids = Tensor::from_vec(vec![1i64, 2, 3], (1, 3), &Device::Cpu).unwrap();
        w.observe(HookPoint::InputIds, &ids).unwrap();
        let logits: Vec<f32> = scores.iter().flatten().map(|&p| logit(p)).collect();
        let logits = Tensor::from_vec(logits, (3, 3), &Device::Cpu).unwrap();
        w.observe(HookPoint::Layer(0, LayerHook::RouterLogits), &logits).unwrap();
        w.observe(point, &Tensor::from_vec(topk, (3, 1), &Device::Cpu).unwrap()).unwrap();
        w.finish(&crate::dump::metadata("test", None, None)).unwrap();
        Dump::open(&path).unwrap()
    };
    // Token 1: experts 0 and 1 crossed (0.6/0.55 -> 0.55/0.6), a flip of one rule. Token 2:
    // its scores barely moved, yet it took expert 2 over 0, each side by 0.2 (another bias).
    let reference = write("ref.st", [[0.9, 0.1, 0.1], [0.6, 0.55, 0.1], [0.5, 0.1, 0.45]], vec![0, 0, 0]);
    let ours = write("ours.st", [[0.9, 0.1, 0.1], [0.55, 0.6, 0.1], [0.5, 0.1, 0.451]], vec![0, 1, 2]);
    let mut c = crate::compare::compare_tensor(
        &point.name(),
        (&crate::dump::Values::I64(vec![0, 1, 2]), &[3, 1]),
        (&crate::dump::Values::I64(vec![0, 0, 0]), &[3, 1]),
        None,
        crate::compare::Tolerance::default(),
        None,
    );
    c.set_margins(Some(&[0.8, 0.05, 0.2]), Some(&[0.8, 0.05, 0.2]));
    let flat = Config::from_json(&serde_json::json!({})).unwrap();
    add_movement(&mut c, &ours, &reference, Some(&flat), None, 1e-3);
    let Detail::Sets { flips, .. } = &c.detail else { panic!() };
    assert_eq!(flips.iter().map(|f| f.row).collect::<Vec<_>>(), [1, 2]);
    let moved: Vec<Movement> = flips.iter().map(|f| f.moved.unwrap()).collect();
    approx::assert_abs_diff_eq!(moved[0].keys, 0.05, epsilon = 1e-5);
    assert_eq!(flips[0].rule_break, None, "0.05 >= (0.05 + 0.05) / 2: one rule can flip it");
    approx::assert_abs_diff_eq!(moved[1].keys, 0.001, epsilon = 1e-5);
    assert_eq!(flips[1].rule_break, Some(RuleBreak::TooLittle), "0.001 < (0.2 + 0.2) / 2");
    // The noise: the 99th percentile of the 9 scores' changes, the largest here.
    approx::assert_abs_diff_eq!(moved[0].noise, 0.05, epsilon = 1e-5);
    let out = render(&crate::compare::flips(std::slice::from_ref(&c)), 1e-3, "");
    assert!(out.contains("; 1 that one rule cannot make ("), "{out}");
    assert!(out.contains("(too little to flip it: the rule differs)"), "{out}");
    // With the checkpoint's bias (0 here), token 2's choice is seen against ours's own
    // scores: expert 2 (0.451) kept over expert 0 (0.5). Its margin would be unknown then
    // (not a top-1 of those scores); the break is told all the same.
    let rc = RouterConfig::new(&flat);
    c.set_margins(Some(&[0.8, 0.05, f32::NAN]), Some(&[0.8, 0.05, 0.2]));
    add_movement(&mut c, &ours, &reference, Some(&flat), Some((&rc, &[0.0; 3])), 1e-3);
    let Detail::Sets { flips, .. } = &c.detail else { panic!() };
    assert_eq!(flips[0].rule_break, None);
    let Some(RuleBreak::OwnScores { side: Side::Ours, kept: 2, left_out: 0, by }) = flips[1].rule_break else {
        panic!("{:?}", flips[1])
    };
    approx::assert_abs_diff_eq!(by, 0.049, epsilon = 1e-5);
    let out = render(&crate::compare::flips(std::slice::from_ref(&c)), 1e-3, "");
    assert!(
        out.contains("(ours left out 0, which its own scores rank 4.900e-2 above 2 it kept: its rule differs)"),
        "{out}"
    );
    // Without a config saying the routing is flat, nothing is tested.
    c.set_margins(Some(&[0.8, 0.05, 0.2]), Some(&[0.8, 0.05, 0.2]));
    add_movement(&mut c, &ours, &reference, None, Some((&rc, &[0.0; 3])), 1e-3);
    let Detail::Sets { flips, .. } = &c.detail else { panic!() };
    assert!(flips.iter().all(|f| f.moved.is_some() && f.rule_break.is_none()));
}

/// Recomputed from a transformers-style dump (scores, no margin of the selection's length): query
/// 2's exact tie between keys 0 and 1, broken towards the higher key, has margin 0 (a near-tie,
/// not unknown); a query that keeps every causal key has none to lose (+inf).
#[test]
fn a_tie_broken_either_way_has_margin_zero() {
    use crate::hooks::Observer;
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ref.safetensors");
    let mut w = crate::dump::DumpWriter::create(&path, crate::hooks::Selector::default(), 3).unwrap();
    let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &Device::Cpu).unwrap();
    w.observe(HookPoint::InputIds, &Tensor::from_vec(vec![1i64, 2, 3], (1, 3), &Device::Cpu).unwrap()).unwrap();
    let ninf = f32::NEG_INFINITY;
    let scores = t(vec![0.3, ninf, ninf, 0.2, 0.7, ninf, 0.1, 0.1, 0.6], &[1, 3, 3]);
    w.observe(HookPoint::Layer(0, LayerHook::DsaScores), &scores).unwrap();
    let topk = Tensor::from_vec(vec![0i64, 1, 1, 0, 2, 1], (1, 3, 2), &Device::Cpu).unwrap();
    w.observe(HookPoint::Layer(0, LayerHook::DsaTopk), &topk).unwrap();
    // A recorded margin of another length (two rows, for three queries) is not theirs.
    w.observe(HookPoint::Layer(0, LayerHook::DsaMargin), &t(vec![9.0, 9.0], &[1, 2])).unwrap();
    w.finish(&crate::dump::metadata("test", None, None)).unwrap();
    let d = Dump::open(&path).unwrap();
    let m = margins_in(&d, HookPoint::Layer(0, LayerHook::DsaTopk), None).unwrap();
    assert_eq!(m[0], f32::INFINITY, "query 0 keeps its only key (the 1 past it is padding)");
    assert_eq!(m[1], f32::INFINITY, "query 1 keeps both its keys");
    assert_eq!(m[2], 0.0, "keys 0 and 1 tie at 0.1; the recording kept 1");
    assert_eq!(dsa_margins_by(&d, 0, 0..3, 1).unwrap(), m, "recomputed there too");
}

/// The recomputed DSA margins are the same whether the scores are read whole or a row at a
/// time, and for a window of rows (the TUI's one batch row) are that window's.
#[test]
fn dsa_margins_read_in_slices_are_those_read_whole() {
    use crate::hooks::Observer;
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ref.safetensors");
    let (b, s, k) = (2usize, 5usize, 2usize);
    let mut w = crate::dump::DumpWriter::create(&path, crate::hooks::Selector::default(), 3).unwrap();
    let ids: Vec<i64> = (0..(b * s) as i64).collect();
    w.observe(HookPoint::InputIds, &Tensor::from_vec(ids, (b, s), &Device::Cpu).unwrap()).unwrap();
    // Distinct scores, each query's top-k of its causal keys kept (the first key twice where
    // only it is causal, as the indexer pads).
    let score = |r: usize, j: usize| if j <= r % s { ((r * 7 + j * 3) % 11) as f32 / 10.0 } else { f32::NEG_INFINITY };
    let scores: Vec<f32> = (0..b * s).flat_map(|r| (0..s).map(move |j| score(r, j))).collect();
    let topk: Vec<i64> = (0..b * s)
        .flat_map(|r| {
            let mut keys: Vec<usize> = (0..=r % s).collect();
            keys.sort_by(|&x, &y| score(r, y).total_cmp(&score(r, x)));
            (0..k).map(move |c| keys[c.min(keys.len() - 1)] as i64)
        })
        .collect();
    w.observe(HookPoint::Layer(0, LayerHook::DsaScores), &Tensor::from_vec(scores, (b, s, s), &Device::Cpu).unwrap())
        .unwrap();
    w.observe(HookPoint::Layer(0, LayerHook::DsaTopk), &Tensor::from_vec(topk, (b, s, k), &Device::Cpu).unwrap())
        .unwrap();
    w.finish(&crate::dump::metadata("test", None, None)).unwrap();
    let d = Dump::open(&path).unwrap();
    let whole = dsa_margins_by(&d, 0, 0..b * s, usize::MAX).unwrap();
    assert!(whole.iter().all(|m| !m.is_nan()), "every row is its scores' top-k: {whole:?}");
    assert!(whole.iter().any(|m| m.is_finite() && *m > 0.0), "some rows leave keys out: {whole:?}");
    for slice in [1, s, 2 * s + 1] {
        assert_eq!(dsa_margins_by(&d, 0, 0..b * s, slice).unwrap(), whole, "read {slice} scores at a time");
    }
    assert_eq!(dsa_margins_by(&d, 0, s..2 * s, 1).unwrap(), whole[s..], "batch row 1 alone");
    assert_eq!(dsa_margins_by(&d, 0, 0..b * s + 1, 1), None, "rows past the selection");
}

/// DSA flips seen against each side's own scores: a query whose selection leaves out a key its
/// own scores rank higher is a rule break of that side; a key one side masked (torch's
/// `finfo.min`, read as `-inf`) moved infinitely, outside the noise, which it does not make.
#[test]
fn a_dsa_selection_its_own_scores_contradict_breaks_the_rule() {
    use crate::hooks::Observer;
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let point = HookPoint::Layer(0, LayerHook::DsaTopk);
    let write = |name: &str, scores: Vec<f32>, topk: Vec<i64>| {
        let path = dir.path().join(name);
        let mut w = crate::dump::DumpWriter::create(&path, crate::hooks::Selector::default(), 3).unwrap();
        w.observe(HookPoint::InputIds, &Tensor::from_vec(vec![1i64, 2, 3], (1, 3), &Device::Cpu).unwrap()).unwrap();
        let scores = Tensor::from_vec(scores, (1, 3, 3), &Device::Cpu).unwrap();
        w.observe(HookPoint::Layer(0, LayerHook::DsaScores), &scores).unwrap();
        w.observe(point, &Tensor::from_vec(topk, (1, 3, 1), &Device::Cpu).unwrap()).unwrap();
        w.finish(&crate::dump::metadata("test", None, None)).unwrap();
        Dump::open(&path).unwrap()
    };
    let ninf = f32::NEG_INFINITY;
    let reference = write("ref.st", vec![0.3, ninf, ninf, 0.2, 0.7, ninf, 0.1, 0.5, 0.6], vec![0, 1, 2]);
    // Query 1 kept key 0 (0.2) over key 1 (0.7); query 2 masked its own key (f32::MIN, which the
    // dump reader takes for -inf, as it does any value at or below f32::MIN / 2: torch's mask).
    let ours = write("ours.st", vec![0.3, ninf, ninf, 0.2, 0.7, ninf, 0.1, 0.5, f32::MIN], vec![0, 0, 1]);
    let values = |d: &Dump| ints(d, &point.name()).unwrap();
    let mut c = crate::compare::compare_tensor(
        &point.name(),
        (&crate::dump::Values::I64(values(&ours)), &[1, 3, 1]),
        (&crate::dump::Values::I64(values(&reference)), &[1, 3, 1]),
        None,
        crate::compare::Tolerance::default(),
        None,
    );
    add_movement(&mut c, &ours, &reference, None, None, 1e-3);
    let Detail::Sets { flips, .. } = &c.detail else { panic!() };
    assert_eq!(flips.iter().map(|f| f.row).collect::<Vec<_>>(), [1, 2]);
    let [one, two] = [flips[0].moved.unwrap(), flips[1].moved.unwrap()];
    let own = RuleBreak::OwnScores { side: Side::Ours, kept: 0, left_out: 1, by: 0.5 };
    assert_eq!((one.keys, flips[0].rule_break), (0.0, Some(own)));
    assert_eq!((two.keys, two.noise, flips[1].rule_break), (f32::INFINITY, 0.0, None));
    let out = render(&crate::compare::flips(std::slice::from_ref(&c)), 1e-3, "");
    assert!(out.contains("(ours left out 1, which its own scores rank 5.000e-1 above 0 it kept: its rule differs)"));
    assert!(out.contains("(0 of them within the layer's score changes"), "{out}");
}

/// A margin another tool recorded below 0 (or -inf) is unknown, as a recomputed lead is there:
/// taken as it was, it passed for a small margin and classed a rule break a near-tie.
#[test]
fn a_negative_recorded_margin_is_unknown() {
    use crate::hooks::Observer;
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    let mut w = crate::dump::DumpWriter::create(&path, crate::hooks::Selector::default(), 3).unwrap();
    let topk: Vec<i64> = vec![0, 0, 1, 0, 2, 1];
    w.observe(HookPoint::Layer(0, LayerHook::DsaTopk), &Tensor::from_vec(topk, (1, 3, 2), &Device::Cpu).unwrap())
        .unwrap();
    let recorded = vec![f32::INFINITY, -0.5, f32::NEG_INFINITY];
    let margin = HookPoint::Layer(0, LayerHook::DsaMargin);
    w.observe(margin, &Tensor::from_vec(recorded, (1, 3), &Device::Cpu).unwrap()).unwrap();
    w.finish(&crate::dump::metadata("test", None, None)).unwrap();
    let d = Dump::open(&path).unwrap();
    let m = margins_in(&d, HookPoint::Layer(0, LayerHook::DsaTopk), None).unwrap();
    assert_eq!(m[0], f32::INFINITY);
    assert!(m[1].is_nan() && m[2].is_nan(), "{m:?}");
    assert_eq!(dsa_margins_by(&d, 0, 1..3, 1).unwrap().iter().filter(|m| m.is_nan()).count(), 2);
}
