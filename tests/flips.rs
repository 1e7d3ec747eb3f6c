//! Flips end to end: each routing or DSA flip listed with the margins and leads that decided it
//! on both sides, classed alike by `verify` and `diff`, and a reference's choice its own scores
//! contradict named as such.

use std::path::Path;

mod common;
use common::{glimpse, golden, text};

/// f32 products against the bf16-products reference of bf16-fused flip nine choices, among them
/// a DSA key of query 11 of layer 2: `verify` lists that flip with the margin that decided it on
/// each side (ours as the run reported it, the reference's from its own indexer scores) and
/// classes it by `--near-tie`.
#[test]
fn verify_lists_each_flip_with_its_margins_and_class() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/bf16-fused");
    let (model, golden) = (case.to_str().unwrap(), case.join("reference-bf16.safetensors"));
    // The reference's margin for that query, from its own recorded scores.
    let reference = common::dsa_margin_from_scores(&glimpse::dump::Dump::open(&golden).unwrap(), 2, 11);
    let reference = format!("ref {reference:.3e}");
    for (near_tie, summary, class) in [
        ("1e-3", "9 flips: 0 near-tie (both margins < 1e-3), 9 real", "-> real"),
        ("1e-2", "9 flips: 3 near-tie", "-> near-tie"),
    ] {
        let args = ["verify", "--model", model, "--golden", golden.to_str().unwrap(), "--near-tie", near_tie];
        let (code, out) = common::code_and_text(&args);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(summary), "{out}");
        let flip = out.lines().find(|l| l.contains("layers.2.dsa.topk [0, 11]")).unwrap_or_else(|| panic!("{out}"));
        assert!(
            flip.contains("margin ours ") && !flip.contains("ours unknown") && flip.contains(&reference),
            "{reference}: {flip}"
        );
        assert!(flip.ends_with(class), "{flip}");
    }
}

