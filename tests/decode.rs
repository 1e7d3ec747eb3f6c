//! Decode with the latent cache and absorbed MLA equals the expanded prefill, position by
//! position, on every golden case (batch 2, YaRN, shared indexers, FP8 and fused experts included).

use std::path::Path;

use glimpse::checkpoint::Checkpoint;
use glimpse::compare::{compare_floats, Detail, Tolerance};
use glimpse::dump::Dump;
use glimpse::hooks::NoObserver;
use glimpse::model::Model;

#[test]
fn decode_equals_prefill_on_every_golden_case() {
    for case in ["flat", "grouped-shared-yarn", "fp8-sharded", "bf16-fused"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(case);
        let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
        let tokens = Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
        let prefill = model.forward(&tokens, &mut NoObserver).unwrap();
        let decoded = model.decode_all(&tokens).unwrap();
        assert_eq!(prefill.dims(), decoded.dims());
        let (p, d) = (
            prefill.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            decoded.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let (ok, detail) = compare_floats(&d, &p, prefill.dims(), Tolerance::default());
        let Detail::Float { max_abs, worst_at, .. } = &detail else { unreachable!() };
        println!("{case}: decode vs prefill logits max_abs {max_abs:.3e} (worst at {worst_at:?})");
        assert!(ok, "{case}: {detail:?}");
    }
}

mod common;

#[test]
fn verify_decode_reports_every_position() {
    let (code, text) = common::code_and_text(&["verify", "--decode"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("position 31") && text.contains("decode matches prefill at every position"), "{text}");
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
