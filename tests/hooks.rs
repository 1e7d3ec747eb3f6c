//! Hook points, dumps and `diff`: every hook point fires with the shape the spec (and our extra
//! names) promise, a recorded dump round-trips, `run --dump` of a golden case's tokens diffs clean
//! against that case, and `diff` tells a perturbed tensor or a changed routing set from a mere
//! reordering of set rows or a change in their padding.

mod common;
use common::{code_and_text, edit_dump, golden, Named};

use std::path::{Path, PathBuf};

use glimpse::checkpoint::Checkpoint;
use glimpse::config::{IndexerKind, MlpKind};
use glimpse::dump::{Dump, DumpWriter, Values};
use glimpse::hooks::{HookPoint, LayerHook, Recorder, Selector};
use glimpse::model::Model;

/// The bundled default case and its reference's tokens.
fn flat_model() -> (Checkpoint, Model, glimpse::model::Tokens) {
    let dir = golden("flat");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = Model::load(&ckpt).unwrap();
    let tokens = Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
    (ckpt, model, tokens)
}

fn everything() -> Selector {
    Selector::new("*,*.dsa.scores", None)
}

#[test]
fn every_hook_point_fires_with_the_right_shapes() {
    let dir = golden("grouped-shared-yarn");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let c = ckpt.config.clone();
    let model = Model::load(&ckpt).unwrap();
    let tokens = Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
    let (b, s) = (tokens.batch, tokens.seq);
    let mut rec = Recorder::new(everything());
    model.forward(&tokens, &mut rec).unwrap();

    let (h, n, e, k, kk) = (c.hidden_size, b * s, c.n_routed_experts, c.num_experts_per_tok, c.index_k(s));
    let shape = |p: HookPoint| rec.get(p).map(|t| t.dims().to_vec());
    assert_eq!(shape(HookPoint::InputIds), Some(vec![b, s]));
    assert_eq!(shape(HookPoint::Embeddings), Some(vec![b, s, h]));
    assert_eq!(shape(HookPoint::FinalNorm), Some(vec![b, s, h]));
    assert_eq!(shape(HookPoint::Logits), Some(vec![b, s, c.vocab_size]));
    for i in 0..c.num_hidden_layers {
        let moe = c.mlp_layer_types[i] == MlpKind::Moe;
        let full = c.indexer_types[i] == IndexerKind::Full;
        for hook in LayerHook::ALL {
            use LayerHook::*;
            let want: Option<Vec<usize>> = match hook {
                InputNorm | AttnOut | PostAttnNorm | MlpOut | Output => Some(vec![b, s, h]),
                QLatent => Some(vec![b, s, c.q_lora_rank]),
                KvLatent => Some(vec![b, s, c.kv_lora_rank]),
                KvNormPre | KvNorm | KRopeNorm => Some(vec![b, s]),
                DsaTopk => Some(vec![b, s, kk]),
                DsaScores => full.then(|| vec![b, s, s]),
                DsaMargin => full.then(|| vec![b, s]),
                RouterLogits | RouterScores | RouterBiasedScores => moe.then(|| vec![n, e]),
                TopkIds | TopkWeights => moe.then(|| vec![n, k]),
                RouterMargin | BiasChanged => moe.then(|| vec![n]),
            };
            assert_eq!(shape(HookPoint::Layer(i, hook)), want, "layers.{i}.{}", hook.suffix());
        }
    }
    // Recorded in forward order, each point once.
    let points: Vec<HookPoint> = rec.tensors.iter().map(|(p, _)| *p).collect();
    let mut sorted = points.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(points, sorted);

    // The extras agree with the spec tensors they summarise.
    let t = |p| rec.get(p).unwrap().flatten_all().unwrap();
    let kv = t(HookPoint::Layer(0, LayerHook::KvLatent)).to_vec1::<f32>().unwrap();
    let norm0 = t(HookPoint::Layer(0, LayerHook::KvNorm)).to_vec1::<f32>().unwrap()[0];
    let by_hand = kv[..c.kv_lora_rank].iter().map(|x| x * x).sum::<f32>().sqrt();
    approx::assert_relative_eq!(norm0, by_hand, max_relative = 1e-5);
    let logits = t(HookPoint::Layer(1, LayerHook::RouterLogits)).to_vec1::<f32>().unwrap();
    let scores = t(HookPoint::Layer(1, LayerHook::RouterScores)).to_vec1::<f32>().unwrap();
    approx::assert_relative_eq!(scores[3], 1.0 / (1.0 + (-logits[3]).exp()), max_relative = 1e-6);
}

