//! Counterfactual replay: a model whose router bias (or DSA indexer) was tampered with makes
//! different choices than the reference; replaying the reference's choices must remove exactly the
//! difference those choices caused. And the margins `verify` gives those flips: ours as the run
//! reported them, the reference's recomputed from its scores and logits where that reproduces its
//! recorded choice.

mod common;
use common::edit_dump;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use glimpse::checkpoint::Checkpoint;
use glimpse::compare::Tolerance;
use glimpse::compare::{flips, Comparison, Flip};
use glimpse::diff::{diff, DiffOptions};
use glimpse::dump::Dump;
use glimpse::dump::DumpWriter;
use glimpse::flips::Class;
use glimpse::hooks::{HookPoint, LayerHook, Recorder, Selector};
use glimpse::model::moe::Routers;
use glimpse::model::Model;
use glimpse::model::Weights;
use glimpse::st::{self, Entry, StFile};
use glimpse::verify::{attribution, verify, verify_with, Replay, VerifyOptions};

fn golden_flat() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat")
}

/// A copy of golden/flat with `edit` applied to one tensor.
fn tampered(dst: &Path, name: &str, edit: impl Fn(&mut Vec<f32>)) {
    tampered_case(&golden_flat(), dst, name, edit)
}

/// A copy of the golden case `src` with `edit` applied to one tensor.
fn tampered_case(src: &Path, dst: &Path, name: &str, edit: impl Fn(&mut Vec<f32>)) {
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

/// The flips a comparison (`verify`'s or `diff`'s results) found in the selection `name`.
fn flips_of<'a>(results: &'a [Comparison], name: &str) -> Vec<&'a Flip> {
    flips(results).into_iter().filter(|(n, _)| *n == name).map(|(_, f)| f).collect()
}

/// golden/flat with layer 3's correction bias mangled (a port's bias bug): its selection changes,
/// its weights (unbiased) do not.
fn with_a_bias_bug(dir: &Path) -> Model {
    tampered(dir, "model.layers.3.mlp.gate.e_score_correction_bias", |b| {
        b.iter_mut().enumerate().for_each(|(i, x)| *x += if i % 2 == 0 { 0.3 } else { -0.3 })
    });
    Model::load(&Checkpoint::open(dir).unwrap()).unwrap()
}

/// `model`'s run of the reference's tokens, the hook points `patterns` select written to a dump
/// in `dir`, as a port's dump would be.
fn dump_of(model: &Model, golden: &Dump, patterns: &str, dir: &Path) -> Dump {
    let path = dir.join("ours.safetensors");
    let mut w = DumpWriter::create(&path, Selector::new(patterns, None), 32).unwrap();
    model.forward(&golden.tokens().unwrap(), &mut w).unwrap();
    w.finish(&glimpse::dump::metadata("a port", None, None)).unwrap();
    Dump::open(&path).unwrap()
}

