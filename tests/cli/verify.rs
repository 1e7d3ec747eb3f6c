//! `verify` end to end: a run's own dump matches and another model's does not, a bf16 reference
//! against the f32 one reads as rounding, replayed decisions, tolerance overrides, every query
//! absorbed, and a reference whose layers start past 0.

use super::*;

#[test]
fn verify_of_its_own_dump_matches_and_of_another_model_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (synth(tmp.path(), 1), synth(tmp.path(), 2));
    let dump = tmp.path().join("a.safetensors");
    let o = glimpse(&[
        "run",
        "--model",
        a.to_str().unwrap(),
        "--tokens",
        "1,2,3,4,5;6,7,8,9,10",
        "--dump",
        dump.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    let o = glimpse(&["verify", "--model", a.to_str().unwrap(), "--golden", dump.to_str().unwrap()]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("layers.1.moe.topk_ids"), "{out}");
    let o = glimpse(&["verify", "--model", b.to_str().unwrap(), "--golden", dump.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("first mismatch: embeddings"), "{out}");
    // Both models share one config: no warning about a different config.json here.
    assert!(err.is_empty(), "{err}");
    // A reference made from another config is flagged, on one stderr line, once the comparison stands.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let other = root.join("mtp/reference.safetensors");
    let o = glimpse(&["verify", "--model", root.join("flat").to_str().unwrap(), "--golden", other.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("was made from a different config.json than") && err.lines().count() == 1, "{err}");
    // An error after it keeps it, on the error's one line: here the cause.
    let o =
        glimpse(&["verify", "--model", "golden/grouped-shared-yarn", "--golden", "golden/flat/reference.safetensors"]);
    let (_, err) = text(&o);
    let cause = "is out of range for vocab_size 128 (golden/flat/reference.safetensors was made from a different \
                 config.json than golden/grouped-shared-yarn)";
    assert!(o.status.code() == Some(2) && err.lines().count() == 1 && err.contains(cause), "{err}");
}

/// transformers run with bf16 products against its own f32 run, at bf16's tolerance: where the
/// first divergence is a float tensor with a few scattered elements past it, diff reads it as
/// rounding's tail; where it is a DSA selection, every flip is a near-tie. At f32's tolerance a
/// bf16 port is told to use bf16's.
#[test]
fn a_bf16_reference_against_the_f32_one_reads_as_rounding() {
    let first = |case: &str, tol: &str| {
        let (bf16, f32_) =
            (format!("golden/{case}/reference-bf16.safetensors"), format!("golden/{case}/reference.safetensors"));
        let args = ["diff", &bf16, &f32_, "--model", &format!("golden/{case}"), "--atol", tol, "--rtol", tol];
        let (out, _) = text(&glimpse(&args));
        out.lines().nth(1).unwrap_or_default().to_string()
    };
    // At 2e-2 every case's first divergence is a selection flipped by the rounding of the
    // attention before it; at 1e-2 fp8-sharded's is that attention's output, a few elements past.
    let fp8 = first("fp8-sharded", "1e-2");
    // The elements outside, counted here by the spec's rule.
    let values = |file: &str| {
        let d = glimpse::dump::Dump::open(Path::new(&format!("golden/fp8-sharded/{file}"))).unwrap();
        let glimpse::dump::Values::F32(v) = d.values("layers.0.attn.out").unwrap().0 else { panic!() };
        v
    };
    let (a, e) = (values("reference-bf16.safetensors"), values("reference.safetensors"));
    let outside = a.iter().zip(&e).filter(|(a, e)| (*a - *e).abs() as f64 > 1e-2 + 1e-2 * e.abs() as f64).count();
    assert!((1..=e.len() / 100).contains(&outside), "{outside} of {}", e.len());
    let first_line =
        format!("first divergence: layers.0.attn.out ({outside} of {} elements outside, scattered", e.len());
    assert!(fp8.starts_with(&first_line), "{fp8}");
    assert!(fp8.contains("the tail of rounding noise"), "{fp8}");
    assert_eq!(first("flat", "2e-2"), "first divergence: layers.1.dsa.topk (every flip a near-tie)");
    // At f32's tolerance, a port whose activations are bf16 values (its gate logits are not) is
    // told to compare at bf16's, from the first float tensor that differs.
    let port = ["diff", "golden/flat/bf16-port.safetensors", "golden/flat/reference.safetensors"];
    let (out, _) = text(&glimpse(&port));
    let note = "note: ours's embeddings, the first float tensor outside the tolerance, holds bf16 values only: \
                compare at bf16's tolerance, --atol 2e-2 --rtol 2e-2";
    assert!(out.contains(note) && !out.contains("ours holds bf16 values only"), "{out}");
    let (json, _) = text(&glimpse(&[&port[..], &["--json"]].concat()));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["bf16_first_divergence"], serde_json::json!({"name": "embeddings", "a": true, "b": false}));
    // The text's note is in the JSON too, as the other commands' notes are.
    let notes = json["notes"].as_array().unwrap();
    assert!(notes.iter().any(|n| n.as_str().unwrap().contains("holds bf16 values only")), "{notes:?}");
    // A bf16 checkpoint's embeddings are bf16 values on both sides: a lookup bug there (position
    // 5 given position 6's row) is no hint to loosen the tolerance.
    let tmp = tempfile::tempdir().unwrap();
    let reference = Path::new("golden/bf16-fused/reference.safetensors");
    let looked_up = common::edit_dump(reference, &tmp.path().join("lookup.st"), |t| {
        let (_, glimpse::dump::Values::F32(x), shape) = t.iter_mut().find(|(n, ..)| n == "embeddings").unwrap() else {
            panic!("embeddings are floats")
        };
        let h = shape[2];
        let next = x[6 * h..7 * h].to_vec();
        x[5 * h..6 * h].copy_from_slice(&next);
    });
    let (out, _) = text(&glimpse(&["diff", &s(&looked_up), reference.to_str().unwrap()]));
    assert!(out.contains("first divergence: embeddings") && !out.contains("note:"), "{out}");
    // Nor, at bf16's tolerance, is it read as rounding's tail: one position moved, the rest exact.
    let loose = ["--atol", "2e-2", "--rtol", "2e-2"];
    let (out, _) = text(&glimpse(&[&["diff", &s(&looked_up), reference.to_str().unwrap()][..], &loose].concat()));
    assert!(out.lines().nth(1) == Some("first divergence: embeddings"), "{out}");
}

/// A run checked against its own dump with its decisions replayed matches everywhere, on both
/// paths: a replayed route keeps its own decision's margin (it was recorded as NaN, a mismatch).
#[test]
fn replaying_a_runs_own_decisions_matches_its_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let own =
        common::run_dump("golden/flat", &["--tokens-from", "golden/flat/reference.safetensors"], tmp.path(), "own.st");
    let own = own.as_str();
    for device in ["cpu", "cpu-ops"] {
        let args = ["verify", "--model", "golden/flat", "--golden", own, "--force-routing", "--force-selection"];
        let (code, out) = common::code_and_text(&[&args[..], &["--device", device]].concat());
        assert_eq!(code, 0, "{device}: {out}");
    }
}

/// The README's porting command: a replayed run's summary says what it replayed, and a last line
/// what matches without the replay (fewer tensors, first a decision), on both paths.
#[test]
fn a_replayed_verify_says_so_and_what_matches_without() {
    let args = ["verify", "--model", "golden/flat", "--golden", "golden/flat/bf16-port.safetensors", "--isolate"];
    let tol = ["--force-routing", "--force-selection", "--atol", "2e-2", "--rtol", "2e-2"];
    for device in ["cpu", "cpu-ops"] {
        let (code, out) = common::code_and_text(&[&args[..], &tol, &["--device", device]].concat());
        // Layer 0's output stays outside 2e-2 with the decisions replayed (README's porting step 2).
        assert_eq!(code, 1, "{device}: {out}");
        let count = |line: &str| -> usize { line.split(" of ").next().unwrap().trim().parse().unwrap() };
        let summary = out.lines().find(|l| l.contains(" tensors match (")).unwrap();
        let replayed = "isolated layers, the reference's expert choices and DSA selections replayed";
        assert!(summary.contains(replayed), "{device}: {out}");
        assert!(out.contains("explained by flips"), "{device}: {out}");
        let without = out.lines().find_map(|l| l.strip_prefix("without the replay: ")).unwrap();
        assert!(count(without) < count(summary), "{device}: {out}");
        let first = without.split("first mismatch: ").nth(1).unwrap();
        assert!(first.ends_with(".dsa.topk") || first.ends_with(".moe.topk_ids"), "{device}: {out}");
    }
}

/// Every golden case matches its transformers reference with every query of the prefill in the
/// absorbed form (`GLIMPSE_ABSORBED_FROM=0`; by default it starts past these cases' lengths), and
/// a value that is no position is refused before any work by the commands that run the model.
#[test]
fn golden_cases_match_with_every_query_absorbed() {
    let with = |from: &str, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_glimpse"))
            .args(args)
            .env("GLIMPSE_ABSORBED_FROM", from)
            .output()
            .unwrap()
    };
    for case in ["flat", "fp8-sharded", "grouped-shared-yarn", "bf16-fused", "mtp"] {
        let o = with("0", &["verify", "--model", &s(&golden(case))]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{case}: {out}{err}");
        assert!(out.lines().last().is_some_and(|l| l.contains("tensors match")), "{case}: {out}");
    }
    // The override is what put those queries in the absorbed form: the attention outputs of the
    // two forms differ in their last bits, and only there.
    let tmp = tempfile::tempdir().unwrap();
    let attn = |from: &str| {
        let out = tmp.path().join(format!("from{from}.st"));
        let args = ["run", "--model", "golden/flat", "--tokens", "1,2,3,4", "--dump", &s(&out)];
        assert_eq!(with(from, &args).status.code(), Some(0));
        match glimpse::dump::Dump::open(&out).unwrap().values("layers.0.attn.out").unwrap().0 {
            glimpse::dump::Values::F32(v) => v,
            _ => panic!("attn.out is not f32"),
        }
    };
    let (expanded, absorbed) = (attn(""), attn("0"));
    assert_ne!(expanded, absorbed, "GLIMPSE_ABSORBED_FROM=0 changed nothing");
    let worst = expanded.iter().zip(&absorbed).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "the two forms differ by {worst}");
    assert_error(&with("first", &["verify"]), "GLIMPSE_ABSORBED_FROM=first: not a position");
    // Commands that never run the model do not read it.
    let reference = s(&golden("flat").join("reference.safetensors"));
    assert_eq!(with("first", &["diff", &reference, &reference]).status.code(), Some(0));
}

