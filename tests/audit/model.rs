//! `audit --model`'s router checked against a dump's own routing: the bias-based numbers take its
//! correction bias as the one that chose, so a checkpoint whose router did not choose the dump's
//! experts is warned of, or refused.

use super::*;

/// Of layer `layer`'s tokens in `dump` (flat routing): how many recorded experts are not the top k
/// of `sigmoid(router_logits) + bias` with `model`'s correction bias, where that top k leads the
/// next expert by 1e-3 or more (what audit's check of `--model`'s router counts), and of how many
/// tokens. Worked out here from the dump and the checkpoint.
fn tokens_off_rule(dump: &Path, model: &Path, layer: usize) -> (usize, usize) {
    use glimpse::dump::{Dump, Values};
    let d = Dump::open(dump).unwrap();
    let ckpt = glimpse::checkpoint::Checkpoint::open(model).unwrap();
    let k = ckpt.config.num_experts_per_tok;
    let (bias, _) = ckpt.f32(&format!("model.layers.{layer}.mlp.gate.e_score_correction_bias")).unwrap();
    let Values::F32(logits) = d.values(&format!("layers.{layer}.moe.router_logits")).unwrap().0 else { panic!() };
    let Values::I64(ids) = d.values(&format!("layers.{layer}.moe.topk_ids")).unwrap().0 else { panic!() };
    let rows: Vec<&[f32]> = logits.chunks(bias.len()).collect();
    let off = rows.iter().zip(ids.chunks(k)).filter(|(row, recorded)| {
        let mut ranked: Vec<(f32, i64)> =
            row.iter().zip(&bias).enumerate().map(|(j, (l, b))| (1.0 / (1.0 + (-l).exp()) + b, j as i64)).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut top: Vec<i64> = ranked[..k].iter().map(|r| r.1).collect();
        let mut recorded = recorded.to_vec();
        top.sort_unstable();
        recorded.sort_unstable();
        top != recorded && ranked[k - 1].0 - ranked[k].0 >= 1e-3
    });
    (off.count(), rows.len())
}

/// With --model, the bias-based numbers (bias-changed, corr(b,l), w/o bias) take its correction
/// bias as the one that chose: a checkpoint of the same config but other weights (another
/// training step) passed unseen with another model's numbers, and a model without the dump's
/// layer checked nothing of it. Its router is now checked against the dump's own gate logits.
#[test]
fn audit_refuses_a_model_whose_router_did_not_choose_the_dumps_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let (made, other) = (synth(tmp.path(), 5), synth(tmp.path(), 6));
    let tokens: Vec<String> = (0..24).map(|t| (t * 7 % 40).to_string()).collect();
    let dump = common::run_dump(made.to_str().unwrap(), &["--tokens", &tokens.join(",")], tmp.path(), "d.st");
    let (_, err) = assert_ok(&glimpse(&["audit", "--model", made.to_str().unwrap(), "--dump", &dump]));
    assert!(!err.contains("are not the ones"), "its own model picks every token's experts: {err}");
    // Another bias over the same gate logits changes some of these 24 tokens' choices, not most: said.
    let (off, tokens) = tokens_off_rule(Path::new(&dump), &other, 1);
    assert!(off > 0 && 2 * off <= tokens, "{off} of {tokens}");
    let (_, err) = assert_ok(&glimpse(&["audit", "--model", other.to_str().unwrap(), "--dump", &dump]));
    let said =
        format!("`layers.1.moe.topk_ids`: {off} of {tokens} tokens' experts are not the ones --model's router picks");
    assert!(err.contains("warning") && err.contains(&said), "{err}");
    assert!(err.contains("the bias-based numbers take --model's bias as the one that chose"), "{err}");
    // golden/flat's reference against a checkpoint of its config drawn from another seed: most of
    // its 32 tokens at layer 2 off the rule refuse the dump.
    let reseeded = tmp.path().join("flat-5");
    let flat_config = "golden/flat/config.json";
    let out = reseeded.to_str().unwrap();
    assert_ok(&glimpse(&["synth", "--config", flat_config, "--dtype", "f32", "--seed", "5", "--out", out]));
    std::fs::copy(flat_config, reseeded.join("config.json")).unwrap(); // the same bytes: no config warning
    let reference = Path::new("golden/flat/reference.safetensors");
    let (off, tokens) = tokens_off_rule(reference, &reseeded, 2);
    assert!(2 * off > tokens, "{off} of {tokens}");
    assert_error(
        &glimpse(&["audit", "--model", out, "--dump", "golden/flat/reference.safetensors"]),
        &format!(
            "`layers.2.moe.topk_ids`: {off} of {tokens} tokens' experts are not the ones --model's router picks from \
             the dump's gate logits (sigmoid + its correction bias) by a margin of 1e-3 or more: another model's \
             routing, or another rule"
        ),
    );

    // golden/flat's first three layers (its MTP slot reads layer 3's bias): layer 4 is not its.
    let short = flat_with(tmp.path(), "short", |c| c["num_hidden_layers"] = 3.into());
    let (code, text) = common::code_and_text(&[
        "audit",
        "--model",
        short.to_str().unwrap(),
        "--dump",
        "golden/flat/reference.safetensors",
    ]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("`layers.4.moe.topk_ids`: --model has no MoE layer 4 (no correction bias)"), "{text}");
}