#[test]
fn a_recorded_dump_round_trips() {
    let (ckpt, model, tokens) = flat_model();
    let tmp = tempfile::tempdir().unwrap();
    let mut rec = Recorder::new(everything());
    model.forward(&tokens, &mut rec).unwrap();
    // A header reservation sized for the model, and one far too small (the copying fallback).
    for (expected, file) in [(model.max_hook_points(), "run.safetensors"), (0, "small-reserve.safetensors")] {
        let path = tmp.path().join(file);
        let mut writer = DumpWriter::create(&path, everything(), expected).unwrap();
        model.forward(&tokens, &mut writer).unwrap();
        let meta = glimpse::dump::metadata("test", Some(&ckpt.config_bytes), None);
        assert_eq!(writer.finish(&meta).unwrap(), rec.tensors.len());
        check_round_trip(&path, &rec, &tokens, &ckpt.config_bytes);
    }
    // Only the dumps are left: no temporary file.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
}

fn check_round_trip(path: &Path, rec: &Recorder, tokens: &glimpse::model::Tokens, config: &[u8]) {
    let dump = Dump::open(path).unwrap();
    assert_eq!(&dump.tokens().unwrap(), tokens);
    assert_eq!(dump.metadata().get("config_sha256"), Some(&glimpse::dump::sha256_hex(config)));
    for (p, t) in &rec.tensors {
        let (values, shape) = dump.values(&p.name()).unwrap();
        assert_eq!(shape, t.dims(), "{}", p.name());
        let flat = t.flatten_all().unwrap();
        match values {
            Values::F32(v) => assert_eq!(v, flat.to_vec1::<f32>().unwrap(), "{}", p.name()),
            Values::I64(v) => assert_eq!(v, flat.to_vec1::<i64>().unwrap(), "{}", p.name()),
        }
    }
}