/// `verify` takes the spec's per-name tolerance overrides as `diff` does (and says a pattern that
/// matched nothing), and does not pass a reference it could not compare: one holding only the
/// tokens, or its hook points behind a prefix. `diff --json` says the tolerances it used.
#[test]
fn verify_takes_tol_overrides_and_does_not_pass_on_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::golden("flat").join("reference.safetensors");
    let logits_line = |args: &[&str]| {
        let (code, out) = common::code_and_text(&[&["verify", "--atol", "0", "--rtol", "0"], args].concat());
        assert_eq!(code, 1, "{out}");
        out.lines().find(|l| l.starts_with("logits ")).map(String::from).unwrap_or_else(|| panic!("{out}"))
    };
    assert!(logits_line(&[]).contains("MISMATCH"));
    assert!(logits_line(&["--tol", "logits=1e-4,1e-4"]).contains(" ok "));
    let (_, err) = text(&glimpse(&["verify", "--tol", "nothing*=1,1"]));
    assert!(err.contains("warning: --tol nothing* matches no tensor compared"), "{err}");

    let ids_only =
        common::edit_dump(&reference, &tmp.path().join("ids.st"), |t| t.retain(|(n, _, _)| n == "input_ids"));
    let (code, out) = common::code_and_text(&["verify", "--golden", &common::s(&ids_only)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("nothing verified: the reference holds none of this run's hook points but input_ids"),
        "{out}"
    );
    assert!(
        out.contains("1 of 1 tensors match (atol 1e-4, rtol 1e-4); not passed: the reference could not be"),
        "{out}"
    );
    // diff does not pass it either, whichever side holds only the tokens.
    let (i, r) = (common::s(&ids_only), common::s(&reference));
    for pair in [[&i, &r], [&r, &i]] {
        let (code, out) = common::code_and_text(&["diff", pair[0], pair[1], "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!((code, &v["match"]), (1, &serde_json::json!(false)), "{out}");
        assert_eq!(v["not_compared"], "nothing compared but input_ids: the dumps share no hook point");
        let (_, text_out) = common::code_and_text(&["diff", pair[0], pair[1]]);
        assert!(text_out.contains("; not passed: nothing compared but input_ids"), "{text_out}");
    }
    let prefixed = common::edit_dump(&reference, &tmp.path().join("prefixed.st"), |t| {
        for (n, _, _) in t.iter_mut().filter(|(n, _, _)| n.starts_with("layers.")) {
            *n = format!("model.{n}");
        }
    });
    let (code, out) = common::code_and_text(&["verify", "--golden", &common::s(&prefixed)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("spec hook points with a `model.` prefix: not compared"), "{out}");

    // A reference of bf16 values (truncated here) at f32's tolerance: the note diff gives.
    let bf16 = tmp.path().join("bf16.st");
    common::rewrite_st(&reference, &bf16, |_, v, _| {
        v.iter_mut().for_each(|x| *x = f32::from_bits(x.to_bits() & !0xFFFF))
    });
    let (_, out) = common::code_and_text(&["verify", "--golden", &common::s(&bf16)]);
    assert!(out.contains("holds bf16 values only (a run in bf16?): compare at bf16's tolerance"), "{out}");
    let (_, out) =
        common::code_and_text(&["verify", "--golden", &common::s(&bf16), "--atol", "2e-2", "--rtol", "2e-2"]);
    assert!(!out.contains("holds bf16 values only"), "{out}");
    // (The tolerance that tensor was compared at is what counts: a --tol override.)
    let (_, out) = common::code_and_text(&["verify", "--golden", &common::s(&bf16), "--tol", "*=5e-2,5e-2"]);
    assert!(!out.contains("holds bf16 values only"), "{out}");

    // A dump without the `source` the spec asks for is compared, with a warning.
    let no_source = tmp.path().join("no-source.st");
    let meta = std::collections::BTreeMap::from([("format".to_string(), "glm5-dump/1".to_string())]);
    let logits = glimpse::st::Entry::f32(vec![1, 1, 2], &[0.5, 1.5]);
    glimpse::st::write(&no_source, &[("logits".to_string(), logits)], &meta).unwrap();
    let (_, err) = assert_ok(&glimpse(&["diff", &common::s(&no_source), &common::s(&no_source)]));
    assert!(err.contains("no-source.st: no `source` in its metadata"), "{err}");

    // --json: one document saying what the lines say.
    let (code, text_out) = common::code_and_text(&["verify", "--atol", "0", "--rtol", "0"]);
    let (json_code, json_out) = common::code_and_text(&["verify", "--atol", "0", "--rtol", "0", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(
        (code, json_code, v["schema"].as_str(), v["match"].as_bool()),
        (1, 1, Some("glimpse-verify/1"), Some(false))
    );
    let first = v["first_mismatch"].as_str().unwrap();
    assert!(text_out.contains(&format!("first mismatch: {first}")), "{text_out}");
    let summary = format!("{} of {} tensors match", v["tensors_matching"], v["tensors"].as_array().unwrap().len());
    assert!(text_out.contains(&summary), "{summary}: {text_out}");
    let (json_out, _) = assert_ok(&glimpse(&["verify", "--json"]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&json_out).unwrap()["match"], true);
    let (_, json_out) = common::code_and_text(&["verify", "--json", "--golden", &common::s(&ids_only)]);
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert!(v["not_compared"].as_str().is_some_and(|n| n.starts_with("nothing verified")), "{v}");
    // A replay: the error without it and with it, tensor by tensor, as numbers.
    let port = common::s(&common::golden("flat").join("bf16-port.safetensors"));
    let (_, json_out) = common::code_and_text(&["verify", "--json", "--golden", &port, "--force-routing"]);
    let v: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    let explained = v["without_replay"]["explained"].as_array().unwrap();
    let logits = explained.iter().find(|e| e["name"] == "logits").unwrap();
    let (without, with) = (logits["nmse_without"].as_f64().unwrap(), logits["nmse_with"].as_f64().unwrap());
    assert!((logits["explained_share"].as_f64().unwrap() - (1.0 - with / without).max(0.0)).abs() < 1e-12);
    assert_eq!(v["replayed"], "expert choices");

    let r = common::s(&reference);
    let (json, _) = assert_ok(&glimpse(&["diff", &r, &r, "--json", "--tol", "logits=2e-2,0"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["tolerance"]["per_name"][0], serde_json::json!({"pattern": "logits", "atol": 2e-2, "rtol": 0.0}));
    assert_eq!(v["tolerance"]["atol"], 1e-4);
}

/// A reference whose layers are numbered from 1 (a port's off-by-one naming) fails `verify`
/// with that said, as `diff` says it of ours: its layer i was compared with our layer i.
#[test]
fn verify_names_a_reference_whose_layers_start_at_1() {
    let tmp = tempfile::tempdir().unwrap();
    let shifted = common::edit_dump(Path::new("golden/flat/reference.safetensors"), &tmp.path().join("s.st"), |t| {
        for (name, _, _) in t.iter_mut() {
            if let Some(rest) = name.strip_prefix("layers.") {
                let (i, tail) = rest.split_once('.').unwrap();
                *name = format!("layers.{}.{tail}", i.parse::<usize>().unwrap() + 1);
            }
        }
    });
    let (code, out) = common::code_and_text(&["verify", "--model", "golden/flat", "--golden", &s(&shifted)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("the reference numbers its layers from 1 (no `layers.0.*`; 12 of its layers' tensors not"),
        "{out}"
    );
    // A routing-only dump of an MTP run (no `mtp.*`, so its layer 3 is not produced; layer 0 is
    // dense, so no `layers.0.*`): its router logits match, the names line up.
    let args = ["--tokens-from", "golden/mtp/reference.safetensors", "--mtp", "--record", "*.moe.*"];
    let routing = common::run_dump("golden/mtp", &args, tmp.path(), "moe.st");
    let (code, out) = common::code_and_text(&["verify", "--model", "golden/mtp", "--golden", &routing]);
    assert!(code == 0 && !out.contains("numbers its layers"), "{out}");
    // Its own reference, and a window of it, say nothing of the kind.
    let (code, out) = common::code_and_text(&["verify", "--model", "golden/flat", "--layers", "2..3"]);
    assert!(code == 0 && !out.contains("numbers its layers"), "{out}");
}

/// A replayed DSA selection is checked as a replayed routing is: a row that keeps no causal key
/// (what no top-k does: padding alone, past the query or -1) is refused with its query, where it
/// ran as padding and left the query attending to nothing (NaN in every tensor after it). A
/// selection padded with -1, as serving engines pad, replays as the comparison reads it (it was
/// refused for its negative keys).
#[test]
fn a_replayed_selection_of_no_causal_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::golden("flat").join("reference.safetensors");
    let padded = common::edit_ints(&reference, &tmp.path().join("padded.st"), "layers.0.dsa.topk", |v, shape| {
        let (seq, k) = (shape[1], shape[2]);
        for (row, keys) in v.chunks_mut(k).enumerate() {
            keys.iter_mut().filter(|j| **j > (row % seq) as i64).for_each(|j| *j = -1);
        }
    });
    let (code, out) =
        common::code_and_text(&["verify", "--model", "golden/flat", "--golden", &s(&padded), "--force-selection"]);
    assert_eq!(code, 0, "{out}");
    for (name, bad, said) in [
        ("negative.st", vec![-1; 8], "keeps no causal key for query [0, 3]"),
        ("none.st", vec![1_000_000; 8], "keeps no causal key for query [0, 3]"),
    ] {
        let path = common::edit_ints(&reference, &tmp.path().join(name), "layers.0.dsa.topk", |v, shape| {
            let k = shape[2];
            v[3 * k..3 * k + bad.len()].copy_from_slice(&bad);
        });
        let args = ["verify", "--model", "golden/flat", "--golden", &s(&path), "--force-selection"];
        common::assert_error(&glimpse(&args), said);
    }
    // No key a query at all (K = 0: no row to find empty) is refused too, not run to NaN.
    let empty = common::edit_dump(&reference, &tmp.path().join("k0.st"), |t| {
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.0.dsa.topk").unwrap();
        *v = glimpse::dump::Values::I64(Vec::new());
        shape[2] = 0;
    });
    let args = ["verify", "--model", "golden/flat", "--golden", &s(&empty), "--force-selection"];
    common::assert_error(&glimpse(&args), "`layers.0.dsa.topk` is [1, 32, 0]: it keeps no key for any query");
    // And a replayed routing row that chooses an expert twice (rows are sets) is the reference's
    // problem, not a mismatch of ours.
    let twice =
        common::edit_ints(&reference, &tmp.path().join("twice.st"), "layers.2.moe.topk_ids", |v, _| v[1] = v[0]);
    let args = ["verify", "--model", "golden/flat", "--golden", &s(&twice), "--force-routing"];
    common::assert_error(
        &glimpse(&args),
        "layer 2: the replayed routing (the reference's `moe.topk_ids`) chooses expert",
    );
}

/// A reference tensor of NaN or zeros alone says nothing of bf16: no note calls it a bf16 run's
/// (all-NaN logits did).
#[test]
fn a_tensor_of_nan_or_zeros_is_no_bf16_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::golden("flat").join("reference.safetensors");
    for fill in [f32::NAN, 0.0] {
        let path = common::edit_floats(&reference, &tmp.path().join("x.st"), "logits", |v, _| v.fill(fill));
        let (code, out) = common::code_and_text(&["verify", "--model", "golden/flat", "--golden", &s(&path)]);
        assert_eq!(code, 1, "{out}");
        assert!(!out.contains("bf16 values only"), "{fill}: {out}");
    }
}

/// In a `--layers` window that leaves out layer 0, the names are the window's: a reference
/// whose window differs everywhere and holds a tensor the run does not make (router logits of a
/// dense layer) is not said to number its layers from 1 (no `layers.0.*` was all it took).
#[test]
fn a_window_past_layer_0_is_not_read_as_layers_numbered_from_1() {
    use glimpse::dump::Values;
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::golden("flat").join("reference.safetensors");
    let edited = common::edit_dump(&reference, &tmp.path().join("w.st"), |tensors| {
        for (name, values, _) in tensors.iter_mut() {
            if let (true, Values::F32(v)) = (name.starts_with("layers.") && !name.starts_with("layers.0."), values) {
                v.iter_mut().enumerate().for_each(|(i, x)| *x += 1.0 + (i % 7) as f32);
            }
        }
        // golden/flat's layers 0 and 1 are dense: no run makes layer 1's router logits.
        tensors.push(("layers.1.moe.router_logits".into(), Values::F32(vec![0.5; 32 * 16]), vec![32, 16]));
    });
    let args = ["verify", "--model", "golden/flat", "--golden", &s(&edited), "--layers", "1..4"];
    let (code, out) = common::code_and_text(&args);
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains("numbers its layers"), "{out}");
}

/// Another tool's extra tensor (the spec allows them) named like an index tensor is no hook
/// point: it does not make the reference refused for its dtype.
#[test]
fn an_extra_tensor_named_like_a_selection_is_not_refused() {
    use glimpse::dump::Values;
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::golden("flat").join("reference.safetensors");
    let extra = common::edit_dump(&reference, &tmp.path().join("x.st"), |tensors| {
        tensors.push(("my_tool.dsa.topk".into(), Values::F32(vec![1.0; 4]), vec![4]));
    });
    let (code, out) = common::code_and_text(&["verify", "--model", "golden/flat", "--golden", &s(&extra)]);
    assert_eq!(code, 0, "{out}");
}

/// `--isolate` on a reference that lacks a layer's input, the same on the CPU and the device
/// path: without `embeddings` layer 0 starts from ours (a table lookup, exact; the CPU refused
/// it), and without `layers.2.output` layer 3 cannot be isolated and is refused (the device path
/// ran it on its own state and called it isolated).
#[test]
fn isolating_layers_on_a_partial_reference_is_the_same_on_every_device() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::golden("flat").join("reference.safetensors");
    let without = |name: &str| {
        common::edit_dump(&reference, &tmp.path().join(format!("{name}.st")), |t| t.retain(|(n, _, _)| n != name))
    };
    let (no_embeddings, no_output) = (without("embeddings"), without("layers.2.output"));
    for device in ["cpu", "cpu-ops"] {
        let base = ["verify", "--model", "golden/flat", "--isolate", "--device", device, "--golden"];
        let (code, out) = common::code_and_text(&[&base[..], &[&s(&no_embeddings)]].concat());
        assert_eq!(code, 0, "{device}: {out}");
        common::assert_error(
            &glimpse(&[&base[..], &[&s(&no_output)]].concat()),
            "has no `layers.2.output` to start layer 3 from",
        );
    }
}
