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