#[test]
fn run_dump_of_a_golden_case_diffs_clean_against_it() {
    let tmp = tempfile::tempdir().unwrap();
    for case in ["flat", "grouped-shared-yarn", "fp8-sharded", "bf16-fused"] {
        let dir = golden(case);
        let reference = dir.join("reference.safetensors");
        let out = tmp.path().join(format!("{case}.safetensors"));
        let (code, text) = code_and_text(&[
            "run",
            "--model",
            dir.to_str().unwrap(),
            "--tokens-from",
            reference.to_str().unwrap(),
            "--dump",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{text}");
        let (code, text) = code_and_text(&["diff", out.to_str().unwrap(), reference.to_str().unwrap()]);
        assert_eq!(code, 0, "{case}: {text}");
        assert!(text.contains("no divergence"), "{text}");
    }
}

fn edited(tmp: &Path, name: &str, edit: impl FnOnce(&mut Vec<Named>)) -> PathBuf {
    edit_dump(&golden("flat").join("reference.safetensors"), &tmp.join(name), edit)
}

fn ints<'a>(t: &'a mut [(String, Values, Vec<usize>)], name: &str) -> (Vec<usize>, &'a mut Vec<i64>) {
    let (_, v, s) = t.iter_mut().find(|(n, _, _)| n == name).unwrap();
    match v {
        Values::I64(x) => (s.clone(), x),
        _ => panic!("{name} is not an index tensor"),
    }
}

#[test]
fn diff_names_the_perturbed_tensor_and_ignores_set_order_and_padding() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = golden("flat").join("reference.safetensors");
    let r = reference.to_str().unwrap();

    let perturbed = edited(tmp.path(), "perturbed.safetensors", |t| {
        let (_, v, _) = t.iter_mut().find(|(n, _, _)| n == "layers.2.attn.out").unwrap();
        let Values::F32(x) = v else { panic!() };
        x[100] += 0.01;
    });
    let (code, text) = code_and_text(&["diff", perturbed.to_str().unwrap(), r]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("first divergence: layers.2.attn.out\n"), "{text}");
    assert!(!text.contains("every later one differs"), "one element is no onset: {text}");

    // A dump whose floats are all bf16 values, compared at f32's tolerance: said, with bf16's.
    let rounded = edited(tmp.path(), "bf16.safetensors", |t| {
        for (_, v, _) in t.iter_mut() {
            if let Values::F32(x) = v {
                x.iter_mut().for_each(|x| *x = f32::from_bits(x.to_bits() & 0xFFFF_0000));
            }
        }
    });
    let note = "note: ours holds bf16 values only (every float's low 16 bits are 0): compare at bf16's tolerance";
    let (code, text) = code_and_text(&["diff", rounded.to_str().unwrap(), r]);
    assert!(code == 1 && text.contains(note), "{text}");
    let (_, text) = code_and_text(&["diff", rounded.to_str().unwrap(), r, "--atol", "2e-2", "--rtol", "2e-2"]);
    assert!(!text.contains(note), "{text}");

    // A difference from a position on is read: from 1 (what acts by position), from K = 8 (the
    // queries that drop keys).
    let from = |p: usize| {
        edited(tmp.path(), &format!("from{p}.safetensors"), |t| {
            let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.0.attn.out").unwrap();
            let (s, h) = (shape[1], shape[2]);
            let Values::F32(x) = v else { panic!() };
            (p..s).for_each(|q| x[q * h] += 0.5);
        })
    };
    let (_, text) = code_and_text(&["diff", from(1).to_str().unwrap(), r]);
    assert!(
        text.contains("  position 0 matches and every later one differs: something that acts by position"),
        "{text}"
    );
    let (_, text) = code_and_text(&["diff", from(8).to_str().unwrap(), r]);
    assert!(text.contains("  queries 0-7 (which keep every causal key) match and every later one differs"), "{text}");
    // Its mirror: the queries whose selections are padded past the query (0 to K - 2) differ, and
    // every later one matches (attention reading a padded key); any other leading run is said
    // plainly.
    let until = |p: usize| {
        edited(tmp.path(), &format!("until{p}.safetensors"), |t| {
            let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.0.attn.out").unwrap();
            let h = shape[2];
            let Values::F32(x) = v else { panic!() };
            (0..p).for_each(|q| x[q * h] += 0.5);
        })
    };
    let (_, text) = code_and_text(&["diff", until(7).to_str().unwrap(), r]);
    let padded =
        "  queries 0-6 (whose selections hold fewer than index_topk causal keys, padded past the query) differ \
                  and every later one matches: attention reads the padding";
    assert!(text.contains(padded), "{text}");
    let (_, text) = code_and_text(&["diff", until(3).to_str().unwrap(), r]);
    assert!(text.contains("  positions 0-2 differ and every later one matches\n"), "{text}");
    // Indexer scores are made before the selection: an onset at K there is no selection's (a
    // RoPE bug of decode steps that start at K).
    let scores = edited(tmp.path(), "scores8.safetensors", |t| {
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.0.dsa.scores").unwrap();
        let s = shape[1];
        let Values::F32(x) = v else { panic!() };
        (8..s).for_each(|q| x[q * s] += 0.5);
    });
    let (_, text) = code_and_text(&["diff", scores.to_str().unwrap(), r]);
    assert!(
        text.contains("first divergence: layers.0.dsa.scores\n  positions 0-7 match and every later one differs\n"),
        "{text}"
    );
    // Routing weights a decode path forgot to scale, from position 5 on: the onset, the factor
    // past it, and with the routers the rule that made the later tokens' weights.
    let unscaled = edited(tmp.path(), "unscaled.safetensors", |t| {
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.2.moe.topk_weights").unwrap();
        let k = shape[1];
        let Values::F32(x) = v else { panic!() };
        x[5 * k..].iter_mut().for_each(|w| *w /= 2.5);
    });
    let (_, text) = code_and_text(&["diff", unscaled.to_str().unwrap(), r]);
    let past =
        "  positions 0-4 match and every later one differs; past them ours = 0.4000 x reference, cosine 1.000000";
    assert!(text.contains(&format!("first divergence: layers.2.moe.topk_weights\n{past}")), "{text}");
    let (_, text) =
        code_and_text(&["diff", unscaled.to_str().unwrap(), r, "--model", golden("flat").to_str().unwrap()]);
    let rule = "layers.2.moe.topk_weights (from position 5 on, ours's weights are its gate's scores without \
                routed_scaling_factor)";
    assert!(text.contains(&format!("first divergence: {rule}\n{past}")), "{text}");
    // Experts chosen without the correction bias: every token's are the top-k of the sigmoid of
    // its gate logits (computed here: flat routing, k largest), and with the routers that is read.
    let unbiased = edited(tmp.path(), "unbiased.safetensors", |t| {
        let (_, v, shape) = t.iter().find(|(n, _, _)| n == "layers.2.moe.router_logits").unwrap();
        let (e, Values::F32(logits)) = (shape[1], v.clone()) else { panic!() };
        let (shape, ids) = ints(t, "layers.2.moe.topk_ids");
        let k = shape[1];
        for (row, chosen) in logits.chunks(e).zip(ids.chunks_mut(k)) {
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&x, &y| row[y].total_cmp(&row[x])); // sigmoid is increasing
            chosen.iter_mut().zip(&order).for_each(|(c, &o)| *c = o as i64);
        }
    });
    let m = golden("flat");
    let (_, text) = code_and_text(&["diff", unbiased.to_str().unwrap(), r, "--model", m.to_str().unwrap()]);
    let left_out = "first divergence: layers.2.moe.topk_ids (ours chooses every token's experts by the unbiased \
                    scores (sigmoid of the gate logits;";
    assert!(text.contains(left_out) && text.contains("e_score_correction_bias is left out of selection"), "{text}");
    // A selection that leaves out each query's own key (where another causal key can take its
    // place), as a mask `j < s` for `j <= s` makes it, from the selections alone.
    let diagonal = edited(tmp.path(), "diagonal.safetensors", |t| {
        let (shape, ids) = ints(t, "layers.0.dsa.topk");
        let (s, k) = (shape[1], shape[2]);
        for (q, row) in ids.chunks_mut(k).enumerate().map(|(r, row)| (r % s, row)) {
            let free = (0..q as i64).find(|j| !row.contains(j));
            if let (Some(own), Some(free)) = (row.iter().position(|&j| j == q as i64), free) {
                row[own] = free;
            }
        }
    });
    let (_, text) = code_and_text(&["diff", diagonal.to_str().unwrap(), r]);
    let read = "first divergence: layers.0.dsa.topk (in every flip the reference keeps the query's own key and ours \
                leaves it out: a causal mask off by one";
    assert!(text.contains(read), "{text}");
    // Not from one near-tie that happens to be a query's own key: transformers' bf16 run of
    // golden/bf16-fused flips one such at bf16's tolerance.
    let fused = golden("bf16-fused");
    let (bf16, f32_) = (fused.join("reference-bf16.safetensors"), fused.join("reference.safetensors"));
    let args = [bf16.to_str().unwrap(), f32_.to_str().unwrap(), "--model", fused.to_str().unwrap()];
    let (_, text) = code_and_text(&[&["diff"][..], &args, &["--atol", "2e-2", "--rtol", "2e-2"]].concat());
    assert!(text.contains("(every flip a near-tie)") && !text.contains("off by one"), "{text}");
    // Flips whose indexer scores ours does not hold (a dump recorded without them): how to have
    // them read.
    let no_scores = edited(tmp.path(), "no-scores.safetensors", |t| {
        t.retain(|(n, _, _)| !n.ends_with(".dsa.scores"));
        let (shape, ids) = ints(t, "layers.0.dsa.topk");
        let (s, k) = (shape[1], shape[2]);
        let row = &mut ids[(s - 1) * k..s * k];
        let free = (0..s as i64).find(|j| !row.contains(j)).unwrap();
        row[0] = free;
    });
    let (_, text) = code_and_text(&["diff", no_scores.to_str().unwrap(), r]);
    let how = "first divergence: layers.0.dsa.topk (ours holds no layers.0.dsa.scores: record it \
               (`--record '*,*.dsa.scores'`) to have these flips read)";
    assert!(text.contains(how), "{text}");
    // Every row of the KV latent scaled by a factor of its own (a norm's eps, or its mean over
    // the rope part too): read as such, with the factors' range.
    let rows = edited(tmp.path(), "rows.safetensors", |t| {
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.0.attn.kv_latent").unwrap();
        let w = shape[2];
        let Values::F32(x) = v else { panic!() };
        x.chunks_mut(w).enumerate().for_each(|(r, row)| row.iter_mut().for_each(|v| *v *= 0.9 + 0.01 * r as f32));
    });
    let (_, text) = code_and_text(&["diff", rows.to_str().unwrap(), r]);
    let scaled = "first divergence: layers.0.attn.kv_latent (each of its 32 rows is a scaled copy of the reference's, \
                  by factors 0.9000 to 1.2100: a normalisation whose statistic differs";
    assert!(text.contains(scaled), "{text}");
    // A MoE output without its shared expert: the reference's less the shared expert, computed
    // here from the checkpoint's weights on the reference's post_attn_norm (silu(x Wg) * x Wu, then
    // Wd), in mlp.out and the layer's output, is read with --model.
    let ckpt = glimpse::checkpoint::Checkpoint::open(&m).unwrap();
    let weight = |p: &str| ckpt.f32(&format!("model.layers.2.mlp.shared_experts.{p}.weight")).unwrap();
    let ((wg, gs), (wu, _), (wd, _)) = (weight("gate_proj"), weight("up_proj"), weight("down_proj"));
    let (inter, hidden) = (gs[0], gs[1]);
    let routed_only = edited(tmp.path(), "no-shared.safetensors", |t| {
        let x = match &t.iter().find(|(n, _, _)| n == "layers.2.post_attn_norm").unwrap().1 {
            Values::F32(x) => x.clone(),
            _ => panic!(),
        };
        let shared: Vec<f32> = x
            .chunks(hidden)
            .flat_map(|x| {
                let dot = |w: &[f32], j: usize| (0..hidden).map(|c| w[j * hidden + c] * x[c]).sum::<f32>();
                let h: Vec<f32> =
                    (0..inter).map(|j| dot(&wg, j) / (1.0 + (-dot(&wg, j)).exp()) * dot(&wu, j)).collect();
                (0..hidden).map(|c| (0..inter).map(|j| wd[c * inter + j] * h[j]).sum::<f32>()).collect::<Vec<_>>()
            })
            .collect();
        // (The layer's output too: a port whose mlp.out lacks the shared expert while its output
        // holds it only records mlp.out before adding it.)
        for name in ["layers.2.mlp.out", "layers.2.output"] {
            let (_, v, _) = t.iter_mut().find(|(n, _, _)| n == name).unwrap();
            let Values::F32(out) = v else { panic!() };
            out.iter_mut().zip(&shared).for_each(|(o, s)| *o -= s);
        }
    });
    let (_, text) = code_and_text(&["diff", routed_only.to_str().unwrap(), r, "--model", m.to_str().unwrap()]);
    assert!(text.contains("the shared expert is not added to the routed experts' sum"), "{text}");
    // Weights scaled twice: the factor is the config's routed_scaling_factor, which is said.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    let rsf = config["routed_scaling_factor"].as_f64().unwrap();
    let twice = edited(tmp.path(), "twice.safetensors", |t| {
        let (_, v, _) = t.iter_mut().find(|(n, _, _)| n == "layers.2.moe.topk_weights").unwrap();
        let Values::F32(x) = v else { panic!() };
        x.iter_mut().for_each(|w| *w *= rsf as f32);
    });
    let (_, text) = code_and_text(&["diff", twice.to_str().unwrap(), r, "--model", m.to_str().unwrap()]);
    assert!(text.contains(&format!("(routed_scaling_factor {rsf}: applied twice?)")), "{text}");
    // A router tensor is [B*S, E]: its columns are experts, not positions.
    let experts = edited(tmp.path(), "experts.safetensors", |t| {
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == "layers.2.moe.router_logits").unwrap();
        let e = shape[1];
        let Values::F32(x) = v else { panic!() };
        x.iter_mut().enumerate().filter(|(i, _)| i % e > 0).for_each(|(_, x)| *x += 0.05);
    });
    let (_, text) = code_and_text(&["diff", experts.to_str().unwrap(), r]);
    assert!(
        text.contains("first divergence: layers.2.moe.router_logits") && !text.contains("every later one"),
        "{text}"
    );

    let rerouted = edited(tmp.path(), "rerouted.safetensors", |t| {
        let (shape, ids) = ints(t, "layers.3.moe.topk_ids");
        let k = shape[1];
        let row = &mut ids[5 * k..6 * k];
        let unused = (0..16).find(|e| !row.contains(e)).unwrap();
        row[0] = unused;
    });
    let (code, text) = code_and_text(&["diff", rerouted.to_str().unwrap(), r]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("first divergence: layers.3.moe.topk_ids"), "{text}");
    assert!(text.contains("1 flips"), "{text}");

    // Reversing every row of every set tensor (weights follow their ids) and rewriting the
    // padding past the causal limit are not differences.
    let reordered = edited(tmp.path(), "reordered.safetensors", |t| {
        let names: Vec<String> = t.iter().map(|(n, _, _)| n.clone()).collect();
        for name in names.iter().filter(|n| n.ends_with(".dsa.topk") || n.ends_with(".moe.topk_ids")) {
            let (shape, ids) = ints(t, name);
            let k = *shape.last().unwrap();
            let seq = if name.ends_with(".dsa.topk") { shape[1] } else { usize::MAX };
            for (r, row) in ids.chunks_mut(k).enumerate() {
                row.reverse();
                if seq != usize::MAX {
                    for x in row.iter_mut().filter(|x| **x as usize > r % seq) {
                        *x = (seq - 1) as i64; // still padding: past the causal limit
                    }
                }
            }
            if let Some(layer) = name.strip_suffix(".moe.topk_ids") {
                let wname = format!("{layer}.moe.topk_weights");
                let (_, v, _) = t.iter_mut().find(|(n, _, _)| *n == wname).unwrap();
                let Values::F32(w) = v else { panic!() };
                w.chunks_mut(k).for_each(|row| row.reverse());
            }
        }
    });
    let (code, text) = code_and_text(&["diff", reordered.to_str().unwrap(), r]);
    assert_eq!(code, 0, "{text}");
    let (code, json) = code_and_text(&["diff", "--json", reordered.to_str().unwrap(), r]);
    assert_eq!(code, 0, "{json}");
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["match"], true);
    assert!(v["first_divergence"].is_null());
}