#[test]
fn replaying_the_reference_routing_removes_a_bias_bug() {
    let tmp = tempfile::tempdir().unwrap();
    let model = with_a_bias_bug(tmp.path());
    let golden = Dump::open(&golden_flat().join("reference.safetensors")).unwrap();
    let tol = Tolerance::default();

    let free = verify(&model, &golden, tol, false).unwrap();
    let first = free.results.iter().find(|c| !c.ok).unwrap();
    assert_eq!(first.name, "layers.3.moe.topk_ids", "the flips are the first divergence");
    // The reference's margins would be recomputed with this checkpoint's (mangled) bias, which
    // does not make the reference's choices: unknown, rather than a margin of another decision.
    let flips = flips_of(&free.results, "layers.3.moe.topk_ids");
    assert!(!flips.is_empty());
    for f in flips {
        assert!(f.margin_ours.is_some_and(|m| m >= 0.0) && f.margin_reference.is_none(), "{f:?}");
    }

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
    // Each flip carries our margin as the run reports it and the reference's from its scores;
    // the routing flips downstream carry the reference's from its logits and the (intact) bias.
    let mut recorder = Recorder::new(Selector::new("layers.1.dsa.margin", None));
    model.forward(&golden.tokens().unwrap(), &mut recorder).unwrap();
    let ours = recorder.get(HookPoint::Layer(1, LayerHook::DsaMargin)).unwrap().flatten_all().unwrap();
    let ours = ours.to_vec1::<f32>().unwrap();
    let flips = flips_of(&free.results, "layers.1.dsa.topk");
    assert!(!flips.is_empty());
    for f in &flips {
        let reference = common::dsa_margin_from_scores(&golden, 1, f.row);
        assert_eq!((f.margin_ours, f.margin_reference), (Some(ours[f.row]), Some(reference)), "{f:?}");
    }
    let routing: Vec<&Flip> =
        (2..5).flat_map(|i| flips_of(&free.results, &format!("layers.{i}.moe.topk_ids"))).collect();
    assert!(!routing.is_empty(), "a different selection in layer 1 changes the routing downstream");
    assert!(routing.iter().all(|f| f.margin_ours.is_some() && f.margin_reference.is_some()), "{routing:?}");
    assert!(flips.into_iter().chain(routing).any(|f| Class::of(f, 1e-3) == Class::Real));

    let replay = Replay { routing: false, selection: true };
    let replayed =
        verify_with(Weights::Resident(&model), &golden, &VerifyOptions { tol, replay, ..Default::default() }).unwrap();
    // The indexer's own scores still differ; everything downstream of the selection matches.
    for c in &replayed.results {
        let indexer_only = c.name == "layers.1.dsa.scores";
        assert!(c.ok || indexer_only, "{} differs after replay", c.name);
    }
}

/// `diff --model`: a port's dump that records gate logits but no `moe.margin` (as a transformers
/// dump does) gets its routing margins recomputed with the checkpoint's routers, where that makes
/// the recorded choice. Here "ours" ran a mangled bias, so only the reference's choices are
/// reproduced by the true checkpoint; without `--model` neither side's margin is known.
#[test]
fn diff_recomputes_routing_margins_from_the_recorded_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let model = with_a_bias_bug(tmp.path());
    let golden = Dump::open(&golden_flat().join("reference.safetensors")).unwrap();
    let ours = dump_of(&model, &golden, "layers.*.moe.router_logits,layers.*.moe.topk_ids", tmp.path());
    assert!(!ours.contains("layers.3.moe.margin"));

    let name = "layers.3.moe.topk_ids";
    let without = diff(&ours, &golden, &DiffOptions::default()).unwrap();
    let flips = flips_of(&without.results, name);
    assert!(!flips.is_empty());
    assert!(flips.iter().all(|f| f.margin_ours.is_none() && f.margin_reference.is_none()), "{flips:?}");

    let routers = Routers::read(&Checkpoint::open(&golden_flat()).unwrap()).unwrap();
    let with = diff(&ours, &golden, &DiffOptions { routers: Some(routers), ..Default::default() }).unwrap();
    let flips = flips_of(&with.results, name);
    assert!(!flips.is_empty());
    assert!(flips.iter().all(|f| f.margin_ours.is_none() && f.margin_reference.is_some_and(|m| m > 0.0)), "{flips:?}");
}

/// A shared-indexer layer reuses the keys the full layer before it chose, so its flips are that
/// layer's: `verify`, and `diff` given the model's config, give them that layer's margins, ours
/// and the reference's.
#[test]
fn a_shared_indexer_layers_flips_take_the_margins_of_the_layer_it_reuses() {
    let tmp = tempfile::tempdir().unwrap();
    let case = golden_flat().with_file_name("grouped-shared-yarn"); // layers 1 and 3 share
    tampered_case(&case, tmp.path(), "model.layers.0.self_attn.indexer.wk.weight", |w| {
        w.iter_mut().for_each(|x| *x = -*x * 1.7)
    });
    let model = Model::load(&Checkpoint::open(tmp.path()).unwrap()).unwrap();
    let golden = Dump::open(&case.join("reference.safetensors")).unwrap();
    let r = verify(&model, &golden, Tolerance::default(), false).unwrap();
    let (full, shared) = (flips_of(&r.results, "layers.0.dsa.topk"), flips_of(&r.results, "layers.1.dsa.topk"));
    assert_same_margins(&full, &shared);

    // `diff --model` does the same from the model's config, for the run's dump against the reference.
    let ours = dump_of(&model, &golden, "layers.*.dsa.*", tmp.path());
    let opts = DiffOptions { config: Some(model.config.clone()), ..Default::default() };
    let d = diff(&ours, &golden, &opts).unwrap();
    assert_same_margins(&flips_of(&d.results, "layers.0.dsa.topk"), &flips_of(&d.results, "layers.1.dsa.topk"));
}

