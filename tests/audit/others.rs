//! `audit` against a second side: `--compare` and `--compare-prompts` (other prompts: distances
//! and their chance level), `--against` (the same prompts: a stop keeps the runs done; the
//! changed tokens' near-ties told from changes past a tie), the second side's routing checked
//! against `--model`; and a dump's routing weights checked expert by expert.

use super::*;

/// `--compare`: two sets of prompts on one model, per layer the total variation distance
/// between their load shares and the experts whose share grew and shrank most, counted here from
/// the two dumps' expert ids; another model's routing is refused.
#[test]
fn audit_compares_the_load_of_other_prompts() {
    use glimpse::dump::{Dump, Values};
    let tmp = tempfile::tempdir().unwrap();
    let golden = "golden/flat/reference.safetensors";
    let tokens = "5,9,13,200,7,7,7,3,1,2,44,45,46,47,48,49";
    let other = common::run_dump("golden/flat", &["--tokens", tokens], tmp.path(), "other.st");
    let (json, _) = assert_ok(&glimpse(&["audit", "--dump", golden, "--compare", &other, "--json"]));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let shares = |path: &str, layer: usize| {
        let Values::I64(ids) =
            Dump::open(Path::new(path)).unwrap().values(&format!("layers.{layer}.moe.topk_ids")).unwrap().0
        else {
            panic!()
        };
        let mut c = [0f64; 16];
        ids.iter().for_each(|&e| c[e as usize] += 1.0);
        c.map(|n| n / ids.len() as f64)
    };
    for (n, layer) in (2..5).enumerate() {
        let (a, b) = (shares(golden, layer), shares(&other, layer));
        let row = &json["compare"][n];
        assert_eq!(row["layer"], layer);
        let distance: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0;
        approx::assert_abs_diff_eq!(row["distance"].as_f64().unwrap(), distance, epsilon = 1e-12);
        let (most, least) = (0..16).fold((0, 0), |(hi, lo), e| {
            let d = |e: usize| a[e] - b[e];
            (if d(e) > d(hi) { e } else { hi }, if d(e) < d(lo) { e } else { lo })
        });
        assert_eq!(row["grew"][0]["expert"], most, "layer {layer}");
        assert_eq!(row["shrank"][0]["expert"], least, "layer {layer}");
        approx::assert_abs_diff_eq!(
            row["grew"][0]["share_change"].as_f64().unwrap(),
            a[most] - b[most],
            epsilon = 1e-12
        );
    }
    assert_eq!(json["compare_prompts"], 1);
    let (table, _) = assert_ok(&glimpse(&["audit", "--dump", golden, "--compare", &other]));
    assert!(table.contains("total variation distance between the two load distributions"), "{table}");
    let mtp = "golden/mtp/reference.safetensors";
    assert_error(&glimpse(&["audit", "--dump", golden, "--compare", mtp]), "experts, not 16");
}

