//! `glimpse selftest`: what a user runs to trust this machine. On the CPU it verifies every
//! bundled golden case (normal and isolated layers, the MTP head where the case has one); with
//! `--device cuda` it first opens the GPU, compiles every kernel for it with NVRTC and checks each
//! one against its CPU reference (`cuda::selftest`), then also runs every golden case through
//! the device forward pass on the GPU.

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
    let gpu = match device {
        Device::Cuda => {
            let (gpu, kernels_ok) = cuda(ordinal)?;
            ok &= kernels_ok;
            Some(gpu)
        }
        Device::Cpu => None,
    };
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
            println!("{}", verdict(&case, if isolate { "cpu, --isolate" } else { "cpu" }, &r, pass));
        }
        if let Some(gpu) = &gpu {
            let r = on_gpu(gpu, &model, &golden)?;
            let pass = r.all_match() && r.only_in_reference.is_empty();
            ok &= pass;
            println!("{}", verdict(&case, "cuda", &r, pass));
        }
    }
    Ok(ok)
}

fn verdict(case: &Path, how: &str, r: &verify::Report, pass: bool) -> String {
    let first = r.results.iter().find(|c| !c.ok).map(|c| format!("; first mismatch {}", c.name)).unwrap_or_default();
    format!(
        "verify {} ({how}): {} of {} tensors match{first}{}",
        case.display(),
        r.results.len() - r.mismatches(),
        r.results.len(),
        if pass { "" } else { "  FAILED" }
    )
}

/// The GPU's ops, once its kernels passed or failed their parity checks.
#[cfg(feature = "cuda")]
type Gpu = crate::cuda::ops::CudaOps;
#[cfg(not(feature = "cuda"))]
type Gpu = ();

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<(Gpu, bool)> {
    let gpu = crate::cuda::gpu::Gpu::open(ordinal)?;
    println!("device {ordinal}: {} ({}); every kernel compiled with NVRTC", gpu.name, gpu.arch);
    let mut checks = crate::cuda::selftest::kernels(&gpu)?;
    let ops = crate::cuda::ops::CudaOps::new(gpu)?;
    checks.extend(crate::cuda::selftest::products(&ops)?);
    for c in &checks {
        println!("kernel {:<40} max_abs {:9.3e}  {}", c.name, c.max_abs, if c.ok { "ok" } else { "FAILED" });
    }
    Ok((ops, checks.iter().all(|c| c.ok)))
}

#[cfg(feature = "cuda")]
fn on_gpu(gpu: &Gpu, model: &Model, golden: &Dump) -> Result<verify::Report> {
    verify::verify_on_device(gpu, model, golden, Tolerance::default())
}

/// `verify --device cuda`: the reference dump's tokens through the device forward pass on GPU
/// `ordinal`, compared like `verify`.
#[cfg(feature = "cuda")]
pub fn verify_cuda(model: &Model, golden: &Dump, tol: Tolerance, ordinal: usize) -> Result<verify::Report> {
    let ops = crate::cuda::ops::CudaOps::new(crate::cuda::gpu::Gpu::open(ordinal)?)?;
    verify::verify_on_device(&ops, model, golden, tol)
}

/// `bench --device cuda`: prefill timings of the device forward pass on GPU `ordinal`, with the
/// device memory in use after them.
#[cfg(feature = "cuda")]
pub fn bench_cuda(model: &Model, tokens: usize, repeat: usize, ordinal: usize) -> Result<String> {
    let gpu = crate::cuda::gpu::Gpu::open(ordinal)?;
    let head = format!("device {ordinal}: {} ({})\n", gpu.name, gpu.arch);
    let ops = crate::cuda::ops::CudaOps::new(gpu)?;
    let report = crate::bench::run_device(&ops, model, tokens, repeat)?;
    let (free, total) = ops.gpu.memory()?;
    Ok(format!(
        "{head}{}device memory in use: {:.2} GB of {:.2} GB\n",
        report.render(),
        (total - free) as f64 / 1e9,
        total as f64 / 1e9
    ))
}

#[cfg(not(feature = "cuda"))]
pub fn bench_cuda(_: &Model, _: usize, _: usize, _: usize) -> Result<String> {
    cuda(0).map(|_| unreachable!("cuda() always fails without the feature"))
}

#[cfg(not(feature = "cuda"))]
pub fn verify_cuda(_: &Model, _: &Dump, _: Tolerance, _: usize) -> Result<verify::Report> {
    cuda(0).map(|_| unreachable!("cuda() always fails without the feature"))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> Result<(Gpu, bool)> {
    Err(Error::Device(
        "this glimpse was built without the `cuda` feature: cargo build --release --features cuda".into(),
    ))
}

#[cfg(not(feature = "cuda"))]
fn on_gpu(_: &Gpu, _: &Model, _: &Dump) -> Result<verify::Report> {
    Err(Error::Device("built without the `cuda` feature".into()))
}