/// Every flip of `shared` is a flip of `full` (same row), with its margins, both known.
fn assert_same_margins(full: &[&Flip], shared: &[&Flip]) {
    assert!(!shared.is_empty(), "the shared layer inherits its full layer's flips");
    for f in shared {
        let g = full.iter().find(|g| g.row == f.row).unwrap_or_else(|| panic!("{f:?} is not layer 0's"));
        assert!(f.margin_ours.is_some() && f.margin_reference.is_some(), "{f:?}");
        assert_eq!((f.margin_ours, f.margin_reference), (g.margin_ours, g.margin_reference));
    }
}

/// A dump whose shared-indexer layer parted from the layer it reuses (a port bug of its own, here
/// one key of query 39 swapped in the reference's layer 1): the full layer's margins do not
/// describe that row, so its flip gets no margin on that side, while the other side keeps its own.
#[test]
fn a_shared_layer_that_parted_from_its_source_has_no_borrowed_margin() {
    let tmp = tempfile::tempdir().unwrap();
    let case = golden_flat().with_file_name("grouped-shared-yarn"); // layers 1 and 3 share
    let reference = case.join("reference.safetensors");
    let file = StFile::open(&reference).unwrap();
    let entries: Vec<(String, Entry)> = file
        .names()
        .map(|n| {
            let entry = match file.info(n).unwrap().dtype {
                safetensors::Dtype::I64 => {
                    let (mut ids, shape) = file.i64(n).unwrap();
                    if n == "layers.1.dsa.topk" {
                        // Row [0, 39] keeps 12 of its 40 causal keys: swap one for one it left.
                        let row = &mut ids[39 * 12..40 * 12];
                        let left = (0..40).find(|j| !row.contains(j)).unwrap();
                        row[0] = left;
                    }
                    Entry::i64(shape, &ids)
                }
                _ => {
                    let (v, shape) = file.f32(n).unwrap();
                    Entry::f32(shape, &v)
                }
            };
            (n.to_string(), entry)
        })
        .collect();
    let ours = tmp.path().join("ours.safetensors");
    let meta: BTreeMap<String, String> = file.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    st::write(&ours, &entries, &meta).unwrap();
    let config = Checkpoint::open(&case).unwrap().config;
    let opts = DiffOptions { config: Some(config), ..Default::default() };
    let d = diff(&Dump::open(&ours).unwrap(), &Dump::open(&reference).unwrap(), &opts).unwrap();
    let flips = flips_of(&d.results, "layers.1.dsa.topk");
    assert_eq!(flips.len(), 1, "{flips:?}");
    assert_eq!(flips[0].at, [0, 39]);
    assert!(flips[0].margin_ours.is_none(), "layer 0's margin does not describe our layer 1 there: {:?}", flips[0]);
    assert!(flips[0].margin_reference.is_some(), "{:?}", flips[0]);
}

