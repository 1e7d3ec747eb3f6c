use super::*;

/// A report of `results` with nothing else to say (no NaN, no names on one side only).
fn report_of(results: Vec<Comparison>) -> DiffReport {
    DiffReport {
        results,
        non_finite_a: None,
        non_finite_b: None,
        only_a: vec![],
        only_b: vec![],
        unread: Default::default(),
        raw: Vec::new(),
        near_tie: 1e-3,
        tol: Tolerance::default(),
        per_name: Vec::new(),
        with_model: false,
        mlp_kinds: None,
        mtp_layer: None,
        notes: Default::default(),
        past_rounding: None,
        bf16_only: [false; 2],
        bf16_first: None,
        f16_only: [false; 2],
        configs_differ: false,
    }
}

/// The first-divergence line reads a constant factor, a DSA row that kept padding for a key
/// is marked, flips of unknown margin without a checkpoint point at --model, and long
/// "only in" lists are cut.
#[test]
fn render_reads_the_first_divergence_and_bounds_its_lists() {
    use crate::compare::{compare_floats, Comparison};
    let (_, scaled) = compare_floats(&[0.8, -2.0], &[2.0, -5.0], &[2], Tolerance::default());
    let flip = Flip {
        row: 3,
        at: vec![0, 3],
        only_ours: vec![],
        only_reference: vec![2],
        recall: 0.5,
        ..Flip::with_margins(None, None)
    };
    let sets = Detail::Sets { rows: 4, mean_recall: 0.875, min_recall: 0.5, flips: vec![flip] };
    let report = DiffReport {
        results: vec![
            Comparison { name: "layers.0.moe.topk_weights".into(), ok: false, detail: scaled },
            Comparison { name: "layers.1.dsa.topk".into(), ok: false, detail: sets },
        ],
        only_a: (0..12).map(|i| format!("layers.{i}.output")).collect(),
        ..report_of(vec![])
    };
    let out = report.render(Path::new("a"), Path::new("b"));
    let first = "first divergence: layers.0.moe.topk_weights (ours = 0.4000 x reference, cosine 1.000000";
    assert!(out.contains(first), "{out}");
    // The DSA row that kept padding for a key, first, is read so on top.
    let padded = DiffReport { results: report.results[1..].to_vec(), ..report.clone() };
    let first = "first divergence: layers.1.dsa.topk (1 of 1 flips are rows where ours keeps fewer distinct \
                 causal keys (duplicates, padding or later keys where a causal key belongs";
    assert!(padded.render(Path::new("a"), Path::new("b")).contains(first));
    // A factor with some spread around it (a per-token normalisation skipped) is "mostly" one.
    let (_, mostly) = compare_floats(&[0.8, -2.0, 1.1], &[2.0, -5.0, 2.5], &[3], Tolerance::default());
    let x = Comparison { name: "x".into(), ok: false, detail: mostly };
    let one = DiffReport { results: vec![x], only_a: vec![], ..report.clone() };
    assert!(one
        .render(Path::new("a"), Path::new("b"))
        .contains("ours = 0.4071 x reference, cosine 0.999297: mostly a factor apart)"));
    // A large factor fitted to a tensor that mostly differs otherwise is not read as one (a
    // missing FP8 scale on one expert: 11 of 48 rows wrong read "ours = 119.6 x reference,
    // cosine 0.15: mostly a factor apart").
    let (_, few_rows) = compare_floats(&[1.0, 2.0, 300.0, -1.0], &[1.0, 2.0, 3.0, 4.0], &[4], Tolerance::default());
    let x = Comparison { name: "x".into(), ok: false, detail: few_rows };
    let one = DiffReport { results: vec![x], only_a: vec![], ..report.clone() };
    assert!(one.render(Path::new("a"), Path::new("b")).contains("first divergence: x\n"));
    // A NaN (or an infinity one side alone holds) leaves the scale undefined: no factor (it read
    // "ours = NaN x reference").
    for odd in [f32::NAN, f32::INFINITY] {
        let (_, undefined) = compare_floats(&[1.0, odd, 3.0], &[1.0, 2.0, 3.0], &[3], Tolerance::default());
        let x = Comparison { name: "x".into(), ok: false, detail: undefined };
        let one = DiffReport { results: vec![x], only_a: vec![], ..report.clone() };
        assert!(one.render(Path::new("a"), Path::new("b")).contains("first divergence: x\n"), "{odd}");
    }
    // Rounding is not a factor: 0.2% apart (bf16's half ulp) is not read as one.
    let (_, rounded) = compare_floats(&[1.002, -2.004], &[1.0, -2.0], &[2], Tolerance::default());
    let x = Comparison { name: "x".into(), ok: false, detail: rounded };
    let one = DiffReport { results: vec![x], only_a: vec![], ..report.clone() };
    assert!(one.render(Path::new("a"), Path::new("b")).contains("first divergence: x\n"));
    assert!(out.contains("only ours [], only ref [2], margin ours unknown ref unknown -> real (ours keeps fewer"));
    // A row that kept fewer keys is real whatever its margins: --model would add nothing to it.
    assert!(!out.contains("with --model DIR"), "{out}");
    assert!(out.contains("only in a: layers.9.output\nonly in a: ... and 2 more (see --json)\n"), "{out}");
    assert!(!out.contains("layers.10.output"), "{out}");

    // Routing that differs over gate logits that match: the rule, not its input.
    let (_, logits) = compare_floats(&[1.0, 2.0], &[1.0, 2.0], &[2], Tolerance::default());
    let flip = Flip {
        only_ours: vec![1],
        margin_ours: Some(0.05),
        margin_reference: Some(0.02),
        ..report.flips()[0].1.clone()
    };
    let sets = Detail::Sets { rows: 4, mean_recall: 0.875, min_recall: 0.5, flips: vec![flip] };
    let report = DiffReport {
        results: vec![
            Comparison { name: "layers.2.moe.router_logits".into(), ok: true, detail: logits },
            Comparison { name: "layers.2.moe.topk_ids".into(), ok: false, detail: sets },
        ],
        only_a: vec![],
        ..report
    };
    let out = report.render(Path::new("a"), Path::new("b"));
    let first = "first divergence: layers.2.moe.topk_ids (its input layers.2.moe.router_logits matches (max_abs \
                 0.0e0, under half of every real flip's margin) and the flips are real";
    assert!(out.contains(first), "{out}");
    let json = report.to_json(Path::new("a"), Path::new("b"));
    assert!(json["first_divergence_reading"].as_str().is_some_and(|r| r.starts_with("its input")), "{json}");
    // Most flips real and the rest unknown (with --model, a port's other bias leaves its choices
    // no top-k under the checkpoint's: unknown margins) says so too; a near-tie, or as many
    // unknown as real, does not.
    let with = |margins: &[Option<f32>]| {
        let mut r = report.clone();
        let base = report.flips()[0].1.clone();
        let flips: Vec<Flip> = margins
            .iter()
            .enumerate()
            .map(|(row, &m)| Flip { row, margin_ours: m, margin_reference: m, ..base.clone() })
            .collect();
        r.results[1].detail = Detail::Sets { rows: 4, mean_recall: 0.5, min_recall: 0.5, flips };
        r.to_json(Path::new("a"), Path::new("b"))["first_divergence_reading"].clone()
    };
    let most = with(&[Some(0.05), None, Some(0.03)]);
    assert!(
        most.as_str().is_some_and(|r| r.contains("and 2 of 3 flips are real (the rest unknown): the routing")),
        "{most}"
    );
    assert_eq!(with(&[Some(0.05), None]), Value::Null);
    assert_eq!(with(&[Some(0.05), Some(1e-4), Some(0.03)]), Value::Null);
    // Logits that moved 0.03, past half the flip's larger margin (0.05): one rule can flip it.
    let (_, moved) = compare_floats(&[1.0, 2.03], &[1.0, 2.0], &[2], Tolerance { atol: 0.05, rtol: 0.0 });
    let mut loose = report.clone();
    loose.results[0].detail = moved;
    assert_eq!(loose.to_json(Path::new("a"), Path::new("b"))["first_divergence_reading"], Value::Null);

    // Without margins (no --model), flips over logits 7e-7 apart are still no ties: one rule
    // flips only choices tied within 1.4e-6. Logits 1e-2 apart (a bf16 port) say nothing.
    let unknown = Flip { margin_ours: None, margin_reference: None, ..report.flips()[0].1.clone() };
    let reading = |apart: f32| {
        let (_, logits) = compare_floats(&[1.0, 2.0 + apart], &[1.0, 2.0], &[2], Tolerance { atol: 2e-2, rtol: 0.0 });
        let flips = vec![unknown.clone(), Flip { row: 3, ..unknown.clone() }];
        let sets = Detail::Sets { rows: 4, mean_recall: 0.75, min_recall: 0.5, flips };
        let results = vec![
            Comparison { name: "layers.2.moe.router_logits".into(), ok: true, detail: logits },
            Comparison { name: "layers.2.moe.topk_ids".into(), ok: false, detail: sets },
        ];
        let report = DiffReport { results, ..report.clone() };
        report.to_json(Path::new("a"), Path::new("b"))["first_divergence_reading"].clone()
    };
    let read = reading(7.2e-7);
    let expected = "its input layers.2.moe.router_logits matches (max_abs 7.2e-7, so one rule flips only choices \
                    tied within 1.4e-6, about 0.0 of 4 tokens by chance): 2 flips say the routing rule or the \
                    correction bias differs; --model DIR tests each flip";
    assert_eq!(read, json!(expected));
    assert_eq!(reading(1e-2), Value::Null);
    // Two flips in 4 tokens where chance makes 0.33 (4 x 3.2e-4 x 256): not ten times that.
    assert_eq!(reading(1.6e-4), Value::Null);
}