/// The bundled bf16 port flips selections; with the margins of both sides (the port's recorded,
/// the reference's recomputed from its indexer scores and, with --model, its gate logits), the
/// threshold decides near-tie against real. Without --model the reference's routing margins are
/// unknown, and a small margin of the port's alone is no near-tie.
#[test]
fn diff_classifies_flips_by_margin() {
    let port = golden("flat").join("bf16-port.safetensors");
    let reference = golden("flat").join("reference.safetensors");
    let (p, r) = (port.to_str().unwrap(), reference.to_str().unwrap());
    let model = golden("flat");
    let classes = |threshold: &str| -> Vec<(String, serde_json::Value, serde_json::Value)> {
        let args = ["diff", "--json", "--model", model.to_str().unwrap(), "--near-tie", threshold, p, r];
        let (code, out) = code_and_text(&args);
        assert_eq!(code, 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["first_divergence"], "embeddings");
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["flips"].as_array().cloned().unwrap_or_default())
            .map(|f| {
                (f["class"].as_str().unwrap().to_string(), f["margin_ours"].clone(), f["margin_reference"].clone())
            })
            .collect()
    };
    let loose = classes("10");
    assert!(!loose.is_empty());
    assert!(loose.iter().all(|(c, _, _)| c == "near-tie"), "{loose:?}");
    let strict = classes("0");
    assert_eq!(strict.len(), loose.len(), "the threshold reclassifies flips, it does not drop them");
    assert!(strict.iter().all(|(c, _, _)| c == "real"), "{strict:?}");
    assert!(strict.iter().all(|(_, a, b)| a.is_number() && b.is_number()), "{strict:?}");
    let (_, out) = code_and_text(&["diff", "--near-tie", "10", p, r]);
    let routing: Vec<&str> = out.lines().filter(|l| l.contains(".moe.topk_ids [")).collect();
    assert!(!routing.is_empty() && routing.iter().all(|l| l.contains("ref unknown -> unknown")), "{out}");
}

