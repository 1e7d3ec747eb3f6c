//! Every committed golden case (`golden/<case>/`, written by `golden/generate.py` from the
//! transformers reference) must match at the spec's default tolerance, both as a whole forward
//! pass and with every layer fed the reference's own input. Like llm.c's `test_gpt2.c`, the
//! per-tensor max differences are printed (`cargo test -- --nocapture`). The `mtp` case also
//! checks the MTP head, whose reference `golden/generate.py` builds from the module definition.

use std::path::{Path, PathBuf};

use glimpse::checkpoint::Checkpoint;
use glimpse::compare::Tolerance;
use glimpse::dump::Dump;
use glimpse::model::mtp::Mtp;
use glimpse::model::Model;
use glimpse::verify::{format_line, has_mtp, verify, verify_mtp};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("golden/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.safetensors").is_file())
        .collect();
    cases.sort();
    cases
}

fn check(case: &Path, isolate: bool) {
    let ckpt = Checkpoint::open(case).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
    let model = Model::load(&ckpt).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
    let golden = Dump::open(&case.join("reference.safetensors")).unwrap();
    let mut report = verify(&model, &golden, Tolerance::default(), isolate).unwrap();
    // Only the `mtp` case carries the MTP head's tensors, and it must.
    assert_eq!(has_mtp(&golden), case.ends_with("mtp"), "{}", case.display());
    if has_mtp(&golden) {
        let head = Mtp::load(&ckpt).unwrap();
        verify_mtp(&model, (&model.config, &head), &golden, &Default::default(), &mut report).unwrap();
    }
    println!("== {} (isolate: {isolate})", case.display());
    for c in &report.results {
        println!("{}", format_line(c));
    }
    let bad: Vec<String> = report.results.iter().filter(|c| !c.ok).map(format_line).collect();
    assert!(bad.is_empty(), "{}: {} mismatches:\n{}", case.display(), bad.len(), bad.join("\n"));
    assert!(report.only_in_reference.is_empty(), "not produced: {:?}", report.only_in_reference);
    // Every hook point of every layer was compared.
    let layers = ckpt.config.num_hidden_layers;
    for i in 0..layers {
        for suffix in ["input_norm", "attn.q_latent", "attn.kv_latent", "dsa.topk", "attn.out", "mlp.out", "output"] {
            let name = format!("layers.{i}.{suffix}");
            assert!(report.results.iter().any(|c| c.name == name), "{} has no {name}", case.display());
        }
    }
    assert!(report.results.iter().any(|c| c.name == "logits"));
    if has_mtp(&golden) {
        for name in ["mtp.input_hidden", "mtp.eh_proj", &format!("layers.{layers}.moe.topk_ids"), "mtp.logits"] {
            assert!(report.results.iter().any(|c| c.name == name), "{} has no {name}", case.display());
        }
    }
}

#[test]
fn golden_cases_exist() {
    let names: Vec<String> = cases().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["flat", "grouped-shared-yarn", "fp8-sharded", "bf16-fused", "mtp"] {
        assert!(names.iter().any(|n| n == want), "golden/{want} missing (have {names:?})");
    }
}

#[test]
fn every_golden_case_matches() {
    assert!(cases().len() >= 5, "the bundled cases: {:?}", cases());
    for case in cases() {
        check(&case, false);
    }
}

#[test]
fn every_golden_case_matches_with_isolated_layers() {
    assert!(cases().len() >= 5, "the bundled cases: {:?}", cases());
    for case in cases() {
        check(&case, true);
    }
}

/// The reference's margins are recomputed from what transformers records (indexer scores, gate
/// logits with the checkpoint's correction bias), and kept only where the recomputation makes the
/// recorded choice: on every golden case it must make every recorded choice of every layer with a
/// full indexer or a router (the MTP layer's included), with a margin >= 0, so every flip against
/// these references is classed by its margin.
#[test]
fn the_reference_margins_reproduce_every_recorded_choice() {
    use glimpse::config::IndexerKind;
    use glimpse::flips::margins_in;
    use glimpse::hooks::{HookPoint, LayerHook};
    use glimpse::model::moe::Routers;
    for case in cases() {
        let ckpt = Checkpoint::open(&case).unwrap();
        let golden = Dump::open(&case.join("reference.safetensors")).unwrap();
        let routers = Routers::read(&ckpt).unwrap();
        let (c, mut checked) = (&ckpt.config, Vec::new());
        for i in 0..c.num_hidden_layers + usize::from(has_mtp(&golden)) {
            for (hook, router) in [(LayerHook::DsaTopk, None), (LayerHook::TopkIds, routers.layer(i))] {
                let point = HookPoint::Layer(i, hook);
                if !golden.contains(&point.name()) {
                    continue;
                }
                // Shared-indexer layers record no scores of their own; dense layers route nothing.
                let expected = match hook {
                    LayerHook::DsaTopk => c.indexer_kind(i) == IndexerKind::Full,
                    _ => router.is_some(),
                };
                let Some(m) = margins_in(&golden, point, router) else {
                    assert!(!expected, "{}: no margins recomputed for {}", case.display(), point.name());
                    continue;
                };
                let unknown = m.iter().filter(|v| v.is_nan()).count();
                assert_eq!(unknown, 0, "{}: {unknown} rows of {} not reproduced", case.display(), point.name());
                assert!(m.iter().all(|&v| v >= 0.0), "{}: {}: {m:?}", case.display(), point.name());
                checked.push(point.name());
            }
        }
        println!("{}: margins reproduced for {checked:?}", case.display());
        assert!(checked.iter().any(|n| n.ends_with("dsa.topk")) && checked.iter().any(|n| n.ends_with("moe.topk_ids")));
    }
}