/// Spec hook points the reference holds and ours does not are said on top and in the
/// summary, with what ours's own names suggest (a prefix, layers numbered from 1); extras
/// (`dsa.scores`) ours does not record are not.
#[test]
fn spec_names_ours_lacks_are_said_with_a_hint() {
    let (_, same) = crate::compare::compare_floats(&[1.0], &[1.0], &[1], Tolerance::default());
    let report = |only_a: &[&str], only_b: &[&str]| DiffReport {
        only_a: only_a.iter().map(|s| s.to_string()).collect(),
        only_b: only_b.iter().map(|s| s.to_string()).collect(),
        ..report_of(vec![Comparison { name: "logits".into(), ok: true, detail: same.clone() }])
    };
    let render = |r: DiffReport| r.render(Path::new("a"), Path::new("b"));
    let theirs = ["layers.0.output", "layers.0.attn.out", "layers.1.output", "layers.0.dsa.scores"];
    let out = render(report(&["model.layers.0.output", "model.layers.1.output"], &theirs));
    assert!(out.contains("no divergence in the 1 tensors both hold\n"), "{out}");
    let note = "not compared: ours lacks 3 of the reference's spec hook points (layers.0.output, layers.0.attn.out, \
                layers.1.output): ours names them with a `model.` prefix\n";
    assert!(out.contains(note), "{out}");
    let summary = "1 of 1 common tensors match (3 spec hook points of the reference not in ours: ours names them \
                   with a `model.` prefix, so the dumps do not match)";
    assert!(out.contains(summary), "{out}");
    assert!(!report(&["model.layers.0.output", "model.layers.1.output"], &theirs).all_match());
    let out = render(report(&["layers.2.output", "layers.1.attn.out"], &theirs));
    assert!(out.contains("ours numbers its layers from 1"), "{out}");
    assert!(!report(&["layers.2.output", "layers.1.attn.out"], &theirs).all_match());
    // Dumps of two configs: a layer ours lacks is not read as numbered from 1 (two models' layers
    // need not line up), but a prefix is still a prefix.
    let other = |only_a: &[&str]| DiffReport { configs_differ: true, ..report(only_a, &theirs) };
    let out = render(other(&["layers.2.output", "layers.1.attn.out"]));
    assert!(!out.contains("from 1") && out.contains(": the dumps ran different config.json files\n"), "{out}");
    let out = render(other(&["model.layers.0.output", "model.layers.1.output"]));
    assert!(out.contains("ours names them with a `model.` prefix"), "{out}");
    // Selections that match across the shift (a prompt no longer than index_topk keeps every
    // key in every layer) do not line the names up: only an activation that matches does.
    let mut shifted = report(&["layers.2.output", "layers.1.attn.out"], &theirs);
    let all_kept = Detail::Sets { rows: 4, mean_recall: 1.0, min_recall: 1.0, flips: vec![] };
    shifted.results.push(Comparison { name: "layers.1.dsa.topk".into(), ok: true, detail: all_kept });
    assert!(shifted.misnamed().is_some_and(|h| h.contains("from 1")));
    // Two windows that overlap (layers 1-2 against 0-1): layer 1 matches, so the names line
    // up and what ours lacks it did not record.
    let mut windows = report(&["layers.2.output", "layers.2.attn.out"], &["layers.0.output", "layers.0.attn.out"]);
    for name in ["layers.1.output", "layers.1.attn.out"] {
        windows.results.push(Comparison { name: name.into(), ok: true, detail: same.clone() });
    }
    assert!(windows.misnamed().is_none() && windows.all_match());
    assert!(!render(windows).contains("from 1"));
    // A partial recording matches what it holds.
    let out = render(report(&[], &theirs));
    assert!(out.contains("(3 spec hook points of the reference not in ours)\n"), "{out}");
    assert!(report(&[], &theirs).all_match());
    // Not a shift: a window run from layer 1 (its last layer is the reference's); not a
    // prefix: the MTP head's own names (`mtp.logits` ends with `logits`).
    let out = render(report(&["layers.2.output", "layers.1.attn.out"], &[&theirs[..], &["layers.2.output"]].concat()));
    assert!(out.contains("not compared") && !out.contains("from 1"), "{out}");
    let out = render(report(&["mtp.logits", "mtp.final_norm"], &["logits", "final_norm", "embeddings"]));
    assert!(out.contains("not compared") && !out.contains("prefix"), "{out}");
    let out = render(report(&[], &["layers.0.dsa.scores"]));
    assert!(out.contains("no divergence\n") && !out.contains("not compared"), "{out}");
    assert_eq!(
        report(&[], &theirs).to_json(Path::new("a"), Path::new("b"))["missing_spec_names_in_a"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
}

/// An exact integer tensor that differs reads as elements, in text and JSON, not as flips.
#[test]
fn exact_integer_tensors_differ_by_element() {
    let (a, e) = (Values::I64(vec![1, 0, 0]), Values::I64(vec![0, 0, 0]));
    let c = compare_tensor("layers.2.moe.bias_changed", (&a, &[3]), (&e, &[3]), None, Tolerance::default(), None);
    assert_eq!(
        crate::verify::format_line(&c).split_whitespace().collect::<Vec<_>>()[1..5],
        ["MISMATCH", "1/3", "elements", "differ;"]
    );
    let json = comparison_json(&c, 1e-3);
    assert_eq!((json["kind"].as_str(), json["differ"].as_u64()), (Some("exact"), Some(1)));
    assert_eq!(json["differing"][0]["ours"], 1);
    assert!(crate::compare::flips(&[c]).is_empty());
    // An empty float tensor has no worst element to name.
    let empty = Values::F32(vec![]);
    let c = compare_tensor("logits", (&empty, &[1, 0, 8]), (&empty, &[1, 0, 8]), None, Tolerance::default(), None);
    let json = comparison_json(&c, 1e-3);
    assert_eq!((&json["worst_at"], &json["ours"], &json["elements"]), (&Value::Null, &Value::Null, &json!(0)));
}

#[test]
fn per_name_tolerances_last_match_wins() {
    let t = |a, r| Tolerance { atol: a, rtol: r };
    let mut o = DiffOptions::default();
    o.per_name.push(parse_tol("layers.*=1e-2,0").unwrap());
    o.per_name.push(parse_tol("layers.3.*=0.5,0.25").unwrap());
    assert_eq!(o.tol_for("logits"), Tolerance::default());
    assert_eq!(o.tol_for("layers.1.output"), t(1e-2, 0.0));
    assert_eq!(o.tol_for("layers.3.output"), t(0.5, 0.25));
    for bad in ["logits", "logits=1", "=1,1", "x=a,1", "x=-1,0"] {
        assert!(parse_tol(bad).is_err(), "{bad}");
    }
    assert_eq!(parse_tol(" logits = 2e-2, 0").unwrap(), ("logits".to_string(), t(2e-2, 0.0)));
}

/// The hint on what `--model` adds names only what it adds for the flips of unknown margin.
#[test]
fn the_model_hint_fits_the_unknown_flips() {
    let flip = Flip::with_margins(None, None);
    let sets = Detail::Sets { rows: 1, mean_recall: 0.5, min_recall: 0.5, flips: vec![flip] };
    let report = |name: &str| report_of(vec![Comparison { name: name.into(), ok: false, detail: sets.clone() }]);
    let hint = |name: &str| {
        let out = report(name).render(Path::new("a"), Path::new("b"));
        out.lines().find(|l| l.contains("with --model DIR")).map(String::from).unwrap_or_default()
    };
    assert!(hint("layers.2.moe.topk_ids").contains("routing margins"));
    assert!(hint("layers.1.dsa.topk").contains("a shared-indexer layer's DSA flips"));
    assert!(!hint("layers.1.dsa.topk").contains("routing"));
    // Weights without both sides' ids are compared sorted by row, and the line says so.
    let weights = report("layers.2.moe.topk_weights");
    assert!(weights
        .render(Path::new("a"), Path::new("b"))
        .contains("(each row's weights sorted, largest first: the two do not both"));
    let ids = Comparison { name: "layers.2.moe.topk_ids".into(), ..weights.results[0].clone() };
    let both = DiffReport { results: vec![ids, weights.results[0].clone()], ..weights };
    assert!(!both.render(Path::new("a"), Path::new("b")).contains("weights sorted"));
}

/// An onset over batch rows says what holds of all of them: the positions before it match in
/// every row, and each later one differs in one row at least (rows may part at different
/// positions: a port's rows of other prompt lengths).
#[test]
fn an_onset_over_batch_rows_says_what_holds_of_every_row() {
    use crate::reading::Onset;
    let onset = |batch| Onset { matching: 3, index_topk: None, batch, factor: None }.reading_with(true);
    assert_eq!(onset(1), "positions 0-2 match and every later one differs");
    assert_eq!(onset(2), "positions 0-2 match in every batch row and every later one differs in one row at least");
}

/// A first divergence read as rounding's tail reads as rounding; the same divergence read as a
/// rerun's variant (a bug, named before the tail) does not, and neither does a factor.
#[test]
fn only_a_first_divergence_read_as_rounding_is_looked_past() {
    use crate::compare::compare_floats;
    use crate::reading::{Part, Rerun, Tail, Variant};
    let e: Vec<f32> = (0..400).map(|i| (i as f32 * 0.37).sin() + 2.0).collect();
    let mut a = e.clone();
    a.iter_mut().enumerate().for_each(|(i, x)| *x += if i % 7 == 0 { 3e-4 } else { 5e-5 });
    let (ok, detail) = compare_floats(&a, &e, &[20, 20], Tolerance::default());
    assert!(!ok);
    let mut r = report_of(vec![Comparison { name: "layers.0.attn.out".into(), ok, detail }]);
    r.notes.tail = Some(Tail { bad: 3, total: 400, nmse: 1e-9, allowed: 1e-8 });
    assert!(r.first_reads_as_rounding());
    let rerun = Rerun {
        part: Part::Attention,
        variant: Variant::RopeHalves,
        scale: 0.2,
        or: None,
        checkpoint_scale: 0.2,
        mscale: 1.0,
    };
    r.notes.rerun = Some(rerun);
    assert!(!r.first_reads_as_rounding());
    // A factor is read before the tail.
    let (_, scaled) = compare_floats(&[0.8, -2.0], &[2.0, -5.0], &[2], Tolerance::default());
    let mut r = report_of(vec![Comparison { name: "layers.0.attn.out".into(), ok: false, detail: scaled }]);
    r.notes.tail = Some(Tail { bad: 1, total: 2, nmse: 1e-9, allowed: 1e-8 });
    assert!(!r.first_reads_as_rounding());
}

/// Near-tie flips are rounding's only where neither side's own scores contradict its choice: a
/// side that left out a key its own scores rank above one it kept follows another rule, however
/// close the cut (its line says "its rule differs"; the reading must not call it a near-tie's).
#[test]
fn a_near_tie_its_own_scores_contradict_is_not_rounding() {
    use crate::compare::{RuleBreak, Side};
    let flip = Flip {
        row: 0,
        at: vec![0, 9],
        only_ours: vec![3],
        only_reference: vec![5],
        ..Flip::with_margins(Some(1e-4), Some(2e-4))
    };
    let sets = |flip: Flip| Detail::Sets { rows: 10, mean_recall: 0.9, min_recall: 0.9, flips: vec![flip] };
    let r = report_of(vec![Comparison { name: "layers.0.dsa.topk".into(), ok: false, detail: sets(flip.clone()) }]);
    assert!(r.first_reads_as_rounding());
    assert_eq!(r.reading(&r.results[0]).as_deref(), Some("every flip a near-tie"));
    let broken = RuleBreak::OwnScores { side: Side::Ours, kept: 3, left_out: 5, by: 0.7 };
    let flip = Flip { rule_break: Some(broken), ..flip };
    let r = report_of(vec![Comparison { name: "layers.0.dsa.topk".into(), ok: false, detail: sets(flip) }]);
    assert!(!r.first_reads_as_rounding());
    assert_ne!(r.reading(&r.results[0]).as_deref(), Some("every flip a near-tie"));
}
