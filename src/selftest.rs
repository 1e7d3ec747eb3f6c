//! `glimpse selftest`: what a user runs to trust this machine. It verifies every bundled golden
//! case on the CPU (normal and isolated layers, the MTP head where the case has one), and with
//! `--device cpu-ops` or `--device cuda` also through the device forward pass (`crate::device`)
//! on that backend, whole and with its layers streamed (`--stream`). For `cuda` it first opens
//! the GPU, compiles every kernel for it with NVRTC and checks each one, and the cuBLAS products,
//! against their CPU references (`cuda::selftest`); `cuda-emu` does the same with the kernels'
//! source run on the host (`cuda::emu`).

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::compare::Tolerance;
use crate::device::forward::DeviceModel;
use crate::device::{cpu::CpuOps, Backend, Ops, Target};
use crate::dump::Dump;
use crate::error::{Error, Result};
use crate::model::mtp::Mtp;
use crate::model::{Model, Weights};
use crate::verify::{self, VerifyOptions};

/// What a selftest covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The kernels and products (with a CUDA backend), then every golden case.
    All,
    /// The kernels and products only (`--kernels-only`; a CUDA backend).
    Kernels,
}

/// Prints one line per check; returns whether all passed. Each golden case is refused before it
/// loads when its run would hold more than `max` (`--max-memory`; default: available memory).
pub fn run(golden_root: &Path, target: Target, scope: Scope, max: Option<u64>) -> Result<bool> {
    let cases = |device: &mut dyn FnMut(Case) -> Result<bool>| cases(golden_root, target, max, device);
    match (target.backend, scope) {
        (Backend::Cpu | Backend::CpuOps, Scope::Kernels) => {
            Err(Error::Usage("--kernels-only needs --device cuda or cuda-emu".into()))
        }
        (Backend::Cpu, Scope::All) => cases(&mut |_| Ok(true)),
        (Backend::CpuOps, Scope::All) => cases(&mut |case| {
            let whole = device_case(&CpuOps, "cpu-ops", case, case.golden, &VerifyOptions::default())?;
            // (`&`, not `&&`: both run.)
            Ok(whole & streamed_case(&CpuOps, "cpu-ops", (case.dir, case.golden))?)
        }),
        (Backend::Cuda | Backend::CudaEmu, _) => cuda(target, scope, &cases),
    }
}

