//! Decode with the latent cache and absorbed MLA equals the expanded prefill, hook by hook and
//! position by position, on every golden case (batch 2, YaRN, shared indexers, FP8 and fused
//! experts included), token by token and in chunks; generation streams the prefill's greedy
//! choices and its dump equals a prefill dump of the same tokens.

use std::path::Path;

use glimpse::checkpoint::Checkpoint;
use glimpse::compare::Tolerance;
use glimpse::decode_check::check;
use glimpse::dump::Dump;
use glimpse::hooks::{NoObserver, Recorder, Selector};
use glimpse::model::decode::KvCache;
use glimpse::model::layer::Ffn;
use glimpse::model::stream::LogitRows;
use glimpse::model::Model;
use glimpse::stitch::Stitcher;
use glimpse::verify;

const CASES: [&str; 5] = ["flat", "grouped-shared-yarn", "fp8-sharded", "bf16-fused", "mtp"];

fn load(case: &str) -> (Model, glimpse::model::Tokens) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(case);
    let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
    let tokens = Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
    (model, tokens)
}

/// Absorbed MLA over the latent cache equals the expanded prefill at every hook point and
/// position (DSA selections and routing as sets), one token per call and in chunks of 3.
#[test]
fn decode_equals_prefill_on_every_golden_case() {
    for case in CASES {
        let (model, tokens) = load(case);
        for chunk in [1, 3] {
            let r = check(&model, &tokens, chunk, Tolerance::default(), &[]).unwrap();
            let worst = r.logits_max_abs.iter().cloned().fold(0.0, f64::max);
            println!("{case}, chunk {chunk}: {} tensors, logits max_abs {worst:.3e}", r.results.len());
            let failed: Vec<String> = r.results.iter().filter(|c| !c.ok).map(verify::format_line).collect();
            assert!(r.all_match(), "{case}, chunk {chunk}: {failed:#?}");
            assert_eq!(r.logits_max_abs.len(), tokens.seq);
            // Every layer's selections and routing were compared, not only the logits.
            for name in ["layers.0.dsa.topk", "layers.0.attn.kv_latent", "logits"] {
                assert!(r.results.iter().any(|c| c.name == name), "{case}: {name} not compared");
            }
            let layer = (0..model.layers.len())
                .find(|&i| matches!(model.layers[i].mlp, Ffn::Moe(_)))
                .expect("every golden case has a MoE layer");
            assert!(r.results.iter().any(|c| c.name == format!("layers.{layer}.moe.topk_ids")));
        }
    }
}

/// The decode and prefill records of `case` with a RoPE-offset bug planted in the decode: from
/// position 6 on, the cache believes it holds one position more than it does.
fn with_a_cache_bug(case: &str) -> glimpse::decode_check::DecodeCheck {
    let (model, tokens) = load(case);
    let mut prefill = Recorder::new(Selector::default());
    model.forward(&tokens, &mut prefill).unwrap();
    let mut stitcher = Stitcher::new(Selector::default());
    let mut cache = KvCache::new(model.layers.len());
    for s in 0..tokens.seq {
        if s == 6 {
            cache.len += 1;
        }
        model.decode_step(&tokens.columns(s..s + 1).unwrap(), &mut cache, &mut stitcher).unwrap();
    }
    let (prefill, decode) = (prefill.tensors.into_iter().collect(), stitcher.finish().unwrap().into_iter().collect());
    glimpse::decode_check::compare(&prefill, &decode, tokens.seq, (Tolerance::default(), &[]), &model.config).unwrap()
}

/// The flips the check found in the selection `name`.
fn flips_in<'a>(r: &'a glimpse::decode_check::DecodeCheck, name: &str) -> Vec<&'a glimpse::compare::Flip> {
    glimpse::compare::flips(&r.results).into_iter().filter(|f| f.0 == name).map(|f| f.1).collect()
}

/// Shared-indexer layers (grouped-shared-yarn's 1 and 3) reuse the keys of the full layer before
/// them, so the bug's DSA flips there carry that layer's margins, on both sides.
#[test]
fn decode_check_gives_shared_indexer_flips_their_full_layers_margins() {
    let r = with_a_cache_bug("grouped-shared-yarn");
    let (full, shared) = (flips_in(&r, "layers.2.dsa.topk"), flips_in(&r, "layers.3.dsa.topk"));
    assert!(!shared.is_empty(), "the bug flips layer 3's keys");
    for f in shared {
        let g = full.iter().find(|g| g.row == f.row).unwrap_or_else(|| panic!("{f:?} is not layer 2's"));
        assert!(f.margin_ours.is_some() && f.margin_reference.is_some(), "{f:?}");
        assert_eq!((f.margin_ours, f.margin_reference), (g.margin_ours, g.margin_reference));
    }
}

/// A RoPE-offset bug (the cache believes it holds one position more than it does from position 6
/// on) is caught, and named at position 6 in layer 0's attention.
#[test]
fn decode_check_names_the_first_position_a_cache_bug_changes() {
    let r = with_a_cache_bug("flat");
    let (position, i) = r.first.expect("the bug is caught");
    println!("first difference: position {position}, {}", r.results[i].name);
    assert_eq!(position, 6);
    assert!(r.results[i].name.starts_with("layers.0.") && !r.results[i].name.contains("kv_latent"));
    assert!(r.logits_max_abs[..6].iter().all(|&e| e < 1e-4), "{:?}", r.logits_max_abs);
}

