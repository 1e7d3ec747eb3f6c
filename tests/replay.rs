//! Counterfactual replay: a model whose router bias (or DSA indexer) was tampered with makes
//! different choices than the reference; replaying the reference's choices must remove exactly the
//! difference those choices caused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use glimpse::checkpoint::Checkpoint;
use glimpse::compare::Tolerance;
use glimpse::dump::Dump;
use glimpse::model::Model;
use glimpse::model::Weights;
use glimpse::st::{self, Entry, StFile};
use glimpse::verify::{attribution, verify, verify_with, Replay, VerifyOptions};

fn golden_flat() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat")
}

/// A copy of golden/flat with `edit` applied to one tensor.
fn tampered(dst: &Path, name: &str, edit: impl Fn(&mut Vec<f32>)) {
    let src = golden_flat();
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let file = StFile::open(&src.join("model.safetensors")).unwrap();
    let entries: Vec<(String, Entry)> = file
        .names()
        .map(|n| {
            let (mut data, shape) = file.f32(n).unwrap();
            if n == name {
                edit(&mut data);
            }
            (n.to_string(), Entry::f32(shape, &data))
        })
        .collect();
    st::write(&dst.join("model.safetensors"), &entries, &BTreeMap::new()).unwrap();
}

#[test]
fn replaying_the_reference_routing_removes_a_bias_bug() {
    let tmp = tempfile::tempdir().unwrap();
    // A port that mangled layer 3's correction bias: selection changes, weights (unbiased) do not.
    tampered(tmp.path(), "model.layers.3.mlp.gate.e_score_correction_bias", |b| {
        b.iter_mut().enumerate().for_each(|(i, x)| *x += if i % 2 == 0 { 0.3 } else { -0.3 })
    });
    let model = Model::load(&Checkpoint::open(tmp.path()).unwrap()).unwrap();
    let golden = Dump::open(&golden_flat().join("reference.safetensors")).unwrap();
    let tol = Tolerance::default();

    let free = verify(&model, &golden, tol, false).unwrap();
    let first = free.results.iter().find(|c| !c.ok).unwrap();
    assert_eq!(first.name, "layers.3.moe.topk_ids", "the flips are the first divergence");

    let replay = Replay { routing: true, selection: false };
    let replayed =
        verify_with(Weights::Resident(&model), &golden, &VerifyOptions { tol, replay, ..Default::default() }).unwrap();
    let bad: Vec<&str> = replayed.results.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect();
    assert!(bad.is_empty(), "after replay only arithmetic is left, but {bad:?} differ");

    let lines = attribution(&free, &replayed);
    let logits = lines.iter().find(|l| l.starts_with("logits")).unwrap();
    assert!(logits.contains("explained by flips: 100.0%"), "{logits}");
}

#[test]
fn replaying_the_reference_selection_removes_an_indexer_bug() {
    let tmp = tempfile::tempdir().unwrap();
    // A port whose indexer key projection is wrong in layer 1: different keys are kept.
    tampered(tmp.path(), "model.layers.1.self_attn.indexer.wk.weight", |w| w.iter_mut().for_each(|x| *x = -*x * 1.7));
    let model = Model::load(&Checkpoint::open(tmp.path()).unwrap()).unwrap();
    let golden = Dump::open(&golden_flat().join("reference.safetensors")).unwrap();
    let tol = Tolerance::default();

    let free = verify(&model, &golden, tol, false).unwrap();
    let topk = free.results.iter().find(|c| c.name == "layers.1.dsa.topk").unwrap();
    assert!(!topk.ok, "the tampered indexer must change the selection");

    let replay = Replay { routing: false, selection: true };
    let replayed =
        verify_with(Weights::Resident(&model), &golden, &VerifyOptions { tol, replay, ..Default::default() }).unwrap();
    // The indexer's own scores still differ; everything downstream of the selection matches.
    for c in &replayed.results {
        let indexer_only = c.name == "layers.1.dsa.scores";
        assert!(c.ok || indexer_only, "{} differs after replay", c.name);
    }
}