/// Every golden case on the CPU (normal and isolated, with the MTP head), then `device`'s checks
/// of the case (on `target`, whose host copies the memory check counts).
fn cases(
    golden_root: &Path,
    target: Target,
    max: Option<u64>,
    device: &mut dyn FnMut(Case) -> Result<bool>,
) -> Result<bool> {
    let mut cases: Vec<_> = std::fs::read_dir(golden_root)
        .map_err(|e| Error::io(golden_root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.safetensors").is_file())
        .collect();
    cases.sort();
    if cases.is_empty() {
        return Err(Error::Usage(format!(
            "no golden cases under {} (folders holding reference.safetensors): nothing to check",
            golden_root.display()
        )));
    }
    println!("golden cases under {}: {}", golden_root.display(), cases.len());
    let mut ok = true;
    for case in cases {
        let ckpt = Checkpoint::open(&case)?;
        let golden = Dump::open(&case.join("reference.safetensors"))?;
        let tokens = golden.tokens()?;
        crate::memory::check_run(
            &ckpt,
            (tokens.batch, tokens.seq),
            crate::memory::Recording::Nothing,
            (target, crate::memory::Residency::Whole, verify::has_mtp(&golden)),
            max,
            "a machine with more memory",
        )
        .map_err(|e| Error::Usage(format!("{}: {e}", case.display())))?;
        let model = Model::load(&ckpt)?;
        let mtp = if verify::has_mtp(&golden) { Some(Mtp::load(&ckpt)?) } else { None };
        for isolate in [false, true] {
            let mut r = verify::verify(&model, &golden, Tolerance::default(), isolate)?;
            if let Some(mtp) = &mtp {
                verify::verify_mtp(&model, (&model.config, mtp), &golden, &VerifyOptions::default(), &mut r)?;
            }
            ok &= report(&case, if isolate { "cpu, --isolate" } else { "cpu" }, &r);
        }
        ok &= device(Case { dir: &case, model: &model, mtp: mtp.as_ref(), golden: &golden })?;
    }
    Ok(ok)
}

/// A golden case, loaded: its folder, model, MTP head (where its reference checks one) and
/// reference.
#[derive(Clone, Copy)]
struct Case<'a> {
    dir: &'a Path,
    model: &'a Model,
    mtp: Option<&'a Mtp>,
    golden: &'a Dump,
}

/// One case through the device forward pass on `ops` (its MTP head too, where `reference`
/// checks it), compared with `reference`.
fn device_run<O: Ops>(ops: &O, case: Case, reference: &Dump, opts: &VerifyOptions) -> Result<verify::Report> {
    let device = DeviceModel::new(ops, case.model)?;
    let mut r = verify::verify_prefill(&device, Weights::Resident(case.model), reference, opts)?;
    if let Some(mtp) = case.mtp.filter(|_| verify::has_mtp(reference)) {
        verify::verify_mtp(&device, (&case.model.config, mtp), reference, opts, &mut r)?;
    }
    Ok(r)
}

/// [`device_run`], its verdict printed as `name`'s; whether it passed.
fn device_case<O: Ops>(ops: &O, name: &str, case: Case, reference: &Dump, opts: &VerifyOptions) -> Result<bool> {
    Ok(report(case.dir, name, &device_run(ops, case, reference, opts)?))
}

/// A case through the device forward pass on `ops` with its layers streamed from the checkpoint
/// (`--stream`: one layer on the device at a time), compared with `reference` at the spec's
/// tolerance, its verdict printed as `name`'s with `--stream`; whether it passed.
fn streamed_case<O: Ops>(ops: &O, name: &str, (case, reference): (&Path, &Dump)) -> Result<bool> {
    let ckpt = Checkpoint::open(case)?;
    let device = DeviceModel::streamed(ops, &ckpt);
    let r = verify::verify_prefill(&device, Weights::Streamed(&ckpt), reference, &VerifyOptions::default())?;
    Ok(report(case, &format!("{name}, --stream"), &r))
}

/// Prints a case's verdict; whether it passed (every tensor matched, none missing).
fn report(case: &Path, how: &str, r: &verify::Report) -> bool {
    let pass = r.all_match() && r.only_in_reference.is_empty() && r.unchecked.is_empty();
    let mut first = r.first_mismatch().map(|c| format!("; first mismatch {}", c.name)).unwrap_or_default();
    // Why a case whose tensors all match fails: what was not compared.
    for (n, what) in [(r.only_in_reference.len(), "not produced"), (r.unchecked.len(), "not in the reference")] {
        if n > 0 {
            first += &format!("; {n} hook point(s) {what}");
        }
    }
    println!(
        "verify {} ({how}): {} of {} tensors match{first}{}",
        case.display(),
        r.results.len() - r.mismatches(),
        r.results.len(),
        if pass { "" } else { "  FAILED" }
    );
    pass
}

/// Every golden case with a device check of its own (`cases` above, `golden_root` and `max`
/// given).
type Cases<'a> = &'a dyn Fn(&mut dyn FnMut(Case) -> Result<bool>) -> Result<bool>;

/// The kernels and products in both precisions, then every golden case through the device
/// forward pass in both, whatever `--precision` says:
/// - f32 against the transformers reference at the spec's tolerance;
/// - bf16 against transformers' run with bf16 products (`reference-bf16.safetensors`: every
///   linear's input and weight, and the attention's q, k, probabilities and v, rounded to bf16,
///   f32 accumulation) at atol = rtol = 2e-2, on the default attention and on the fused one,
///   every layer isolated and its decisions replayed: that run has near-ties below bf16's
///   resolution (its own margins, recorded in the dump, go down to 2e-5), and the same roundings summed in
///   another order can round an activation to the neighbouring bf16 value (one ulp is 2^-8),
///   which flips such a tie when fed on;
/// - and, measured, not judged, bf16 against the f32 reference the same way: on these toy random
///   models bf16 rounding alone moves single-layer outputs by up to a few 1e-2.
#[cfg(feature = "cuda")]
fn cuda(target: Target, scope: Scope, cases: Cases) -> Result<bool> {
    use crate::cuda::attention::{AttentionPath, AttentionPlan};
    use crate::device::{Attention, Precision};
    use crate::verify::Replay;
    // Every attention path is checked here, whatever --attention says.
    let in_precision = |precision| crate::device::cuda_ops(Target { precision, attention: Attention::Auto, ..target });
    let (f32_ops, bf16_ops) = (in_precision(Precision::F32)?, in_precision(Precision::Bf16)?);
    for ops in [&f32_ops, &bf16_ops] {
        ops.gpu.poison_outputs(Some(f32::NAN));
    }
    let gpu = &f32_ops.gpu;
    match target.backend {
        Backend::CudaEmu => println!("{}: the kernels' source compiled for the host", gpu.name),
        _ => {
            println!("device {}: {}; every kernel compiled with NVRTC", target.ordinal, gpu.summary());
            println!("kernels: {}", crate::cuda::resources::describe(&gpu.kernels));
        }
    }
    use crate::cuda::selftest as check;
    // Each group's verdicts as it ends: a group that fails to run (a launch or cuBLAS error) is
    // one FAILED line with its error, and the groups after it still run.
    let show = |group: &str, checks: Result<Vec<check::Check>>| match checks {
        Ok(checks) => {
            for c in &checks {
                println!("kernel {:<60} max_abs {:9.3e}  {}", c.name, c.max_abs, if c.ok { "ok" } else { "FAILED" });
            }
            checks.iter().all(|c| c.ok)
        }
        Err(e) => {
            println!("kernel {:<60} max_abs {:>9}  FAILED", format!("{group}: did not run"), "-");
            println!("  {group}: {e}");
            false
        }
    };
    let kernels_ok = [
        show("kernels", check::kernels(gpu)),
        show("MoE dispatch", check::dispatch(&f32_ops)),
        show("attention (f32)", check::attention(&f32_ops)),
        show("attention (bf16)", check::attention(&bf16_ops)),
        show("GLM-5 sizes", check::at_glm5_sizes(&f32_ops, &bf16_ops)),
        show("products (f32)", check::products(&f32_ops)),
        show("products (bf16)", check::products(&bf16_ops)),
    ]
    .iter()
    .all(|&ok| ok);
    // A kernel no check launched is not checked at all (the golden cases below launch more).
    let launched: std::collections::BTreeSet<&str> =
        f32_ops.gpu.launched().into_iter().chain(bf16_ops.gpu.launched()).collect();
    let (missed, all) = (check::unlaunched(&launched), check::kernel_names().count());
    let name = format!("every kernel launched by a check ({} of {all})", all - missed.len());
    println!("kernel {name:<60} max_abs {:>9}  {}", "-", if missed.is_empty() { "ok" } else { "FAILED" });
    if !missed.is_empty() {
        println!("  not launched: {}", missed.join(", "));
    }
    let kernels_ok = kernels_ok && missed.is_empty();
    if scope == Scope::Kernels {
        return Ok(kernels_ok);
    }
    let named = |precision, attention| Target { precision, attention, ..target }.describe();
    let (f32_name, bf16_name) = (named(Precision::F32, Attention::Auto), named(Precision::Bf16, Attention::Auto));
    let fused_name = named(Precision::Bf16, Attention::Fused);
    let fused = AttentionPlan { path: Some(AttentionPath::Fused), ..Default::default() };
    let isolated = VerifyOptions {
        tol: Precision::Bf16.tolerance(),
        isolate: true,
        replay: Replay { routing: true, selection: true },
        ..Default::default()
    };
    // A run that fails with an error (a launch refused, cuBLAS) is a FAILED line, and the runs
    // after it still go: one error must not leave the later cases unchecked on a GPU session.
    let verdict = |case: Case, how: &str, run: Result<bool>| {
        run.unwrap_or_else(|e| {
            println!("verify {} ({how}): error: {e}  FAILED", case.dir.display());
            false
        })
    };
    let cases_ok = cases(&mut |case| {
        // (Each verdict printed as its run ends.)
        let whole = verdict(case, &f32_name, device_case(&f32_ops, &f32_name, case, case.golden, &Default::default()));
        let streamed = verdict(case, &f32_name, streamed_case(&f32_ops, &f32_name, (case.dir, case.golden)));
        let f32_ok = whole && streamed;
        let path = case.dir.join(crate::device::BF16_REFERENCE);
        let bf16_ok = if !path.is_file() {
            println!("verify {} ({bf16_name}): no {}  FAILED", case.dir.display(), crate::device::BF16_REFERENCE);
            false
        } else {
            // On the default path (masked at these sizes), then on the fused one.
            let reference = Dump::open(&path)?;
            let mut ok = true;
            for (name, plan) in [(&bf16_name, AttentionPlan::default()), (&fused_name, fused)] {
                bf16_ops.set_attention(plan);
                let name = format!("{name} vs transformers with bf16 products, isolated, decisions replayed");
                ok &= verdict(case, &name, device_case(&bf16_ops, &name, case, &reference, &isolated));
            }
            bf16_ops.set_attention(AttentionPlan::default());
            ok
        };
        let measured = format!("{bf16_name} vs transformers in f32, isolated, decisions replayed");
        match device_run(&bf16_ops, case, case.golden, &isolated) {
            Ok(r) => {
                let worst = r.results.iter().filter_map(|c| c.detail.max_abs()).fold(0f64, f64::max);
                println!(
                    "measure {} ({measured}): max abs diff {worst:.2e}, {} of {} tensors within 2e-2",
                    case.dir.display(),
                    r.results.len() - r.mismatches(),
                    r.results.len()
                );
            }
            Err(e) => println!("measure {} ({measured}): error: {e}", case.dir.display()),
        }
        Ok(f32_ok && bf16_ok)
    })?;
    Ok(cases_ok && kernels_ok)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: Target, _: Scope, _: Cases) -> Result<bool> {
    Err(crate::device::no_cuda())
}
