//! The parity tests on a real GPU, for a machine that has one and builds with `--features cuda`:
//! every kernel and the products in both precisions against their CPU references, and the device
//! forward pass on every golden case (f32 against transformers at the spec's tolerance, bf16
//! against transformers with bf16 products at 2e-2), through `glimpse selftest --device cuda`.
//! Without a GPU (CI, this project's build machines) each test prints why it skipped; the same
//! checks run there on the kernels' host emulation (`tests/cuda_emu.rs`), and on the GPU machine
//! through the carried binary (`scripts/gpu-check.sh`), where nothing is compiled.
#![cfg(feature = "cuda")]

mod common;

use common::all_pass;
use glimpse::cuda::gpu::Gpu;
use glimpse::cuda::ops::CudaOps;
use glimpse::cuda::selftest::{attention, dispatch, kernels, products};
use glimpse::cuda::{probe, Lib};
use glimpse::device::Precision;

/// GPU 0, or a printed reason to skip: no NVIDIA driver, or no device. Any other failure to open
/// it (NVRTC missing, a kernel that does not compile or load) fails the test, as does any skip
/// with `GLIMPSE_REQUIRE_GPU` set.
fn gpu_or_skip() -> Option<Gpu> {
    let why = match probe(&[Lib::Driver]).map(|()| Gpu::open(0)) {
        Ok(Ok(gpu)) => return Some(gpu),
        Err(e) => e.to_string(),
        Ok(Err(e)) if e.to_string().contains("NO_DEVICE") => e.to_string(),
        Ok(Err(e)) => panic!("a CUDA driver is here but GPU 0 does not open: {e}"),
    };
    assert!(std::env::var_os("GLIMPSE_REQUIRE_GPU").is_none(), "GLIMPSE_REQUIRE_GPU is set: {why}");
    println!("skipped: no GPU to test on ({why})");
    None
}

#[test]
fn every_kernel_and_product_matches_its_cpu_reference_on_the_gpu() {
    let Some(gpu) = gpu_or_skip() else { return };
    println!("{} ({})", gpu.name, gpu.arch);
    all_pass(&kernels(&gpu).unwrap());
    for precision in [Precision::F32, Precision::Bf16] {
        let ops = CudaOps::new(Gpu::open(0).unwrap(), precision).unwrap();
        all_pass(&dispatch(&ops).unwrap());
        all_pass(&attention(&ops).unwrap());
        all_pass(&products(&ops).unwrap());
    }
}

#[test]
fn selftest_on_the_gpu_passes_every_golden_case_in_both_precisions() {
    if gpu_or_skip().is_none() {
        return;
    }
    let (code, text) = common::code_and_text(&["selftest", "--device", "cuda"]);
    println!("{text}");
    assert_eq!(code, 0);
    let verdicts = |what: &str| text.lines().filter(|l| l.starts_with("verify ") && l.contains(what)).count();
    assert_eq!(verdicts("(cuda (GPU 0), float32)"), common::GOLDEN_CASES.len());
    assert_eq!(verdicts("(cuda (GPU 0), float32, --stream)"), common::GOLDEN_CASES.len());
    // The masked attention's and the fused one's.
    assert_eq!(verdicts("vs transformers with bf16 products"), 2 * common::GOLDEN_CASES.len());
    assert_eq!(verdicts("fused attention vs transformers with bf16 products"), common::GOLDEN_CASES.len());
    assert!(!text.contains("FAILED"));
}