/// A hook point the decode stopped reporting fails the check and is named (it passed, unchecked),
/// as do logits missing on one side.
#[test]
fn decode_check_fails_on_a_hook_point_only_one_run_reported() {
    let (model, tokens) = load("flat");
    let mut prefill = Recorder::new(Selector::default());
    model.forward(&tokens, &mut prefill).unwrap();
    let mut stitcher = Stitcher::new(Selector::default());
    model.decode_all(&tokens, 1, &mut stitcher).unwrap();
    let prefill: std::collections::BTreeMap<_, _> = prefill.tensors.into_iter().collect();
    let mut decode: std::collections::BTreeMap<_, _> = stitcher.finish().unwrap().into_iter().collect();
    let cmp = |decode: &_| {
        glimpse::decode_check::compare(&prefill, decode, tokens.seq, (Tolerance::default(), &[]), &model.config)
            .unwrap()
    };
    assert!(cmp(&decode).all_match());
    let topk = glimpse::hooks::HookPoint::Layer(0, glimpse::hooks::LayerHook::DsaTopk);
    decode.remove(&topk);
    let r = cmp(&decode);
    assert!(r.first.is_none() && !r.all_match());
    assert_eq!(r.one_sided, [vec!["layers.0.dsa.topk".to_string()], vec![]]);
    decode.remove(&glimpse::hooks::HookPoint::Logits);
    let r = cmp(&decode);
    assert!(!r.all_match() && r.logits_max_abs.is_empty());
}

mod common;

#[test]
fn verify_decode_reports_every_position() {
    let (code, text) = common::code_and_text(&["verify", "--decode"]);
    assert_eq!(code, 0, "{text}");
    // The bundled default case: its last position, and its cache size from its config.json (every
    // layer caches kv_lora_rank + qk_rope_head_dim values and, all of its indexers being full,
    // an index_head_dim key; 4 bytes each).
    let (_, tokens) = load("flat");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat/config.json");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir).unwrap()).unwrap();
    let n = |k: &str| cfg[k].as_u64().unwrap();
    let per_token = 4 * n("num_hidden_layers") * (n("kv_lora_rank") + n("qk_rope_head_dim") + n("index_head_dim"));
    let last = format!("position {}", tokens.seq - 1);
    assert!(text.contains(&last) && text.contains("decode matches prefill at every position"), "{text}");
    let cache = format!("cache: {per_token} bytes per token over {} layers", n("num_hidden_layers"));
    assert!(text.contains("layers.4.moe.topk_ids") && text.contains(&cache), "{text}");
    // The reference gives the tokens only: said first, so a port's dump passed as --golden is not
    // taken for checked.
    assert!(
        text.starts_with("verify --decode ") && text.lines().next().unwrap().contains("whose tensors are not compared")
    );
    // The checkpoint's MTP head is not decoded: said.
    assert!(text.contains("(the MTP head, model.layers.5, is not decoded here"), "{text}");
    // Where decode and prefill differ (at no tolerance: the last ulps), the two are named so, not
    // `ours` and `ref` (the reference dump is not compared).
    let (code, text) = common::code_and_text(&["verify", "--decode", "--atol", "0", "--rtol", "0"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(": decode ") && text.contains(" prefill ") && !text.contains(" ref "), "{text}");
    // `--tol` patterns apply hook point by hook point: no tolerance on the logits alone fails
    // them alone; a pattern that matches nothing compared is warned of.
    let (code, text) = common::code_and_text(&["verify", "--decode", "--tol", "logits=0,0", "--tol", "no.such=1,1"]);
    assert_eq!(code, 1, "{text}");
    let failed: Vec<&str> = text.lines().filter(|l| l.contains("MISMATCH")).collect();
    assert!(failed.len() == 1 && failed[0].starts_with("logits "), "{text}");
    assert!(text.contains("--tol no.such matches no tensor compared"), "{text}");
    // A chunk as long as the tokens, or longer, is said as what ran: one call.
    for chunk in [tokens.seq, tokens.seq + 5] {
        let (code, text) = common::code_and_text(&["verify", "--decode", "--chunk", &chunk.to_string()]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains(&format!("all {} positions in one call", tokens.seq)), "--chunk {chunk}: {text}");
    }
}

/// What `generate` streams is the prefill's greedy choice at every position: re-running the
/// prompt plus the generated tokens as one prefill picks the same next token each time.
#[test]
fn generate_agrees_with_greedy_prefill() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/grouped-shared-yarn");
    let prompt = [[5u32, 17, 30, 2, 99, 64], [7, 8, 9, 10, 11, 12]];
    let arg = prompt
        .iter()
        .map(|r| r.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join(";");
    let (code, text) = common::code_and_text(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &arg,
        "--max-new-tokens",
        "6",
    ]);
    assert_eq!(code, 0, "{text}");
    let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
    for (r, row) in prompt.iter().enumerate() {
        let line = text.lines().find(|l| l.starts_with(&format!("row {r}: generated "))).unwrap();
        let generated: Vec<u32> = serde_json::from_str(line.split_once("generated ").unwrap().1).unwrap();
        assert_eq!(generated.len(), 6);
        let mut ids = row.to_vec();
        ids.extend(&generated[..5]);
        let tokens = glimpse::model::Tokens::new(1, ids.len(), ids.clone()).unwrap();
        let logits = model.forward(&tokens, &mut NoObserver).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        for (k, want) in generated.iter().enumerate() {
            let row = &logits[row.len() - 1 + k];
            let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
            assert_eq!(best, *want, "row {r}, generated token {k}");
        }
    }
}