/// `--compare-prompts`: the other prompts run live give the comparison their recorded dumps
/// give (`--compare`), the audited side live too; `--model` is needed to run them.
#[test]
fn audit_compares_other_prompts_run_live_as_their_dumps() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours, theirs) = (["5,9,13,200,7,7", "1,2,3"], ["44,45,46,47,48,49,50", "7,7,7,7"]);
    let write = |name: &str, lines: &[&str]| {
        let path = tmp.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path.to_str().unwrap().to_string()
    };
    let (a, b) = (write("a.txt", &ours), write("b.txt", &theirs));
    let dumps: Vec<String> = theirs
        .iter()
        .enumerate()
        .map(|(i, t)| common::run_dump("golden/flat", &["--tokens", t], tmp.path(), &format!("b{i}.st")))
        .collect();
    let audit = |extra: &[&str]| {
        let args = [&["audit", "--model", "golden/flat", "--prompts", &a, "--json"][..], extra].concat();
        let (json, _) = assert_ok(&glimpse(&args));
        serde_json::from_str::<serde_json::Value>(&json).unwrap()
    };
    let live = audit(&["--compare-prompts", &b]);
    let recorded = audit(&["--compare", &dumps[0], "--compare", &dumps[1]]);
    assert_eq!(live["compare_prompts"], 2);
    assert!(live["compare"].as_array().is_some_and(|rows| rows.len() == 3), "{live}");
    assert_eq!(live["compare"], recorded["compare"]);
    assert_error(&glimpse(&["audit", "--dump", &dumps[0], "--compare-prompts", &b]), "--model");
    // Against recorded dumps of the audited side too; a bad line in the other file is refused
    // (before anything runs: both files are read first).
    let (json, _) = assert_ok(&glimpse(&[
        "audit",
        "--model",
        "golden/flat",
        "--dump",
        &dumps[0],
        "--compare-prompts",
        &b,
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((v["compare_prompts"].as_u64(), v["compare_complete"].as_bool()), (Some(2), Some(true)), "{v}");
    let bad = write("bad.txt", &["1,2,x"]);
    assert_error(
        &glimpse(&["audit", "--model", "golden/flat", "--prompts", &a, "--compare-prompts", &bad]),
        "bad.txt line 1",
    );
}

/// `moe.topk_weights` are checked expert by expert against --model's router over the experts the
/// dump records: ids reordered without their weights (`--routes` would pair experts with other
/// experts' weights) and weights of another rule are each said; the reference itself is not.
#[test]
fn audit_says_when_a_dumps_weights_are_not_its_experts() {
    use glimpse::dump::Values;
    let tmp = tempfile::tempdir().unwrap();
    let reference = Path::new("golden/flat/reference.safetensors");
    let edit = |name: &str, f: &dyn Fn(&str, &mut Values)| {
        common::edit_dump(reference, &tmp.path().join(name), |t| t.iter_mut().for_each(|(n, v, _)| f(n, v)))
    };
    let reordered = edit("reordered.st", &|n, v| {
        if let (true, Values::I64(ids)) = (n == "layers.3.moe.topk_ids", v) {
            ids.chunks_mut(4).for_each(<[i64]>::reverse);
        }
    });
    let unscaled = edit("unscaled.st", &|n, v| {
        if let (true, Values::F32(w)) = (n == "layers.3.moe.topk_weights", v) {
            w.iter_mut().for_each(|x| *x /= 2.5);
        }
    });
    let audit = |dump: &Path| text(&glimpse(&["audit", "--model", "golden/flat", "--dump", dump.to_str().unwrap()])).1;
    let err = audit(&reordered);
    assert!(err.contains("of 32 tokens' weights are the router's in other slots"), "{err}");
    let err = audit(&unscaled);
    assert!(err.contains("`layers.3.moe.topk_weights`: 32 of 32 tokens' weights are not --model's router's"), "{err}");
    assert!(!audit(reference).contains("weights"));
    // A port that weighs its experts with the bias (transformers, a planted bug): another rule,
    // never weights in other slots (a 2% match once sorted had paired 2 of 32 tokens' by chance).
    let err = audit(Path::new("golden/flat/port-biased-weights.safetensors"));
    assert!(err.contains("tokens' weights are not --model's router's") && !err.contains("other slots"), "{err}");
}

/// A stop during the audited prompts with `--against` keeps the prompts run and measures the
/// shift against as many reference dumps, saying so (it refused: "the audited runs hold 1 rows
/// of tokens (Ctrl-C stopped the prompts early), --against 3").
#[test]
fn a_stopped_audit_measures_the_shift_against_the_prompts_run() {
    let tmp = tempfile::tempdir().unwrap();
    // Prompts of 3000 tokens (about 0.15 s each here): the stop comes within the first.
    let lines: Vec<String> = (0..3)
        .map(|p| (0..3000).map(|i| ((i * 7 + p * 13) % 199 + 1).to_string()).collect::<Vec<_>>().join(","))
        .collect();
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let against: Vec<String> = lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let dump = tmp.path().join(format!("ref{i}.st")).to_str().unwrap().to_string();
            let run = ["run", "--model", "golden/flat", "--tokens", line, "--record", "layers.*.moe.topk_ids"];
            assert_ok(&glimpse(&[&run[..], &["--dump", &dump]].concat()));
            dump
        })
        .collect();
    let mut args = vec!["audit", "--model", "golden/flat", "--prompts", prompts.to_str().unwrap()];
    for a in &against {
        args.extend(["--against", a]);
    }
    let child = common::spawn_catching_sigint(&args);
    // SAFETY: signalling a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let (stdout, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(stdout.contains("the shift is against the first 1 of 3 --against dumps"), "{stdout}\n{err}");
    // Against the same model's routing of the one prompt run: nothing moved, over its slots.
    let rows: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with("layer    slots   moved")).skip(1).collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for row in &rows[..3] {
        assert!(row.split_whitespace().collect::<Vec<_>>()[1..4] == ["12000", "0.0%", "0"], "{row}");
    }
}

