//! The device forward pass (`device::forward`, the orchestration the CUDA backend runs) on the
//! CPU implementation of its ops: every golden case matches its transformers reference at the
//! spec's tolerance, every hook point of the main forward compared. On a GPU the same code runs
//! on the CUDA ops (`glimpse selftest --device cuda`).

use std::path::Path;

use glimpse::checkpoint::Checkpoint;
use glimpse::compare::Tolerance;
use glimpse::device::cpu::CpuOps;
use glimpse::device::forward::DeviceModel;
use glimpse::dump::Dump;
use glimpse::model::Model;
use glimpse::verify::{format_line, Verifier};

#[test]
fn the_device_forward_on_cpu_ops_matches_every_golden_case() {
    for case in ["flat", "grouped-shared-yarn", "fp8-sharded", "bf16-fused", "mtp"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(case);
        let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
        let golden = Dump::open(&dir.join("reference.safetensors")).unwrap();
        let device = DeviceModel::new(&CpuOps, &model).unwrap();
        let mut v = Verifier::new(&golden, Tolerance::default());
        device.forward(&golden.tokens().unwrap(), &mut v).unwrap();
        let bad: Vec<String> = v.results.iter().filter(|c| !c.ok).map(format_line).collect();
        assert!(bad.is_empty(), "{case}:\n{}", bad.join("\n"));
        let produced: Vec<&str> = v.results.iter().map(|c| c.name.as_str()).collect();
        let n = model.layers.len();
        let missing: Vec<String> = golden
            .names()
            .into_iter()
            .filter(|name| !produced.contains(&name.as_str()))
            .filter(|name| !name.starts_with("mtp.") && !name.starts_with(&format!("layers.{n}.")))
            .collect();
        assert!(missing.is_empty(), "{case}: not produced: {missing:?}");
        println!("{case}: {} tensors match", v.results.len());
    }
}
