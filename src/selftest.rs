//! `glimpse selftest`: what a user runs to trust this machine. On the CPU it verifies every
//! bundled golden case (normal and isolated layers, the MTP head where the case has one); with
//! `--device cuda` it first opens the GPU, compiles every kernel for it with NVRTC and checks each
//! one against its CPU reference (`cuda::selftest`).

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::compare::Tolerance;
use crate::dump::Dump;
use crate::error::{Error, Result};
use crate::model::mtp::Mtp;
use crate::model::Model;
use crate::verify;

/// Where tensor kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

/// Prints one line per check; returns whether all passed.
pub fn run(golden_root: &Path, device: Device, ordinal: usize) -> Result<bool> {
    let mut ok = true;
    if device == Device::Cuda {
        ok &= cuda(ordinal)?;
    }
    let mut cases: Vec<_> = std::fs::read_dir(golden_root)
        .map_err(|e| Error::io(golden_root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.safetensors").is_file())
        .collect();
    cases.sort();
    for case in cases {
        let ckpt = Checkpoint::open(&case)?;
        let model = Model::load(&ckpt)?;
        let golden = Dump::open(&case.join("reference.safetensors"))?;
        for isolate in [false, true] {
            let mut r = verify::verify(&model, &golden, Tolerance::default(), isolate)?;
            if verify::has_mtp(&golden) {
                verify::verify_mtp(&model, &Mtp::load(&ckpt)?, &golden, Tolerance::default(), &mut r)?;
            }
            let pass = r.all_match() && r.only_in_reference.is_empty();
            ok &= pass;
            println!(
                "verify {}{} (cpu): {} of {} tensors match{}",
                case.display(),
                if isolate { " --isolate" } else { "" },
                r.results.len() - r.mismatches(),
                r.results.len(),
                if pass { "" } else { "  FAILED" }
            );
        }
    }
    Ok(ok)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<bool> {
    let gpu = crate::cuda::gpu::Gpu::open(ordinal)?;
    println!("device {ordinal}: {} ({}); every kernel compiled with NVRTC", gpu.name, gpu.arch);
    let checks = crate::cuda::selftest::kernels(&gpu)?;
    for c in &checks {
        println!("kernel {:<40} max_abs {:9.3e}  {}", c.name, c.max_abs, if c.ok { "ok" } else { "FAILED" });
    }
    println!("the forward pass does not run on the GPU yet: the golden cases below are verified on the CPU");
    Ok(checks.iter().all(|c| c.ok))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> Result<bool> {
    Err(Error::Device(
        "this glimpse was built without the `cuda` feature: cargo build --release --features cuda".into(),
    ))
}