/// `--compare` and `--against` dumps are checked against --model's router as the audited ones
/// are: another model's routing is refused, not compared as a prose-against-code effect.
#[test]
fn audit_checks_the_compared_dumps_against_the_model() {
    use glimpse::dump::Values;
    let tmp = tempfile::tempdir().unwrap();
    let reference = Path::new("golden/flat/reference.safetensors");
    // Every token's experts one id up: not what this router picks.
    let other = common::edit_dump(reference, &tmp.path().join("other.st"), |t| {
        for (n, v, _) in t.iter_mut() {
            if let (true, Values::I64(ids)) = (n.ends_with(".moe.topk_ids"), v) {
                ids.iter_mut().for_each(|e| *e = (*e + 1) % 16);
            }
        }
    });
    let base = ["audit", "--model", "golden/flat", "--dump", reference.to_str().unwrap()];
    for flag in ["--compare", "--against"] {
        let o = glimpse(&[&base[..], &[flag, other.to_str().unwrap()]].concat());
        assert_error(&o, "tokens' experts are not the ones --model's router picks");
    }
    // Without --model there is no router to check by: compared as given.
    let o = glimpse(&["audit", "--dump", reference.to_str().unwrap(), "--compare", other.to_str().unwrap()]);
    assert_ok(&o);
}

/// Layers only one side of `--compare` recorded are said, not dropped from the table unseen.
#[test]
fn audit_compare_says_the_layers_one_side_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = Path::new("golden/flat/reference.safetensors");
    let layer2 = common::edit_dump(reference, &tmp.path().join("layer2.st"), |t| {
        t.retain(|(n, _, _)| !n.contains(".moe.") || n.starts_with("layers.2."))
    });
    let args = ["audit", "--dump", reference.to_str().unwrap(), "--compare", layer2.to_str().unwrap()];
    let (out, _) = assert_ok(&glimpse(&args));
    assert!(out.contains("note: layer(s) 3, 4 only in the audited runs: not compared there"), "{out}");
    let (json, _) = assert_ok(&glimpse(&[&args[..], &["--json"]].concat()));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["compare_notes"], serde_json::json!(["layer(s) 3, 4 only in the audited runs: not compared there"]));
    // Every expert's count on both sides: in the JSON, and in the CSV's last columns (empty
    // where the other side does not route the layer).
    let counts = &v["layers"][0]["counts"];
    assert_eq!(v["compare_counts"], serde_json::json!([{"layer": 2, "counts": counts}]));
    let (csv, _) = assert_ok(&glimpse(&[&args[..], &["--csv", "-"]].concat()));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "layer,expert,count,share,weight,weight_share,bias,mtp,compared_count,compared_share");
    let (mine, theirs) = (lines[1].split(',').nth(2).unwrap(), lines[1].split(',').nth(8).unwrap());
    assert_eq!(
        (lines[1].split(',').next(), mine, theirs),
        (Some("2"), &*counts[0].to_string(), &*counts[0].to_string())
    );
    assert!(lines.iter().filter(|l| l.starts_with("3,")).all(|l| l.ends_with(",,")), "{csv}");
}

