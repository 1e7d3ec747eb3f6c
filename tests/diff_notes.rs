//! What `diff` says beside its table, on dumps edited to sit at the edges of its rules: the bf16
//! notes follow the tolerance each tensor was compared at, a reading of the DSA selection is
//! said only of what the selection acts on, a shared-indexer layer is not asked for scores it
//! cannot have, and indexer scores dumped before the causal mask are read as the masked ones.

mod common;

use common::{code_and_text, edit_floats, edit_ints, golden, rewrite_st, s};

/// `x` rounded to the nearest bf16 (ties to even), as f32.
fn bf16(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
}

/// Every other value times `1 + by`, the rest times `1 - by`.
fn wobble(x: &mut [f32], by: f32) {
    x.iter_mut().enumerate().for_each(|(i, e)| *e *= if i % 2 == 0 { 1.0 + by } else { 1.0 - by });
}

/// `glimpse diff OURS` against golden/flat's reference with the extra arguments.
fn diff_flat(ours: &std::path::Path, extra: &[&str]) -> String {
    let reference = s(&golden("flat").join("reference.safetensors"));
    let (code, text) = code_and_text(&[&["diff", &s(ours), &reference][..], extra].concat());
    assert_eq!(code, 1, "{text}");
    text
}

/// The bf16 hint is for a float tensor compared at a tolerance tighter than bf16's in either
/// bound, its own where `--tol` gives one: not for dumps every tensor of which was compared at
/// bf16's through `--tol`, and for `--atol 2e-2 --rtol 0`.
#[test]
fn the_bf16_notes_follow_the_tolerance_each_tensor_was_compared_at() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("bf16.safetensors");
    // golden/flat's reference rounded to bf16, with one tensor 10% off: outside bf16's tolerance.
    rewrite_st(&golden("flat").join("reference.safetensors"), &ours, |name, v, _| {
        if name == "layers.3.output" {
            wobble(v, 0.1);
        }
        v.iter_mut().for_each(|x| *x = bf16(*x));
    });
    let note = "ours holds bf16 values only";
    let text = diff_flat(&ours, &["--tol", "*=2e-2,2e-2"]);
    assert!(!text.contains(note), "every tensor was compared at bf16's tolerance:\n{text}");
    let text = diff_flat(&ours, &["--atol", "2e-2", "--rtol", "2e-2"]);
    assert!(!text.contains(note), "{text}");
    let text = diff_flat(&ours, &["--atol", "2e-2", "--rtol", "0"]);
    assert!(text.contains(note), "an rtol of 0 is tighter than bf16's:\n{text}");
    let text = diff_flat(&ours, &[]);
    assert!(text.contains(note), "{text}");
}

/// The note on the first float tensor outside the tolerance is of that tensor: where both sides
/// hold f32 values there, a later tensor that ours holds in bf16 is not called the first.
#[test]
fn the_bf16_note_on_the_first_divergence_names_that_one_only() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ours.safetensors");
    rewrite_st(&golden("flat").join("reference.safetensors"), &ours, |name, v, _| match name {
        "layers.0.input_norm" => wobble(v, 0.01),
        "layers.0.attn.q_latent" => {
            wobble(v, 0.01);
            v.iter_mut().for_each(|x| *x = bf16(*x));
        }
        _ => {}
    });
    let text = diff_flat(&ours, &[]);
    assert!(text.contains("first divergence: layers.0.input_norm"), "{text}");
    assert!(!text.contains("the first float tensor outside the tolerance"), "{text}");
    // Where the first one is ours's bf16 values, it is said.
    let ours = tmp.path().join("first.safetensors");
    rewrite_st(&golden("flat").join("reference.safetensors"), &ours, |name, v, _| {
        if name == "layers.0.input_norm" {
            wobble(v, 0.01);
            v.iter_mut().for_each(|x| *x = bf16(*x));
        }
    });
    let text = diff_flat(&ours, &[]);
    let note = "ours's layers.0.input_norm, the first float tensor outside the tolerance, holds bf16 values only";
    assert!(text.contains(note), "{text}");
}

/// Embeddings that differ from position `index_topk` on are not read as attention that ignores
/// the DSA selection: they are made before any attention.
#[test]
fn an_embeddings_difference_is_not_read_as_the_dsa_selections() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = golden("flat").join("reference.safetensors");
    // golden/flat keeps 8 keys a query (index_topk): positions 0-7 keep every causal key.
    let ours = edit_floats(&reference, &tmp.path().join("emb.safetensors"), "embeddings", |v, shape| {
        let width = shape[2];
        wobble(&mut v[8 * width..], 0.3);
    });
    let text = diff_flat(&ours, &["--model", &s(&golden("flat"))]);
    assert!(text.contains("first divergence: embeddings"), "{text}");
    assert!(!text.contains("DSA selection"), "{text}");
}

