//! Every CUDA kernel compiles with NVRTC, on any machine that has NVRTC (no GPU needed): CI
//! installs it from pip's `nvidia-cuda-nvrtc` wheel and sets `GLIMPSE_REQUIRE_NVRTC=1`, so a
//! kernel that does not compile fails CI. Elsewhere, without NVRTC, the test says why it skipped.
//! The kernels' parity checks run on their host emulation in `tests/cuda_emu.rs`, and on a GPU
//! through `glimpse selftest --device cuda`, run by `scripts/gpu-check.sh`.
#![cfg(feature = "cuda")]

use glimpse::cuda::resources::{check_block, largest_block, read_cubin, threads_allowed};
use glimpse::cuda::{compile, probe, source, Lib, KERNELS};

/// NVRTC present, or a printed reason to skip (a failure when CI requires it).
fn nvrtc_or_skip() -> bool {
    match probe(&[Lib::Nvrtc]) {
        Ok(()) => true,
        Err(e) if std::env::var_os("GLIMPSE_REQUIRE_NVRTC").is_some() => panic!("GLIMPSE_REQUIRE_NVRTC is set: {e}"),
        Err(e) => {
            println!("skipped: {e}");
            false
        }
    }
}

#[test]
fn every_kernel_compiles_for_hopper_and_ampere() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ["sm_90", "sm_80"] {
        for (file, _, kernels) in KERNELS {
            let compiled = compile(file, &source(file).unwrap(), arch).unwrap_or_else(|e| panic!("{e}"));
            // The machine code the GPU loads: an ELF image naming every kernel.
            assert!(
                compiled.cubin.starts_with(b"\x7fELF"),
                "{file}.cu for {arch}: the machine code is not an ELF image"
            );
            for k in *kernels {
                assert!(compiled.ptx.contains(&format!(".entry {k}(")), "{file}.cu for {arch}: no entry point `{k}`");
                let symbol = [b"\0", k.as_bytes(), b"\0"].concat(); // the whole name in the string table
                assert!(
                    compiled.cubin.windows(symbol.len()).any(|w| w == symbol.as_slice()),
                    "{file}.cu for {arch}: `{k}` is not in the machine code"
                );
            }
            println!(
                "{file}.cu compiles for {arch}: {} kernels, {} bytes of PTX, {} bytes of machine code",
                kernels.len(),
                compiled.ptx.len(),
                compiled.cubin.len()
            );
            // What each kernel takes of an SM, from the machine code: its largest launch fits.
            let usages = read_cubin(&compiled.cubin).unwrap_or_else(|e| panic!("{file}.cu for {arch}: {e}"));
            for k in *kernels {
                let usage = usages.get(*k).unwrap_or_else(|| panic!("{file}.cu for {arch}: no resources for `{k}`"));
                assert!((1..=255).contains(&usage.registers), "{file}.cu for {arch}: {k}: {usage:?}");
                let block = largest_block(k).unwrap_or_else(|| panic!("{k} has no largest block"));
                check_block(k, *usage, block).unwrap_or_else(|e| panic!("{file}.cu for {arch}: {e}"));
                // Their arrays are meant to live in registers: a spill to the stack would put
                // them in local memory, silently undoing the design.
                let in_registers =
                    ["masked_softmax", "masked_softmax_bf16", "flash_attention_bf16", "rope_interleaved"];
                assert!(
                    !in_registers.contains(k) || usage.stack == 0,
                    "{file}.cu for {arch}: {k} spills to a {} B stack",
                    usage.stack
                );
                println!(
                    "  {k}: {} registers, {} B static shared, {} B stack; blocks of up to {block} threads fit ({} allowed)",
                    usage.registers,
                    usage.static_shared,
                    usage.stack,
                    threads_allowed(usage.registers)
                );
            }
        }
    }
}

/// The check can fail: a broken kernel is reported in one line naming the file and the error.
#[test]
fn a_broken_kernel_fails_to_compile_with_its_error() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }";
    let err = compile("broken", broken, "sm_90").unwrap_err().to_string();
    assert!(err.contains("broken.cu does not compile for sm_90") && err.contains("undefined_name"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// The resource check can fail on real machine code: a kernel holding 160 live values takes
/// every register a thread may have (255), so a block of 512 threads of it would not launch.
#[test]
fn a_register_hungry_kernel_is_refused_past_the_block_its_registers_allow() {
    if !nvrtc_or_skip() {
        return;
    }
    let hungry = r#"extern "C" __global__ void hungry(const float* x, float* y, int n) {
        float a[160];
        #pragma unroll
        for (int i = 0; i < 160; i++) a[i] = x[threadIdx.x + i * n];
        float s = 0.0f;
        #pragma unroll
        for (int r = 0; r < 4; r++) {
            #pragma unroll
            for (int i = 0; i < 160; i++) { a[i] = a[i] * a[(i + 1) % 160] + s; s += a[i]; }
        }
        #pragma unroll
        for (int i = 0; i < 160; i++) y[threadIdx.x + i * n] = a[i];
    }"#;
    let compiled = compile("hungry", hungry, "sm_90").unwrap_or_else(|e| panic!("{e}"));
    let usage = read_cubin(&compiled.cubin).unwrap()["hungry"];
    println!("hungry: {usage:?}");
    assert!(usage.registers > 128 && usage.stack > 0, "{usage:?}");
    let err = check_block("hungry", usage, 512).unwrap_err();
    assert!(err.contains("hungry: its largest block of 512 threads needs"), "{err}");
    check_block("hungry", usage, 128).unwrap();
}

/// Without the driver (no GPU here), opening a device is a one-line error, not a panic.
#[test]
fn no_driver_is_an_error_not_a_panic() {
    if probe(&[Lib::Driver]).is_ok() {
        println!("skipped: this machine has a CUDA driver");
        return;
    }
    let err = glimpse::cuda::gpu::Gpu::open(0).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("NVIDIA driver"), "{err}");
}
