//! Dumps another engine writes within the spec (`../shared/spec/dump-format.md`): extra tensors
//! of its own dtypes, F64 scores masked with torch's `finfo.min`, a partial recording, routing
//! weights without the expert ids that align them, an upper-case `config_sha256`. Each is read
//! as the spec allows; what it could not check is said.

mod common;
use common::{code_and_text, edit_dump, golden, s};

use std::path::{Path, PathBuf};

use glimpse::dump::{Dump, Values};
use glimpse::st::{self, Entry};

fn reference() -> PathBuf {
    golden("flat").join("reference.safetensors")
}

/// The dump `src`'s tensors as `map` turns them into entries (None: left out), plus `extra`,
/// with `meta` edited, written to `dst`.
fn rewrite(
    src: &Path,
    dst: &Path,
    map: impl Fn(&str, Values, Vec<usize>) -> Option<Entry>,
    extra: Vec<(String, Entry)>,
    meta: impl Fn(&mut std::collections::BTreeMap<String, String>),
) -> PathBuf {
    let d = Dump::open(src).unwrap();
    let mut entries: Vec<(String, Entry)> = d
        .names()
        .into_iter()
        .filter_map(|n| {
            let (v, shape) = d.values(&n).unwrap();
            map(&n, v, shape).map(|e| (n, e))
        })
        .collect();
    entries.extend(extra);
    let mut m = d.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    meta(&mut m);
    st::write(dst, &entries, &m).unwrap();
    dst.to_path_buf()
}

fn as_is(_: &str, v: Values, shape: Vec<usize>) -> Option<Entry> {
    Some(match v {
        Values::F32(x) => Entry::f32(shape, &x),
        Values::I64(x) => Entry::i64(shape, &x),
    })
}