/// A flip in a shared-indexer layer's selection, where both dumps hold the full layers' scores:
/// the layer scores nothing of its own, so recording its scores is no advice.
#[test]
fn a_shared_indexer_layers_flip_is_not_answered_with_record_its_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden("grouped-shared-yarn");
    let reference = dir.join("reference.safetensors");
    // Layer 1 reuses layer 0's selection (`inspect`: 0 full, 1 shared). At the last position of
    // the first batch row, one kept key becomes a causal key the row left out.
    let ours = edit_ints(&reference, &tmp.path().join("shared.safetensors"), "layers.1.dsa.topk", |v, shape| {
        let (seq, k) = (shape[1], shape[2]);
        let row = &mut v[(seq - 1) * k..seq * k];
        let left_out = (0..seq as i64).find(|j| !row.contains(j)).unwrap();
        row[0] = left_out;
    });
    let (code, text) = code_and_text(&["diff", &s(&ours), &s(&reference)]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("first divergence: layers.1.dsa.topk"), "{text}");
    assert!(!text.contains("record it"), "{text}");
    assert!(text.contains("a shared-indexer layer, whose selection is an earlier full layer's"), "{text}");
}

/// Tiny dumps of one batch row of 4 positions: layer 0's selection flips at a near-tie at
/// position 2 (margin 0 both sides), layer 1's indexer scores differ from there on (where the
/// flip reaches), and ours's layer 1 output is half the reference's everywhere (a bug). Ours's
/// layer 1 scores are dumped before the causal mask (finite past each query) or after it.
fn near_tie_then_a_factor(dir: &std::path::Path, premask: bool) -> [std::path::PathBuf; 2] {
    use glimpse::st::{write, Entry};
    let inf = f32::NEG_INFINITY;
    let scores0 = [0.9, inf, inf, inf, 0.4, 0.6, inf, inf, 0.5, 0.3, 0.3, inf, 0.9, 0.8, 0.1, 0.0];
    let reference1 = [0.9, inf, inf, inf, 0.7, 0.5, inf, inf, 0.2, 0.21, 0.16, inf, -0.1, -0.2, 0.4, 1.0];
    let mut ours1 = [0.9, 0.1, 0.2, 0.3, 0.7, 0.5, 0.4, 0.5, 0.6, 0.25, 0.1, 0.6, -0.6, -0.7, 0.4, 0.8];
    if !premask {
        for (o, r) in ours1.iter_mut().zip(&reference1) {
            if r.is_infinite() {
                *o = *r;
            }
        }
    }
    let output: Vec<f32> = (0..32).map(|i| (i as f32 * 0.7).sin()).collect();
    let half: Vec<f32> = output.iter().map(|x| x * 0.5).collect();
    let meta = [("format".to_string(), "glm5-dump/1".to_string())].into_iter().collect();
    let dump = |name: &str, topk: &[i64], scores1: &[f32], output: &[f32]| {
        let entries = [
            ("input_ids", Entry::i64(vec![1, 4], &[5, 6, 7, 8])),
            ("layers.0.dsa.scores", Entry::f32(vec![1, 4, 4], &scores0)),
            ("layers.0.dsa.margin", Entry::f32(vec![1, 4], &[f32::INFINITY, f32::INFINITY, 0.0, 0.7])),
            ("layers.0.dsa.topk", Entry::i64(vec![1, 4, 2], topk)),
            ("layers.1.dsa.scores", Entry::f32(vec![1, 4, 4], scores1)),
            ("layers.1.output", Entry::f32(vec![1, 4, 8], output)),
        ]
        .map(|(n, e)| (n.to_string(), e));
        let path = dir.join(name);
        write(&path, &entries, &meta).unwrap();
        path
    };
    [
        dump("ours.safetensors", &[0, 1, 0, 1, 0, 2, 0, 1], &ours1, &half),
        dump("reference.safetensors", &[0, 1, 0, 1, 0, 1, 0, 1], &reference1, &output),
    ]
}

/// Past a near-tie flip, the first divergence rounding does not explain is found whether ours
/// dumped its indexer scores before the causal mask or after it: they are compared at the causal
/// keys only, and where the flip reaches they are rounding's.
#[test]
fn scores_dumped_before_the_causal_mask_are_read_past_rounding_as_masked_ones() {
    let tmp = tempfile::tempdir().unwrap();
    for premask in [false, true] {
        let dir = tmp.path().join(premask.to_string());
        std::fs::create_dir(&dir).unwrap();
        let [ours, reference] = near_tie_then_a_factor(&dir, premask);
        let (code, text) = code_and_text(&["diff", &s(&ours), &s(&reference)]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("first divergence: layers.0.dsa.topk (every flip a near-tie)"), "{premask}: {text}");
        let past = "past what rounding explains, the first divergence: layers.1.output (ours = 0.5000 x reference";
        assert!(text.contains(past), "premask {premask}: {text}");
    }
}

