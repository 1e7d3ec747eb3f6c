//! The device forward pass (`device::forward`, the orchestration the CUDA backend runs) on the
//! CPU implementation of its ops: every golden case matches its transformers reference at the
//! spec's tolerance, every hook point of the main forward compared. On a GPU the same code runs
//! on the CUDA ops (`glimpse selftest --device cuda`).

use std::path::Path;

use glimpse::checkpoint::Checkpoint;
use glimpse::compare::Tolerance;
use glimpse::device::cpu::CpuOps;
use glimpse::dump::Dump;
use glimpse::model::Model;
use glimpse::verify::{format_line, verify_on_device};

#[test]
fn the_device_forward_on_cpu_ops_matches_every_golden_case() {
    for case in ["flat", "grouped-shared-yarn", "fp8-sharded", "bf16-fused", "mtp"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(case);
        let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
        let golden = Dump::open(&dir.join("reference.safetensors")).unwrap();
        let r = verify_on_device(&CpuOps, &model, &golden, Tolerance::default()).unwrap();
        let bad: Vec<String> = r.results.iter().filter(|c| !c.ok).map(format_line).collect();
        assert!(bad.is_empty(), "{case}:\n{}", bad.join("\n"));
        assert!(r.only_in_reference.is_empty(), "{case}: not produced: {:?}", r.only_in_reference);
        assert!(
            r.results.iter().any(|c| c.name == "layers.1.dsa.topk") && r.results.iter().any(|c| c.name == "logits")
        );
        println!("{case}: {} tensors match", r.results.len());
    }
}