/// `generate --dump` lays its decode steps end to end: the dump equals `run --dump` of the tokens
/// the model ran (the prompt and every generated token but the last), by `diff`.
#[test]
fn generate_dump_equals_a_prefill_dump_of_the_same_tokens() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/grouped-shared-yarn");
    let tmp = std::env::temp_dir().join(format!("glimpse-gen-dump-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (gen, run) = (tmp.join("gen.safetensors"), tmp.join("run.safetensors"));
    let (code, text) = common::code_and_text(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "5,17,30,2,99,64,3;7,8,9,10,11,12,13",
        "--max-new-tokens",
        "5",
        "--chunk",
        "3",
        "--dump",
        gen.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    // The steps' parts went to a file beside the dump, gone once it is written.
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from("gen.safetensors")], "only the dump is left");
    let ids = Dump::open(&gen).unwrap().tokens().unwrap();
    assert_eq!((ids.batch, ids.seq), (2, 7 + 4));
    let arg = (0..2)
        .map(|b| ids.ids[b * ids.seq..(b + 1) * ids.seq].iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","))
        .collect::<Vec<_>>()
        .join(";");
    let (code, text) = common::code_and_text(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        &arg,
        "--dump",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = common::code_and_text(&["diff", gen.to_str().unwrap(), run.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("only in"), "both dumps hold the same names: {text}");

    // With --record naming other points, the dump still holds the tokens it ran (as `run`'s
    // does): `run --tokens-from` reruns them.
    let (code, text) = common::code_and_text(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "5,17,30",
        "--max-new-tokens",
        "3",
        "--record",
        "logits",
        "--dump",
        gen.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let recorded = Dump::open(&gen).unwrap();
    assert_eq!(recorded.names(), ["input_ids", "logits"]);
    assert_eq!(recorded.tokens().unwrap().ids[..3], [5, 17, 30]);
    let (code, text) =
        common::code_and_text(&["run", "--model", dir.to_str().unwrap(), "--tokens-from", gen.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    // A prefill of every token generate printed (its last too) is a run of more positions: said.
    let mut printed: Vec<String> = recorded.tokens().unwrap().ids.iter().map(|t| t.to_string()).collect();
    printed.push("1".into());
    let longer =
        ["run", "--model", dir.to_str().unwrap(), "--tokens", &printed.join(","), "--dump", run.to_str().unwrap()];
    assert_eq!(common::code_and_text(&longer).0, 0);
    let (code, text) = common::code_and_text(&["diff", gen.to_str().unwrap(), run.to_str().unwrap()]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("ours's 5 positions begin the other's: a `generate --dump` holds the positions it ran"),
        "{text}"
    );
    // Further apart, the same tokens run further: no generate to blame.
    printed.push("2".into());
    let longer =
        ["run", "--model", dir.to_str().unwrap(), "--tokens", &printed.join(","), "--dump", run.to_str().unwrap()];
    assert_eq!(common::code_and_text(&longer).0, 0);
    let (_, text) = common::code_and_text(&["diff", gen.to_str().unwrap(), run.to_str().unwrap()]);
    assert!(text.contains("ours's 5 positions begin the other's 7: the same tokens, run further"), "{text}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A prompt prefilled in the expanded form fills the cache so that decoding on from it gives the
/// prefill's logits at every later position (what `generate` does with a whole prompt).
#[test]
fn a_prefilled_cache_decodes_on_like_the_prefill() {
    for case in CASES {
        let (model, tokens) = load(case);
        let full = model.forward(&tokens, &mut NoObserver).unwrap(); // [B, S, V]
        let p = tokens.seq - 3;
        let mut cache = KvCache::new(model.layers.len());
        let (_, head) =
            model.prefill_into(&tokens.columns(0..p).unwrap(), &mut cache, LogitRows::All, &mut NoObserver).unwrap();
        let mut got = vec![head];
        for s in p..tokens.seq {
            got.push(model.decode_step(&tokens.columns(s..s + 1).unwrap(), &mut cache, &mut NoObserver).unwrap());
        }
        let got = candle_core::Tensor::cat(&got, 1).unwrap();
        let err = (got - &full).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        println!("{case}: prefill {p} + decode 3: logits max_abs {err:.3e}");
        assert!(err < 1e-4, "{case}: {err}");
    }
}