/// Routing weights are read as they are compared, paired by expert: ours lists each token's
/// experts best first (as glimpse does), the reference in its top-k's unsorted order (as
/// transformers does), and a difference of rounding's shape reads as rounding's tail, as it
/// does where ours holds no ids and rows are compared sorted. (Read position by position, about
/// 40% of the weights were outside the tolerance: no reading.)
#[test]
fn routing_weights_are_read_paired_by_expert() {
    use glimpse::dump::Values;
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ours.safetensors");
    let mut reordered = 0;
    common::edit_dump(&golden("flat").join("reference.safetensors"), &ours, |t| {
        let at = |name: &str| t.iter().position(|(n, _, _)| n == name).unwrap();
        let (i, w) = (at("layers.2.moe.topk_ids"), at("layers.2.moe.topk_weights"));
        let k = *t[w].2.last().unwrap();
        let (Values::I64(ids), Values::F32(weights)) = (t[i].1.clone(), t[w].1.clone()) else { panic!() };
        let (mut sorted_ids, mut sorted_weights) = (Vec::new(), Vec::new());
        for (row, (ri, rw)) in ids.chunks(k).zip(weights.chunks(k)).enumerate() {
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&x, &y| rw[y].total_cmp(&rw[x]));
            reordered += usize::from(order.iter().enumerate().any(|(j, &o)| j != o));
            for (j, &o) in order.iter().enumerate() {
                sorted_ids.push(ri[o]);
                // Noise everywhere inside the default tolerance, and one weight just past it.
                let tol = 1e-4 + 1e-4 * rw[o].abs();
                let by = if (row, j) == (5, 1) {
                    1.5
                } else if j % 2 == 0 {
                    0.1
                } else {
                    -0.1
                };
                sorted_weights.push(rw[o] + by * tol);
            }
        }
        (t[i].1, t[w].1) = (Values::I64(sorted_ids), Values::F32(sorted_weights));
    });
    assert!(reordered > 16, "{reordered} rows reordered");
    let text = diff_flat(&ours, &[]);
    assert!(text.contains("first divergence: layers.2.moe.topk_weights"), "{text}");
    assert!(text.contains("1 of 128 elements outside") && text.contains("the tail of rounding noise"), "{text}");
    // Without ours's ids each row is compared sorted, and read so.
    let unnamed = tmp.path().join("unnamed.safetensors");
    common::edit_dump(&ours, &unnamed, |t| t.retain(|(n, _, _)| n != "layers.2.moe.topk_ids"));
    let text = diff_flat(&unnamed, &[]);
    assert!(text.contains("first divergence: layers.2.moe.topk_weights"), "{text}");
    assert!(text.contains("1 of 128 elements outside") && text.contains("the tail of rounding noise"), "{text}");
}

/// The routing's `[B*S, ...]` rows are placed along the positions by the dump's batch rows, which
/// dumps without `input_ids` give by their `[B, S, ...]` hook points: the first element outside
/// is the earliest position's in any batch row (golden/mtp's B = 2, S = 16: row 20, batch row 1's
/// position 4, before row 10, batch row 0's position 10), as it is with the ids.
#[test]
fn routing_rows_are_placed_by_the_batch_without_input_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let source = golden("mtp").join("reference.safetensors");
    let no_ids = |t: &mut Vec<common::Named>| t.retain(|(n, _, _)| n != "input_ids");
    let moved = edit_floats(&source, &tmp.path().join("moved.st"), "layers.1.moe.router_logits", |x, shape| {
        for row in [10, 20] {
            x[row * shape[1] + 3] += 1.0;
        }
    });
    for (ours, reference) in [
        (moved.clone(), source.clone()),
        (
            common::edit_dump(&moved, &tmp.path().join("moved-no-ids.st"), no_ids),
            common::edit_dump(&source, &tmp.path().join("ref-no-ids.st"), no_ids),
        ),
    ] {
        let (_, text) = code_and_text(&["diff", &s(&ours), &s(&reference), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let t = v["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "layers.1.moe.router_logits").unwrap();
        assert_eq!(t["first_outside_at"], serde_json::json!([20, 3]), "{}: {t}", ours.display());
    }
}