/// A tool's extra tensor of a dtype no hook point takes (a bool mask) is listed and left unread;
/// the comparison goes on. Under a spec name it stays an error (`tests/reliability.rs`).
#[test]
fn an_extra_tensor_of_another_dtype_is_listed_not_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mask = Entry { dtype: safetensors::Dtype::BOOL, shape: vec![1, 32], data: vec![1; 32] };
    let extra = vec![("engine.mask".into(), mask)];
    let ours = rewrite(&reference(), &tmp.path().join("ours.st"), as_is, extra, |_| {});
    let (code, out) = code_and_text(&["diff", &s(&ours), &s(&reference())]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("engine.mask (BOOL, not a dtype of the spec's hook points)"), "{out}");
    let (code, out) = code_and_text(&["diff", &s(&ours), &s(&reference()), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!((code, &v["unread_in_a"][0]["dtype"]), (0, &serde_json::json!("BOOL")), "{out}");
    // As the reference: verify lists it, audit and the comparison pass over it.
    let (code, out) = code_and_text(&["verify", "--model", &s(&golden("flat")), "--golden", &s(&ours)]);
    assert!(code == 0 && out.contains("engine.mask") && out.contains("only in the reference"), "{out}");
    assert_eq!(code_and_text(&["audit", "--dump", &s(&ours)]).0, 0);
}

/// "A comparer compares the names both files have": a tool's bool mask both dumps hold, in one
/// dtype and shape, is compared exactly, apart from the hook points (it was only listed as not
/// read, so two masks that differ matched); in another shape it is not compared.
#[test]
fn an_extra_tensor_both_dumps_hold_alike_is_compared_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let mask = |data: Vec<u8>| Entry { dtype: safetensors::Dtype::BOOL, shape: vec![1, data.len()], data };
    let with = |name: &str, data: Vec<u8>| {
        rewrite(&reference(), &tmp.path().join(name), as_is, vec![("engine.mask".into(), mask(data))], |_| {})
    };
    let (a, b) = (with("a.st", vec![1; 32]), with("b.st", vec![1; 32]));
    let (code, out) = code_and_text(&["diff", &s(&a), &s(&b)]);
    assert_eq!(code, 0, "{out}");
    let mut flipped = vec![1; 32];
    flipped[5] = 0;
    let c = with("c.st", flipped);
    let (code, out) = code_and_text(&["diff", &s(&c), &s(&b)]);
    let said = "not read, compared exactly: engine.mask DIFFERS in 1 of 32 elements, the first at flat index 5";
    assert!(
        code == 1 && out.contains(said) && out.contains("not passed: 1 tensor(s) not read as values differ"),
        "{out}"
    );
    let (code, out) = code_and_text(&["diff", &s(&c), &s(&b), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    let want = serde_json::json!([
        {"name": "engine.mask", "elements": 32, "differing": 1, "first_differing": 5, "atol": null, "rtol": null}
    ]);
    assert!(code == 1 && v["unread_compared"] == want && v["match"] == false, "{out}");
    // Not a hook point: the first divergence is none of the tensors read as values.
    assert!(v["first_divergence"].is_null(), "{out}");
    let shorter = with("d.st", vec![1; 31]);
    let (code, out) = code_and_text(&["diff", &s(&shorter), &s(&b)]);
    assert!(code == 0 && out.contains("engine.mask (BOOL") && !out.contains("compared exactly"), "{out}");
}

/// glimpse's extra names are not the spec's: another tool's tensor under one of them, in a dtype
/// or rank glimpse never writes it in (its own `moe.margin` of [B, S], a bool flag, integer
/// norms), is listed and left unread, not refused, compared as glimpse's, or taken for its
/// margins.
#[test]
fn another_tools_tensor_under_one_of_glimpses_names_is_not_read_as_glimpses() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = |dtype, shape: Vec<usize>, size| {
        let n: usize = shape.iter().product();
        Entry { dtype, shape, data: vec![0; n * size] }
    };
    use safetensors::Dtype::{BOOL, F32, I32, I64};
    let extra: Vec<(String, Entry)> = vec![
        ("layers.2.moe.bias_changed".into(), bytes(BOOL, vec![32], 1)),
        ("layers.3.moe.bias_changed".into(), bytes(F32, vec![32], 4)),
        ("layers.2.moe.margin".into(), Entry::f32(vec![1, 32], &[0.3; 32])),
        ("layers.0.attn.kv_norm".into(), bytes(I32, vec![1, 32], 4)),
        ("layers.0.dsa.scores".into(), bytes(I64, vec![1, 32, 32], 8)),
        ("layers.0.dsa.margin".into(), Entry::f32(vec![32], &[0.3; 32])),
        ("mtp.logits".into(), Entry::f32(vec![1, 31], &[0.0; 31])),
    ];
    let names: Vec<String> = extra.iter().map(|(n, _)| n.clone()).collect();
    // (In place of the reference's own, where it has them: its `dsa.scores`.)
    let others = |n: &str, v, shape| (!names.iter().any(|x| x == n)).then(|| as_is(n, v, shape)).flatten();
    let ours = rewrite(&reference(), &tmp.path().join("ours.st"), others, extra, |_| {});
    let d = Dump::open(&ours).unwrap();
    for n in &names {
        assert!(!d.contains(n) && !d.names().contains(n), "{n} is read");
    }
    let (code, out) = code_and_text(&["diff", &s(&ours), &s(&reference())]);
    assert_eq!(code, 0, "{out}");
    for n in &names {
        let line = out.lines().find(|l| l.starts_with("not read in") && l.contains(&format!(": {n} ")));
        assert!(line.is_some_and(|l| l.contains("another tool's tensor under its name")), "{n} in\n{out}");
    }
    let (code, out) = code_and_text(&["diff", &s(&ours), &s(&reference()), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!((code, v["unread_in_a"].as_array().map(Vec::len)), (0, Some(names.len())), "{out}");
    // As the reference, and as what the TUI and the audit read.
    let (code, out) = code_and_text(&["verify", "--model", &s(&golden("flat")), "--golden", &s(&ours)]);
    assert!(code == 0 && out.contains("layers.2.moe.margin") && out.contains("not read"), "{out}");
    assert_eq!(code_and_text(&["audit", "--dump", &s(&ours)]).0, 0);
    // Both holding such a float tensor alike, it is compared at its tolerance (two that differed
    // everywhere matched: "no divergence", exit 0).
    let margin = |name: &str, at: f32| {
        let extra = vec![("layers.2.moe.margin".to_string(), Entry::f32(vec![1, 32], &[at; 32]))];
        rewrite(&reference(), &tmp.path().join(name), as_is, extra, |_| {})
    };
    let (a, b, c) = (margin("a.st", 0.3), margin("b.st", 0.3), margin("c.st", 0.5));
    let (code, out) = code_and_text(&["diff", &s(&a), &s(&b)]);
    assert!(
        code == 0 && out.contains("not read, compared at atol 1e-4, rtol 1e-4: layers.2.moe.margin matches"),
        "{out}"
    );
    let (code, out) = code_and_text(&["diff", &s(&c), &s(&b)]);
    let said = "not read, compared at atol 1e-4, rtol 1e-4: layers.2.moe.margin DIFFERS in 32 of 32 elements";
    assert!(code == 1 && out.contains(said), "{out}");
    let (code, _) = code_and_text(&["diff", &s(&c), &s(&b), "--tol", "layers.2.moe.margin=1,0"]);
    assert_eq!(code, 0, "its --tol pattern applies");
}

/// A dump stored in F16 (the spec lets a producer store its floats in lower precision) compared
/// at the default rtol gets a note that f16's rounding alone exceeds it, computed here from the
/// format (half of 2^-10); at an rtol past it, or for the f32 reference, none.
#[test]
fn a_dump_of_f16_values_gets_a_note_on_f16_rounding() {
    let tmp = tempfile::tempdir().unwrap();
    let to_f16 = |_: &str, v: Values, shape: Vec<usize>| {
        Some(match v {
            Values::F32(x) => Entry {
                dtype: safetensors::Dtype::F16,
                shape,
                data: x.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            },
            Values::I64(x) => Entry::i64(shape, &x),
        })
    };
    let ours = rewrite(&reference(), &tmp.path().join("f16.st"), to_f16, vec![], |_| {});
    let rounding = 0.5 * 2f64.powi(-10);
    let (code, out) = code_and_text(&["diff", &s(&ours), &s(&reference())]);
    assert_eq!(code, 1, "f16 rounding is past the default tolerance:\n{out}");
    let note = format!("note: ours holds f16 values only (every float is an f16): rounding to f16 alone moves a value by up to {rounding:.1e} of it, more than --rtol 1e-4 allows");
    assert!(out.contains(&note), "{note}\nin\n{out}");
    assert!(!out.contains("the reference holds f16"), "{out}");
    let (_, out) = code_and_text(&["diff", &s(&ours), &s(&reference()), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(v["f16_only"], serde_json::json!({"a": true, "b": false}), "{out}");
    let (_, out) = code_and_text(&["diff", &s(&ours), &s(&reference()), "--rtol", "1e-3"]);
    assert!(!out.contains("f16 values only"), "{out}");
    // As a reference, verify says it of the first float tensor outside the tolerance.
    let (code, out) = code_and_text(&["verify", "--model", &s(&golden("flat")), "--golden", &s(&ours)]);
    assert!(code == 1 && out.contains("holds f16 values only: rounding to f16 alone"), "{out}");
    // It says how to have the first mismatch read, in commands that run as written.
    let hint = out
        .lines()
        .find_map(|l| l.strip_prefix("(a reading of the first mismatch: "))
        .unwrap_or_else(|| panic!("{out}"));
    let ours = s(&tmp.path().join("ours.safetensors"));
    for command in hint.trim_end_matches(')').split(", then ") {
        let args: Vec<String> =
            command.replace("GLIMPSE.safetensors", &ours).split(' ').skip(1).map(String::from).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out) = code_and_text(&args);
        assert!(code == 0 || (code == 1 && args[0] == "diff"), "{command}: {out}");
    }
}

/// Zero-width hidden states (a header's word alone) in the MTP head's tensors: compared and read
/// without a panic (reading the head's input divided by the width).
#[test]
fn zero_width_mtp_tensors_are_no_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let meta: std::collections::BTreeMap<String, String> =
        [("format".to_string(), "glm5-dump/1".to_string()), ("source".to_string(), "test".to_string())].into();
    let write = |name: &str, input: usize| {
        let path = tmp.path().join(name);
        let entries = vec![
            ("input_ids".to_string(), Entry::i64(vec![1, 4], &[1, 2, 3, 4])),
            ("final_norm".to_string(), Entry::f32(vec![1, 4, 0], &[])),
            ("mtp.input_hidden".to_string(), Entry::f32(vec![1, input, 0], &[])),
        ];
        st::write(&path, &entries, &meta).unwrap();
        path
    };
    let (ours, theirs) = (write("ours.st", 3), write("ref.st", 2));
    let (code, out) = code_and_text(&["diff", &s(&ours), &s(&theirs)]);
    assert!((code == 1 || code == 2) && !out.contains("panicked"), "{code}: {out}");
}

/// Routing weights of dumps that do not both hold the expert ids are compared row by row as
/// sorted values: a correct port that lists a token's experts in another order matches (slot by
/// slot it read "68/128 outside tol"), and a wrong weight still does not.
#[test]
fn weights_without_ids_are_compared_sorted_by_row() {
    let tmp = tempfile::tempdir().unwrap();
    let no_ids = |src: &Path, dst: &str| {
        let keep = |n: &str, v, shape| (!n.ends_with(".moe.topk_ids")).then(|| as_is(n, v, shape)).flatten();
        rewrite(src, &tmp.path().join(dst), keep, vec![], |_| {})
    };
    let reference = no_ids(&reference(), "reference.st");
    // Each token's experts in reverse order, ids and weights alike (a correct port's other order).
    let reversed = edit_dump(&self::reference(), &tmp.path().join("reversed-ids.st"), |t| {
        for (n, v, shape) in t.iter_mut() {
            let k = shape[1];
            match v {
                Values::F32(x) if n.ends_with(".moe.topk_weights") => x.chunks_mut(k).for_each(<[f32]>::reverse),
                Values::I64(x) if n.ends_with(".moe.topk_ids") => x.chunks_mut(k).for_each(<[i64]>::reverse),
                _ => {}
            }
        }
    });
    let ours = no_ids(&reversed, "ours.st");
    let (code, out) = code_and_text(&["diff", &s(&ours), &s(&reference)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(each row's weights sorted, largest first: the two do not both hold moe.topk_ids"), "{out}");
    // verify of the run against it says the same.
    let (code, out) = code_and_text(&["verify", "--model", &s(&golden("flat")), "--golden", &s(&reference)]);
    assert!(code == 0 && out.contains("layers.3.moe.topk_weights") && out.contains("each row's weights sorted"));
    // One weight off by 0.1 is still a difference.
    let wrong = edit_dump(&ours, &tmp.path().join("wrong.st"), |t| {
        let (_, v, _) = t.iter_mut().find(|(n, _, _)| n == "layers.3.moe.topk_weights").unwrap();
        let Values::F32(x) = v else { panic!("weights are floats") };
        x[5] += 0.1;
    });
    let (code, out) = code_and_text(&["diff", &s(&wrong), &s(&reference)]);
    assert!(code == 1 && out.contains("layers.3.moe.topk_weights          MISMATCH"), "{out}");
}

/// A reference that holds part of the run: `verify` passes on what it holds and says how much it
/// did not check; `--force-routing` without expert ids to replay is refused, not claimed.
#[test]
fn a_partial_reference_says_what_it_did_not_check() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = |n: &str, v, shape| {
        let kept = n == "input_ids" || n == "logits" || n.ends_with(".output");
        kept.then(|| as_is(n, v, shape)).flatten()
    };
    let partial = rewrite(&reference(), &tmp.path().join("partial.st"), keep, vec![], |_| {});
    let flat = s(&golden("flat"));
    let (code, out) = code_and_text(&["verify", "--model", &flat, "--golden", &s(&partial)]);
    // 53 spec-named tensors in the whole reference (58 with its 5 `dsa.scores`, which are no spec
    // name); 7 kept.
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("not checked: the reference lacks 46 of the spec hook points this run produces"), "{out}");
    let (_, json) = code_and_text(&["verify", "--model", &flat, "--golden", &s(&partial), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["unchecked"].as_array().map(Vec::len), Some(46));
    // The whole reference leaves nothing unchecked.
    let (_, json) = code_and_text(&["verify", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["unchecked"].as_array().map(Vec::len), Some(0));
    // A window reaching the last layer runs the head: its final norm is unchecked; the
    // embeddings, before the window, are not.
    let (_, json) =
        code_and_text(&["verify", "--model", &flat, "--golden", &s(&partial), "--layers", "3..4", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let unchecked: Vec<&str> = v["unchecked"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(unchecked.contains(&"final_norm") && !unchecked.contains(&"embeddings"), "{unchecked:?}");
    assert!(unchecked.iter().all(|n| !n.starts_with("layers.2.")), "{unchecked:?}");
    let (code, out) = code_and_text(&["verify", "--model", &flat, "--golden", &s(&partial), "--force-routing"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--force-routing: ") && out.contains("holds no `layers.*.moe.topk_ids` to replay"), "{out}");
    // Nor where the window holds none (golden/flat's first two layers are dense).
    let (code, out) = code_and_text(&["verify", "--force-routing", "--layers", "0..1"]);
    assert!(code == 2 && out.contains("holds no `layers.*.moe.topk_ids` in layers 0..1 to replay"), "{out}");
}

/// Indexer scores in F64 masked with float64's `finfo.min` read as `-inf`, as f32's do (it read
/// "beyond f32's range"); a `config_sha256` in upper-case hex is the same hash.
#[test]
fn f64_masks_and_upper_case_hashes_are_read_as_the_spec_means() {
    let tmp = tempfile::tempdir().unwrap();
    let f64_scores = |n: &str, v: Values, shape: Vec<usize>| match v {
        Values::F32(x) if n.ends_with(".dsa.scores") => {
            let wide = x.iter().map(|&v| if v == f32::NEG_INFINITY { f64::MIN } else { v as f64 });
            Some(Entry { dtype: safetensors::Dtype::F64, shape, data: wide.flat_map(f64::to_le_bytes).collect() })
        }
        v => as_is(n, v, shape),
    };
    let upper = |m: &mut std::collections::BTreeMap<String, String>| {
        let sha = m.get_mut("config_sha256").unwrap();
        *sha = sha.to_uppercase();
    };
    let ours = rewrite(&reference(), &tmp.path().join("f64.st"), f64_scores, vec![], upper);
    let (code, out) = code_and_text(&["diff", &s(&ours), &s(&reference())]);
    assert!(code == 0 && out.contains("layers.2.dsa.scores"), "{out}");
    assert!(!out.contains("warning"), "{out}");
    let (code, out) = code_and_text(&["verify", "--model", &s(&golden("flat")), "--golden", &s(&ours)]);
    assert!(code == 0 && !out.contains("warning"), "{out}");
}

/// The spec lets a producer store its floats in a lower precision: F8_E5M2 as well as E4M3 (its
/// values are the unit test's, `st::tests`). A tensor name holding a control character (a newline
/// and an escape sequence would forge a line of the report and recolour the terminal) is refused,
/// named.
#[test]
fn an_e5m2_dump_is_read_and_a_name_with_a_control_character_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let to_e5m2 = |x: f32| (half::f16::from_f32(x).to_bits() >> 8) as u8;
    let logits_e5m2 = |n: &str, v: Values, shape: Vec<usize>| match (n, v) {
        ("logits", Values::F32(x)) => {
            Some(Entry { dtype: safetensors::Dtype::F8_E5M2, shape, data: x.into_iter().map(to_e5m2).collect() })
        }
        (n, v) => as_is(n, v, shape),
    };
    let e5m2 = rewrite(&reference(), &tmp.path().join("e5m2.st"), logits_e5m2, Vec::new(), |_| {});
    let (values, shape) = Dump::open(&e5m2).unwrap().values("logits").unwrap();
    assert!(matches!(values, Values::F32(v) if v.len() == shape.iter().product::<usize>()));
    let (code, out) = code_and_text(&["diff", &s(&e5m2), &s(&reference())]);
    assert!(code == 1 && out.contains("logits ") && !out.contains("error"), "{out}");
    let forged = vec![("x\nlogits ok\u{1b}[31m".to_string(), Entry::f32(vec![1], &[0.0]))];
    let forged = rewrite(&reference(), &tmp.path().join("forged.st"), as_is, forged, |_| {});
    common::assert_error(&common::glimpse(&["diff", &s(&forged), &s(&reference())]), "holds a control character");
}