/// A flip's class takes the flipped keys' own lead, not only the row's margin (the k-th minus
/// the (k+1)-th score): a port that lowered a key far above the cut to just under it swaps that
/// key for the best one left out, and both rows' margins are 1e-4 while the reference keeps the
/// swapped key ahead by far. Read as a near-tie; real. A swap of the two keys at the cut stays a
/// near-tie.
#[test]
fn a_flip_of_a_key_far_above_the_cut_is_real_whatever_the_rows_margins() {
    use glimpse::dump::Values;
    let tmp = tempfile::tempdir().unwrap();
    let golden = golden_flat().join("reference.safetensors");
    let (layer, far_q, tie_q) = (0, 20, 24);
    let scores = format!("layers.{layer}.dsa.scores");
    let topk = format!("layers.{layer}.dsa.topk");
    let d = Dump::open(&golden).unwrap();
    let (Values::F32(s), _) = d.values(&scores).unwrap() else { panic!() };
    let (Values::I64(kept), shape) = d.values(&topk).unwrap() else { panic!() };
    let (seq, k) = (shape[1], shape[2]);
    // Row q's kept keys by score, high to low, and its causal keys left out, high to low.
    let ranked = |q: usize| {
        let row = &s[q * seq..q * seq + seq];
        let mut keys: Vec<usize> = (0..=q).collect();
        keys.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let ids: Vec<usize> = kept[q * k..q * k + k].iter().map(|&x| x as usize).collect();
        assert!(keys[..k].iter().all(|x| ids.contains(x)), "the reference's row {q} is its scores' top-{k}");
        keys
    };
    let (far, tie) = (ranked(far_q), ranked(tie_q));
    let at = |q: usize, key: usize| q * seq + key;
    // Both rows decided by 1e-4 in the reference: the best key left out moved up to the cut.
    let reference = edit_dump(&golden, &tmp.path().join("ref.st"), |t| {
        let (_, Values::F32(v), _) = t.iter_mut().find(|(n, _, _)| *n == scores).unwrap() else { panic!() };
        for (q, keys) in [(far_q, &far), (tie_q, &tie)] {
            v[at(q, keys[k])] = v[at(q, keys[k - 1])] - 1e-4;
        }
    });
    let r = Dump::open(&reference).unwrap();
    let (Values::F32(rs), _) = r.values(&scores).unwrap() else { panic!() };
    // Ours: row far_q's best key lowered to just under that one (1e-4), row tie_q's last kept
    // key; each row keeps the key left out in its place.
    let ours = edit_dump(&reference, &tmp.path().join("ours.st"), |t| {
        for (q, keys, dropped) in [(far_q, &far, far[0]), (tie_q, &tie, tie[k - 1])] {
            let (_, Values::F32(v), _) = t.iter_mut().find(|(n, _, _)| *n == scores).unwrap() else { panic!() };
            v[at(q, dropped)] = rs[at(q, keys[k])] - 1e-4;
            let (_, Values::I64(ids), _) = t.iter_mut().find(|(n, _, _)| *n == topk).unwrap() else { panic!() };
            let slot = ids[q * k..q * k + k].iter().position(|&x| x as usize == dropped).unwrap();
            ids[q * k + slot] = keys[k] as i64;
        }
    });
    let report = diff(&Dump::open(&ours).unwrap(), &r, &DiffOptions::default()).unwrap();
    let flips = flips_of(&report.results, &topk);
    assert_eq!(flips.len(), 2, "{flips:?}");
    let near_tie = Tolerance::default().near_tie();
    for f in &flips {
        let (mo, mr) = (f.margin_ours.unwrap(), f.margin_reference.unwrap());
        assert!(mo < 1.1e-4 && mr < 1.1e-4, "both rows' margins are small: {f:?}");
    }
    let (far_flip, tie_flip) = (flips[0], flips[1]);
    assert_eq!((far_flip.at[1], tie_flip.at[1]), (far_q, tie_q));
    // The reference keeps its best key ahead of the one ours took by their scores' gap.
    let gap = rs[at(far_q, far[0])] - rs[at(far_q, far[k])];
    assert!(gap as f64 > 10.0 * near_tie, "the test needs a far key: {gap}");
    assert_eq!(far_flip.lead_reference, Some(gap));
    assert_eq!(Class::of(far_flip, near_tie), Class::Real);
    assert!(tie_flip.lead_reference.is_some_and(|l| l < 1.1e-4), "{tie_flip:?}");
    assert_eq!(Class::of(tie_flip, near_tie), Class::NearTie);
    let text = report.render(Path::new("ours"), Path::new("ref"));
    assert!(text.contains("flipped keys' lead ours"), "{text}");
    // Ours without the S x S scores (glimpse's default recording): the reference's lead alone
    // classes the flip, as `verify` does.
    let no_scores = edit_dump(&ours, &tmp.path().join("ours-no-scores.st"), |t| t.retain(|(n, _, _)| *n != scores));
    let report = diff(&Dump::open(&no_scores).unwrap(), &r, &DiffOptions::default()).unwrap();
    let far_flip = flips_of(&report.results, &topk).into_iter().find(|f| f.at[1] == far_q).unwrap().clone();
    assert_eq!((far_flip.lead_ours, far_flip.lead_reference), (None, Some(gap)));
    assert_eq!(Class::of(&far_flip, near_tie), Class::Real);
}