/// `--compare`'s chance level against an independent permutation test: numpy, over the same
/// prompts' per-prompt expert counts (from `--routes`), 5000 random splits, gave the 95th
/// percentiles and p below (scripts/chance-references.py, part 3; here one sample of prompts
/// drawn alike already parts in layer 2); prompts of another vocabulary are past chance in every
/// layer. p is within four standard deviations of both estimates (glimpse's 1000 splits and
/// numpy's 5000) and a split's worth. The table's uniform-routing chance level is in the JSON too.
#[test]
fn audit_compare_measures_the_distance_against_chance() {
    let tmp = tempfile::tempdir().unwrap();
    // Token ids drawn at random (SplitMix64, seeded): a stand-in for prose (1-200) and for code
    // (1-20).
    let mut x = 12345u64;
    let mut next = |range: u64| {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % range + 1
    };
    let mut prompts = |name: &str, n: usize, range: u64| {
        let lines: Vec<String> =
            (0..n).map(|_| (0..64).map(|_| next(range).to_string()).collect::<Vec<_>>().join(",")).collect();
        let path = tmp.path().join(name);
        std::fs::write(&path, lines.join("\n")).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (a, b, code) = (prompts("a.txt", 12, 200), prompts("b.txt", 10, 200), prompts("code.txt", 10, 20));
    let compare = |other: &str| {
        let args = ["audit", "--model", "golden/flat", "--prompts", &a, "--compare-prompts", other, "--json"];
        let (json, _) = assert_ok(&glimpse(&args));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let p: Vec<f64> = v["compare"].as_array().unwrap().iter().map(|l| l["distance_p"].as_f64().unwrap()).collect();
        (v, p)
    };
    let (v, p) = compare(&b);
    let p95: Vec<f64> =
        v["compare"].as_array().unwrap().iter().map(|l| l["distance_chance_p95"].as_f64().unwrap()).collect();
    assert_eq!((p95.len(), p.len()), (3, 3), "{v}");
    for (ours, numpy) in p95.iter().zip([0.1021, 0.0917, 0.1062]) {
        assert!((ours - numpy).abs() < 0.01, "{p95:?}");
    }
    for (ours, numpy) in p.iter().zip([0.0012f64, 0.0190, 0.3417]) {
        let sd = (numpy * (1.0 - numpy) * (1.0 / 1000.0 + 1.0 / 5000.0)).sqrt();
        assert!((ours - numpy).abs() < 4.0 * sd + 1e-3, "{p:?}");
    }
    let (_, apart) = compare(&code);
    assert!(apart.iter().all(|&p| p < 0.05), "{apart:?}");
    // 12 prompts of 64 tokens, 4 of 16 experts: uniform routing is far from MaxVio 0.
    let layer = &v["layers"][0];
    assert!(layer["max_vio_per_run_uniform"].as_f64().unwrap() > 0.3, "{layer}");
    assert!(layer["max_vio_uniform"].as_f64().unwrap() < layer["max_vio_per_run_uniform"].as_f64().unwrap());
}

/// Gate logits holding a NaN: the routing is counted as recorded (and said), but the rule without
/// the bias is not run on them (a NaN ranks first: it had counted as a choice), so that layer's
/// MaxVio without the bias stays unknown.
#[test]
fn nan_gate_logits_leave_the_load_without_the_bias_unknown() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = Path::new("golden/flat/reference.safetensors");
    let nan = common::edit_floats(reference, &tmp.path().join("nan.st"), "layers.2.moe.router_logits", |x, _| {
        x[3 * 16 + 2] = f32::NAN
    });
    let o = glimpse(&["audit", "--model", "golden/flat", "--dump", nan.to_str().unwrap(), "--json"]);
    let (json, err) = text(&o);
    assert!(err.contains("`layers.2.moe.router_logits` holds NaN at [3, 2]"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["layers"][0]["max_vio_without_bias"].is_null(), "{}", v["layers"][0]);
    assert!(v["layers"][1]["max_vio_without_bias"].is_number(), "{}", v["layers"][1]);
    // A NaN routing weight leaves the layer's weight mass unknown (summed, it read 0.000: even).
    let nan_weight =
        common::edit_floats(reference, &tmp.path().join("nan-weight.st"), "layers.2.moe.topk_weights", |x, _| {
            x[5] = f32::NAN
        });
    let (json, _) = text(&glimpse(&["audit", "--dump", nan_weight.to_str().unwrap(), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["layers"][0]["max_vio_by_weight"].is_null() && v["layers"][0]["weight_mass"].is_null(), "{v}");
    assert!(v["layers"][1]["max_vio_by_weight"].is_number(), "{v}");
}

/// `--against` classes each changed token by the margins that decided it on both sides: a
/// near-tie where both are below 1e-3, past a tie where either is at least that, unknown
/// otherwise. Here the bf16 port's recorded margins (2e-4 where the token is not a multiple of
/// 3) against a reference copy given margins of 5e-4 on even tokens and none (NaN) on odd ones,
/// counted token by token from the dumps.
#[test]
fn audit_against_tells_near_ties_from_changes_past_them() {
    use glimpse::dump::{Dump, Values};
    let tmp = tempfile::tempdir().unwrap();
    let flat = "golden/flat/reference.safetensors";
    let port = common::edit_dump(Path::new("golden/flat/bf16-port.safetensors"), &tmp.path().join("port.st"), |t| {
        for (name, values, _) in t.iter_mut().filter(|(n, _, _)| n.ends_with(".moe.margin")) {
            let Values::F32(v) = values else { panic!("{name}") };
            v.iter_mut().enumerate().filter(|(t, _)| t % 3 != 0).for_each(|(_, m)| *m = 2e-4);
        }
    });
    let port = port.to_str().unwrap();
    let given = |t: usize| if t.is_multiple_of(2) { 5e-4 } else { f32::NAN };
    let reference = common::edit_dump(Path::new(flat), &tmp.path().join("ref.st"), |tensors| {
        for layer in 2..5 {
            let margins = (0..32).map(given).collect();
            tensors.push((format!("layers.{layer}.moe.margin"), Values::F32(margins), vec![32]));
        }
    });
    let args = ["audit", "--dump", port, "--against", reference.to_str().unwrap(), "--json"];
    let v: serde_json::Value = serde_json::from_str(&assert_ok(&glimpse(&args)).0).unwrap();
    let (ours, theirs) = (Dump::open(Path::new(port)).unwrap(), Dump::open(Path::new(flat)).unwrap());
    let mut seen = [0; 3];
    for layer in v["shift"].as_array().unwrap() {
        let i = layer["layer"].as_u64().unwrap();
        let ids = |d: &Dump| match d.values(&format!("layers.{i}.moe.topk_ids")).unwrap().0 {
            Values::I64(v) => v,
            _ => panic!(),
        };
        let Values::F32(margin) = ours.values(&format!("layers.{i}.moe.margin")).unwrap().0 else { panic!() };
        let (a, b) = (ids(&ours), ids(&theirs));
        let mut counts = [0u64; 3]; // near, past, unknown
        for (t, (x, y)) in a.chunks(4).zip(b.chunks(4)).enumerate() {
            if x.iter().all(|e| y.contains(e)) {
                continue;
            }
            let class = match (margin[t], given(t)) {
                (m, r) if m >= 1e-3 || r >= 1e-3 => 1,
                (m, r) if m < 1e-3 && r < 1e-3 => 0,
                _ => 2,
            };
            counts[class] += 1;
            seen[class] += 1;
        }
        let got = [&layer["tokens_changed_near_tie"], &layer["tokens_changed_past_tie"]].map(|x| x.as_u64().unwrap());
        assert_eq!(got, [counts[0], counts[1]], "layer {i}: {layer}");
        assert_eq!(layer["tokens_changed"].as_u64(), Some(counts.iter().sum()), "layer {i}");
    }
    // The case holds changes of every class.
    assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    let (table, _) = assert_ok(&glimpse(&args[..args.len() - 1]));
    assert!(table.contains("some changed tokens are neither near-tie nor past one (layer"), "{table}");
}