/// `verify` against a dump whose routing its own gate logits contradict (a port's rule bug,
/// here written into the reference): the flip says the reference left out an expert its own
/// scores rank higher, and the layer is marked; the untouched reference marks nothing.
#[test]
fn verify_says_when_the_references_own_scores_contradict_its_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let flat = golden("flat");
    let reference = flat.join("reference.safetensors");
    let edited = common::contradicted_routing(&reference, &flat, 3, &tmp.path().join("edited.st"));
    let verify = |golden: &Path, code: i32| {
        let o =
            glimpse(&["verify", "--model", flat.to_str().unwrap(), "--golden", golden.to_str().unwrap(), "--isolate"]);
        assert_eq!(o.status.code(), Some(code), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = verify(&edited, 1);
    assert!(out.contains("layers.3.moe.topk_ids [0]: ") && out.contains("(the reference left out "), "{out}");
    let marked: Vec<&str> = out.lines().filter(|l| l.contains("flips one rule cannot make")).collect();
    assert!(marked.len() == 1 && marked[0].trim_start().starts_with("3 "), "{out}");
    assert!(!verify(&reference, 0).contains("rule"));
}

/// The same for a DSA selection at a late query: the reference keeps, in place of its best key,
/// the causal key its own indexer scores rank lowest. `verify` reads that query's row of scores
/// alone (a layer's whole `[B, S, S]` is gigabytes at long context), so the row must be its own.
#[test]
fn verify_reads_a_late_querys_own_row_of_indexer_scores() {
    use glimpse::dump::Values;
    let tmp = tempfile::tempdir().unwrap();
    let flat = golden("flat");
    let reference = flat.join("reference.safetensors");
    let query = 29;
    let mut by = 0.0;
    let edited = common::edit_dump(&reference, &tmp.path().join("edited.st"), |t| {
        let scores = match &t.iter().find(|(n, _, _)| n == "layers.2.dsa.scores").unwrap().1 {
            Values::F32(v) => v[query * 32..(query + 1) * 32].to_vec(),
            _ => panic!("scores are floats"),
        };
        let (_, v, _) = t.iter_mut().find(|(n, _, _)| n == "layers.2.dsa.topk").unwrap();
        let Values::I64(ids) = v else { panic!("keys are integers") };
        let kept = &mut ids[query * 8..(query + 1) * 8];
        let worst =
            (0..=query).filter(|k| !kept.contains(&(*k as i64))).min_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let best = (0..8).max_by(|&a, &b| scores[kept[a] as usize].total_cmp(&scores[kept[b] as usize])).unwrap();
        by = scores[kept[best] as usize] - scores[worst.unwrap()];
        kept[best] = worst.unwrap() as i64;
    });
    let o = glimpse(&["verify", "--model", flat.to_str().unwrap(), "--golden", edited.to_str().unwrap(), "--isolate"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let flip =
        out.lines().find(|l| l.contains(&format!("layers.2.dsa.topk [0, {query}]"))).unwrap_or_else(|| panic!("{out}"));
    let own = format!("which its own scores rank {by:.3e} above");
    assert!(flip.contains("(the reference left out ") && flip.contains(&own), "{own}: {flip}");
}

/// `verify` of the bundled bf16 port and `diff` of glimpse's own dump against it class every
/// flip alike, each side by its row margin or its flipped keys' lead (verify took no lead of its
/// own side and read some real flips as near-ties); a dump without `dsa.scores` says what its
/// DSA flips lack.
#[test]
fn verify_and_diff_class_the_same_flips_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let classes = |json: &str| -> std::collections::BTreeMap<(String, u64), (String, bool)> {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let tensors = v["tensors"].as_array().unwrap();
        let flips = tensors.iter().flat_map(|t| {
            let name = t["name"].as_str().unwrap().to_string();
            t["flips"].as_array().cloned().unwrap_or_default().into_iter().map(move |f| (name.clone(), f))
        });
        let class = |f: &serde_json::Value| (f["class"].as_str().unwrap().to_string(), f["lead_ours"].is_number());
        flips.map(|(n, f)| ((n, f["row"].as_u64().unwrap()), class(&f))).collect()
    };
    // The bf16 port at a near-tie margin that leaves both classes; a bf16 reference of the case
    // whose layer 1 reuses layer 0's selection (its flips take layer 0's scores on both sides).
    for (case, golden, near) in [("flat", "bf16-port", "0.05"), ("grouped-shared-yarn", "reference-bf16", "1e-3")] {
        let (model, port) = (format!("golden/{case}"), format!("golden/{case}/{golden}.safetensors"));
        let near = ["--near-tie", near, "--json"];
        let o = glimpse(&[&["verify", "--model", &model, "--golden", &port][..], &near].concat());
        assert_eq!(o.status.code(), Some(1));
        let (verify, _) = text(&o);
        let tokens_from = format!("{model}/reference.safetensors");
        let args = ["--tokens-from", &tokens_from, "--record", "*,*.dsa.scores"];
        let ours = common::run_dump(&model, &args, tmp.path(), &format!("{case}.st"));
        let (diff, _) = text(&glimpse(&[&["diff", &ours, &port, "--model", &model][..], &near].concat()));
        let (v, d) = (classes(&verify), classes(&diff));
        assert!(v.values().any(|c| c.0 == "real"), "{case}: {v:?}");
        match case {
            "flat" => assert!(v.values().any(|c| c.0 == "near-tie"), "{v:?}"),
            // Layer 1 is shared: our side's lead is layer 0's scores' (it had none).
            _ => assert!(v[&("layers.1.dsa.topk".to_string(), 19)].1, "{v:?}"),
        }
        assert_eq!(v, d, "{case}");
    }
    let port = "golden/flat/bf16-port.safetensors";
    let plain = common::run_dump(
        "golden/flat",
        &["--tokens-from", "golden/flat/reference.safetensors"],
        tmp.path(),
        "plain.st",
    );
    let (out, _) = text(&glimpse(&["diff", &plain, port, "--model", "golden/flat", "--near-tie", "0.05"]));
    assert!(out.contains("(ours records no dsa.scores: its side of each DSA flip is its row margin alone"), "{out}");
}