/// A `moe.bias_changed` (the counterfactual: would the experts differ without the correction
/// bias?) that differs where the choice without the bias is a near-tie is read as such with
/// `--model` (a long generation against its prefill meets one): the margin is that choice's gap,
/// recomputed here from the gate logits.
#[test]
fn a_bias_changed_difference_at_a_near_tie_of_the_unbiased_choice_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let model = golden("flat");
    let m = model.to_str().unwrap();
    let reference = model.join("reference.safetensors");
    let ours = common::run_dump(m, &["--tokens-from", reference.to_str().unwrap()], tmp.path(), "ours.safetensors");
    let ours = PathBuf::from(ours);
    let (tokens, layer) = ([5usize, 6], 2usize);
    let flipped = edit_dump(&ours, &tmp.path().join("flipped.safetensors"), |t| {
        let (_, flags) = ints(t, &format!("layers.{layer}.moe.bias_changed"));
        tokens.iter().for_each(|&token| flags[token] = 1 - flags[token]);
    });
    // The choice without the bias: flat routing, top 4 of sigmoid(logits).
    let logits = Dump::open(&ours).unwrap().tensor(&format!("layers.{layer}.moe.router_logits")).unwrap();
    let margin = |token: usize| {
        let row: Vec<f32> = logits.get(token).unwrap().to_vec1().unwrap();
        let mut scores: Vec<f32> = row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
        scores.sort_by(|a, b| b.total_cmp(a));
        scores[3] - scores[4]
    };
    let (low, high) = (margin(5).min(margin(6)), margin(5).max(margin(6)));
    assert!(high > 2.0 * low, "two margins apart: {low} {high}");
    let diff = |near_tie: f32| {
        let (f, o) = (flipped.to_str().unwrap(), ours.to_str().unwrap());
        let (code, out) = code_and_text(&["diff", f, o, "--model", m, "--near-tie", &near_tie.to_string()]);
        assert_eq!(code, 1, "{out}");
        out.lines().nth(1).unwrap().to_string()
    };
    let first = format!("first divergence: layers.{layer}.moe.bias_changed");
    let every = format!(
        "{first} (every difference a near-tie of the choice without the bias (margins up to {high:.1e} on both \
         sides): the counterfactual flipped, not the experts)"
    );
    assert_eq!(diff(high * 1.5), every);
    let some = format!(
        "{first} (1 of 2 differences near-ties of the choice without the bias (margins up to {low:.1e} on both \
         sides); the rest are not)"
    );
    assert_eq!(diff((low + high) / 2.0), some);
    assert_eq!(diff(low / 2.0), first);
}

