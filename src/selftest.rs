//! `glimpse selftest`: what a user runs to trust this machine. It verifies every bundled golden
//! case on the CPU (normal and isolated layers, the MTP head where the case has one), and with
//! `--device cpu-ops` or `--device cuda` also through the device forward pass (`crate::device`)
//! on that backend. For `cuda` it first opens the GPU, compiles every kernel for it with NVRTC
//! and checks each one, and the cuBLAS products, against their CPU references (`cuda::selftest`);
//! `cuda-emu` does the same with the kernels' source run on the host (`cuda::emu`).

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::compare::Tolerance;
use crate::device::forward::DeviceModel;
use crate::device::{cpu::CpuOps, Backend, Ops};
use crate::dump::Dump;
use crate::error::{Error, Result};
use crate::model::mtp::Mtp;
use crate::model::Model;
use crate::verify;

/// Prints one line per check; returns whether all passed.
pub fn run(golden_root: &Path, backend: Backend, ordinal: usize) -> Result<bool> {
    match backend {
        Backend::Cpu => cases(golden_root, None::<(&CpuOps, &str)>),
        Backend::CpuOps => cases(golden_root, Some((&CpuOps, "cpu-ops"))),
        Backend::Cuda | Backend::CudaEmu => cuda(golden_root, backend, ordinal),
    }
}

/// Every golden case on the CPU, and through the device forward pass on `device` when given.
fn cases<O: Ops>(golden_root: &Path, device: Option<(&O, &str)>) -> Result<bool> {
    let mut cases: Vec<_> = std::fs::read_dir(golden_root)
        .map_err(|e| Error::io(golden_root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.safetensors").is_file())
        .collect();
    cases.sort();
    let mut ok = true;
    for case in cases {
        let ckpt = Checkpoint::open(&case)?;
        let model = Model::load(&ckpt)?;
        let golden = Dump::open(&case.join("reference.safetensors"))?;
        let mtp = if verify::has_mtp(&golden) { Some(Mtp::load(&ckpt)?) } else { None };
        for isolate in [false, true] {
            let mut r = verify::verify(&model, &golden, Tolerance::default(), isolate)?;
            if let Some(mtp) = &mtp {
                verify::verify_mtp(&model, mtp, &golden, Tolerance::default(), &mut r)?;
            }
            ok &= report(&case, if isolate { "cpu, --isolate" } else { "cpu" }, &r);
        }
        if let Some((ops, name)) = device {
            let device = DeviceModel::new(ops, &model)?;
            let r = verify::verify_prefill(&device, model.layers.len(), &golden, Tolerance::default())?;
            ok &= report(&case, name, &r);
        }
    }
    Ok(ok)
}

/// Prints a case's verdict; whether it passed (every tensor matched, none missing).
fn report(case: &Path, how: &str, r: &verify::Report) -> bool {
    let pass = r.all_match() && r.only_in_reference.is_empty();
    let first = r.results.iter().find(|c| !c.ok).map(|c| format!("; first mismatch {}", c.name)).unwrap_or_default();
    println!(
        "verify {} ({how}): {} of {} tensors match{first}{}",
        case.display(),
        r.results.len() - r.mismatches(),
        r.results.len(),
        if pass { "" } else { "  FAILED" }
    );
    pass
}

#[cfg(feature = "cuda")]
fn cuda(golden_root: &Path, backend: Backend, ordinal: usize) -> Result<bool> {
    let gpu = crate::device::open_gpu(backend, ordinal)?;
    match backend {
        Backend::CudaEmu => println!("{}: the kernels' source compiled for the host", gpu.name),
        _ => println!("device {ordinal}: {} ({}); every kernel compiled with NVRTC", gpu.name, gpu.arch),
    }
    let mut checks = crate::cuda::selftest::kernels(&gpu)?;
    let ops = crate::cuda::ops::CudaOps::new(gpu)?;
    checks.extend(crate::cuda::selftest::products(&ops)?);
    for c in &checks {
        println!("kernel {:<40} max_abs {:9.3e}  {}", c.name, c.max_abs, if c.ok { "ok" } else { "FAILED" });
    }
    let kernels_ok = checks.iter().all(|c| c.ok);
    let name = if backend == Backend::CudaEmu { "cuda-emu" } else { "cuda" };
    Ok(cases(golden_root, Some((&ops, name)))? && kernels_ok)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &Path, _: Backend, _: usize) -> Result<bool> {
    Err(crate::device::no_cuda())
}