/// A run that stops before `finish` (an error, a panic unwinding, a drop) leaves the target
/// untouched and no temporary file behind.
#[test]
fn an_unfinished_dump_leaves_the_previous_file_intact() {
    let (_, model, tokens) = flat_model();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run.safetensors");
    std::fs::write(&path, b"previous").unwrap();
    let mut writer = DumpWriter::create(&path, everything(), model.max_hook_points()).unwrap();
    model.forward(&tokens, &mut writer).unwrap();
    drop(writer);
    assert_eq!(std::fs::read(&path).unwrap(), b"previous");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "no temporary file left");
}

/// A shared-indexer layer whose selection is not the layer it reuses (a port that recomputed
/// it) is read so with --model; without the config nothing says the layer is shared.
#[test]
fn a_shared_layer_that_does_not_reuse_its_source_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let case = golden("grouped-shared-yarn"); // layer 1 reuses layer 0's selection (K = 12, S = 40)
    let reference = case.join("reference.safetensors");
    let own = edit_dump(&reference, &tmp.path().join("own.st"), |t| {
        let (_, v, _) = t.iter_mut().find(|(n, _, _)| n == "layers.1.dsa.topk").unwrap();
        let Values::I64(ids) = v else { panic!() };
        let row = &mut ids[12 * 39..12 * 40]; // the last query keeps 12 of its 40 keys
        let unused = (0..40).find(|j| !row.contains(j)).unwrap();
        row[0] = unused;
    });
    let (a, r, m) = (own.to_str().unwrap(), reference.to_str().unwrap(), case.to_str().unwrap());
    let (code, text) = code_and_text(&["diff", a, r, "--model", m]);
    let reading =
        "first divergence: layers.1.dsa.topk (a shared-indexer layer: the reference's selection is layer 0's, \
                   ours's is not";
    assert!(code == 1 && text.contains(reading), "{text}");
    let (_, text) = code_and_text(&["diff", a, r]);
    assert!(!text.contains("(a shared-indexer layer:"), "{text}");
}
