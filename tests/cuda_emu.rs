//! The CUDA kernels' own source, run on the host by the emulation (`cuda::emu`, built by
//! build.rs): every kernel's parity check of `glimpse selftest --device cuda` (random inputs,
//! sizes off the block size, NaN-poisoned outputs), the row-major products in the configuration
//! cuBLAS gets, and the whole device forward pass on every golden case. No GPU is needed, so CI
//! runs them; they check the kernels' logic, not NVRTC's code or the hardware.
#![cfg(feature = "cuda")]

mod common;

use common::all_pass;
use cudarc::driver::LaunchConfig;
use glimpse::cuda::attention::{AttentionPath, AttentionPlan, CHUNK_VALUES};
use glimpse::cuda::emu::{Param, Schedule};
use glimpse::cuda::gpu::Gpu;
use glimpse::cuda::ops::CudaOps;
use glimpse::cuda::selftest::{attention, dispatch, kernels, products, Check};
use glimpse::device::{Ops, Precision};

/// A GPU runs blocks, and threads between barriers, in no promised order: every kernel passes
/// with its blocks and its threads' rounds in order, reversed and shuffled.
#[test]
fn every_kernel_matches_its_cpu_reference_in_the_emulation_in_every_schedule() {
    for schedule in Schedule::ALL {
        println!("{schedule:?}");
        let checks = kernels(&Gpu::emulated_in(schedule)).unwrap();
        assert!(checks.len() >= 15, "{} checks", checks.len());
        all_pass(&checks);
    }
}

/// The schedules are not all alike: a kernel with a race planted on purpose (a block sum missing
/// a barrier, `src/cuda/emu/race_canary.cu`) computes the right sums in lockstep and wrong ones
/// once warps run ahead.
#[test]
fn the_warps_ahead_schedules_find_a_race_that_lockstep_misses() {
    let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    for schedule in Schedule::ALL {
        let mut out = vec![f32::NAN; 64];
        let params = [Param::Data(x.as_ptr().cast_mut().cast()), Param::Data(out.as_mut_ptr().cast())];
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: race_canary(const float* x, float* out) reads and writes one float per thread.
        unsafe { glimpse::cuda::emu::launch("race_canary", cfg, schedule, &params) }.unwrap();
        let wrong = out.iter().filter(|&&v| v != 0.0).count();
        println!("{schedule:?}: {wrong} of 64 threads see the race");
        assert_eq!(wrong == 0, schedule == Schedule::Lockstep, "{schedule:?}: {out:?}");
    }
}

/// What a fiber runs through but a GPU leaves undefined fails the launch, named
/// (`src/cuda/emu/ub_canaries.cu`): a write past the dynamic shared memory, two barriers met at
/// once, a full-mask shuffle over half a warp, a misaligned vector load. (Every kernel of ours
/// passes these checks: the parity tests launch them all.)
#[test]
fn the_emulation_fails_what_a_gpu_leaves_undefined() {
    let mut out = vec![0f32; 64];
    let bits = vec![0u16; 64];
    let n: i32 = 16;
    let launch = |name: &str, block: u32, shared: u32, params: &[Param]| {
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: shared };
        // SAFETY: each canary takes the parameters given here and touches at most 64 floats of
        // `out`, 9 values of `bits` and its shared memory (plus the canary after it).
        unsafe { glimpse::cuda::emu::launch(name, cfg, Schedule::Lockstep, params) }.unwrap_err().to_string()
    };
    let out_p = Param::Data(out.as_mut_ptr().cast());
    let n_p = Param::Value((&n as *const i32).cast());
    let err = launch("ub_overrun_shared", 32, 4 * n as u32, &[n_p]);
    assert!(err.contains("wrote past its 64 bytes of dynamic shared memory"), "{err}");
    for (name, block) in [("ub_divergent_barriers", 64), ("ub_full_mask_over_half_a_warp", 32)] {
        let err = launch(name, block, 0, &[Param::Data(out.as_mut_ptr().cast())]);
        assert!(err.contains("threads met at different barriers or shuffles"), "{name}: {err}");
    }
    // (p + 1 off 16 bytes whatever the allocator's alignment: at 14 mod 16 start a value later.)
    let base = if (bits.as_ptr() as usize + 2).is_multiple_of(16) { &bits[1..] } else { &bits[..] };
    let err = launch("ub_misaligned_load", 1, 0, &[Param::Data(base.as_ptr().cast_mut().cast()), out_p]);
    assert!(err.contains("off its alignment"), "{err}");
}

/// A static `__shared__` array starts each block as 0xFF bytes (NaN), as dynamic shared memory
/// does: a block reading it before writing sees no value the block before it left (on the host
/// such arrays are statics, kept from block to block and launch to launch).
#[test]
fn static_shared_memory_starts_each_block_afresh() {
    for _ in 0..2 {
        let mut out = vec![0f32; 3];
        let cfg = LaunchConfig { grid_dim: (3, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        let params = [Param::Data(out.as_mut_ptr().cast())];
        // SAFETY: ub_shared_read_before_written(float* out) writes out[blockIdx.x], 3 blocks.
        unsafe { glimpse::cuda::emu::launch("ub_shared_read_before_written", cfg, Schedule::Lockstep, &params) }
            .unwrap();
        assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
    }
}

/// `checks` on emulated ops of each precision and schedule: `counts` checks each time (f32, bf16),
/// all passing.
fn in_both_precisions(checks: fn(&CudaOps) -> glimpse::error::Result<Vec<Check>>, counts: [usize; 2]) {
    for schedule in Schedule::ALL {
        for (precision, count) in [Precision::F32, Precision::Bf16].into_iter().zip(counts) {
            println!("{schedule:?} {precision:?}");
            let checks = checks(&CudaOps::new(Gpu::emulated_in(schedule), precision).unwrap()).unwrap();
            assert_eq!(checks.len(), count);
            all_pass(&checks);
        }
    }
}

/// Both paths in both precisions, the selection as bits, and in bf16 the fused path and both
/// bf16 paths over two tiles of queries.
#[test]
fn the_attention_products_and_kernels_match_the_cpu_on_every_path_in_the_emulation() {
    in_both_precisions(attention, [9, 15]);
}

/// `selftest` poisons every op's output on a GPU, as the emulation always does (with NaN): a
/// poison set is what a new output holds, and a finite one lets a check see an op write NaN.
/// The attention's checks still pass with outputs poisoned finite, and leave the poison as it was.
#[test]
fn outputs_hold_the_poison_set_and_the_attention_checks_pass_under_a_finite_one() {
    let ops = CudaOps::new(Gpu::emulated(), Precision::Bf16).unwrap();
    assert!(ops.gpu.download(&ops.gpu.output(5).unwrap()).unwrap().iter().all(|v| v.is_nan()));
    ops.gpu.poison_outputs(Some(-7.5));
    assert_eq!(ops.gpu.download(&ops.gpu.output(5).unwrap()).unwrap(), vec![-7.5; 5]);
    all_pass(&attention(&ops).unwrap());
    assert_eq!(ops.gpu.poisoned(), Some(-7.5));
    ops.gpu.poison_outputs(None);
    assert!(ops.gpu.download(&ops.gpu.output(5).unwrap()).unwrap().iter().all(|v| v.is_nan()));
}

/// The MoE dispatch on the device against the host's grouping (and both refusing a bad id).
#[test]
fn the_moe_dispatch_matches_the_hosts_in_the_emulation() {
    in_both_precisions(dispatch, [4, 4]);
}

#[test]
fn the_products_in_cublas_layout_match_the_cpu_in_the_emulation_in_both_precisions() {
    in_both_precisions(products, [9, 9]);
}

/// Once per attention path, whichever the sizes would choose; the masked one in chunks of one
/// query (so every chunk but the first starts past query 0). The gathered one with warps running
/// ahead in a shuffled order, the other in lockstep.
#[test]
fn the_device_forward_on_the_emulated_kernels_matches_every_golden_case_on_both_attention_paths() {
    let gathered = AttentionPlan { path: Some(AttentionPath::Gathered), ..Default::default() };
    let masked_by_query = AttentionPlan { path: Some(AttentionPath::Masked), chunk_values: 1 };
    for (plan, schedule) in [(gathered, Schedule::Shuffled(7)), (masked_by_query, Schedule::Lockstep)] {
        println!("{plan:?} {schedule:?}");
        let ops = CudaOps::new(Gpu::emulated_in(schedule), Precision::F32).unwrap().with_attention(plan);
        common::assert_device_matches_every_golden_case(&ops);
    }
}

/// The weights the check before a `cuda` run counts (`memory::device_weights`) are the bytes the
/// device model uploads, for every golden case (f32, bf16, fused experts, block-FP8, a tied or
/// untied head, an MTP layer left on the CPU) and for synthesised FP8 checkpoints whose
/// `kv_lora_rank` is and is not a multiple of the block (`kv_a_proj_with_mqa`, stacked after
/// `q_a_proj` on the device, keeps its own scale grid), in both precisions.
#[test]
fn the_device_weights_estimate_is_what_the_device_model_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs: Vec<std::path::PathBuf> = common::GOLDEN_CASES.iter().map(|c| common::golden(c)).collect();
    for kv_lora_rank in [256, 200] {
        let mut config = glimpse::synth::preset_glm5();
        let small =
            [("hidden_size", 256), ("q_lora_rank", 128), ("num_attention_heads", 2), ("moe_intermediate_size", 64)];
        for (key, value) in small.into_iter().chain([("kv_lora_rank", kv_lora_rank), ("intermediate_size", 192)]) {
            config[key] = value.into();
        }
        let out = tmp.path().join(format!("kv{kv_lora_rank}"));
        let opts = glimpse::synth::SynthOptions {
            config,
            layers: Some(2),
            dense: Some(1),
            experts: Some(4),
            vocab: Some(64),
            dtype: glimpse::synth::SynthDtype::Fp8,
            shards: 1,
            mtp: false,
            seed: 1,
            out: out.clone(),
        };
        glimpse::synth::synth(&opts).unwrap();
        dirs.push(out);
    }
    for dir in dirs {
        let ckpt = glimpse::checkpoint::Checkpoint::open(&dir).unwrap();
        let model = glimpse::model::Model::load(&ckpt).unwrap();
        for precision in [Precision::F32, Precision::Bf16] {
            let ops = CudaOps::new(Gpu::emulated(), precision).unwrap();
            let before = ops.gpu.uploaded();
            let _device = glimpse::device::forward::DeviceModel::new(&ops, &model).unwrap();
            let (uploaded, estimate) = (
                ops.gpu.uploaded() - before,
                glimpse::memory::device_weights(&ckpt, precision, glimpse::memory::Residency::Whole),
            );
            println!("{} {precision:?}: uploaded {uploaded}, estimated {estimate}", dir.display());
            assert_eq!(uploaded, estimate, "{} {precision:?}", dir.display());
        }
    }
}

/// The MTP head on the emulated GPU, after the prefill, uploads its layer at its first run, as
/// many bytes as the check before a run counts for it (`memory::mtp_device_weights`), and keeps
/// it: a second run uploads only its inputs, and records the same, bit for bit. In both
/// precisions.
#[test]
fn the_mtp_head_uploads_its_layer_once_as_estimated() {
    use glimpse::device::Prefill;
    let dir = common::golden("mtp");
    let ckpt = glimpse::checkpoint::Checkpoint::open(&dir).unwrap();
    let (model, head) = (glimpse::model::Model::load(&ckpt).unwrap(), glimpse::model::mtp::Mtp::load(&ckpt).unwrap());
    let golden = glimpse::dump::Dump::open(&dir.join("reference.safetensors")).unwrap();
    let tokens = golden.tokens().unwrap();
    let hidden = golden.tensor("mtp.input_hidden").unwrap();
    for precision in [Precision::F32, Precision::Bf16] {
        let ops = CudaOps::new(Gpu::emulated(), precision).unwrap();
        let device = glimpse::device::forward::DeviceModel::new(&ops, &model).unwrap();
        // The prefill first, as every caller runs it (its RoPE tables serve the head's shorter rows).
        ops.gpu.reset_peak();
        let (before, _) = ops.gpu.emulated_bytes().unwrap();
        device.prefill(&tokens, &mut glimpse::hooks::NoObserver).unwrap();
        let prefill = ops.gpu.emulated_bytes().unwrap().1 - before;
        let run = || {
            let before = ops.gpu.uploaded();
            let mut r = glimpse::hooks::Recorder::new(glimpse::hooks::Selector::new("*", None));
            device.mtp(&head, &hidden, &tokens, &mut r).unwrap();
            (ops.gpu.uploaded() - before, r.tensors)
        };
        let (first, recorded) = run();
        // The head's working set (its layer uploaded by now) is within the prefill's, one position
        // longer, which the check before a run counts for both.
        ops.gpu.reset_peak();
        let (before, _) = ops.gpu.emulated_bytes().unwrap();
        let (again, recorded_again) = run();
        let held = ops.gpu.emulated_bytes().unwrap().1 - before;
        println!("{precision:?}: the MTP head held {held} beside its weights, the prefill {prefill}");
        assert!(held <= prefill, "{precision:?}: the MTP head held {held}, the prefill {prefill}");
        let estimate = glimpse::memory::mtp_device_weights(&ckpt, precision);
        assert!(again > 0 && estimate > 0);
        assert_eq!(first - again, estimate, "{precision:?}");
        assert!(recorded.iter().any(|(p, _)| p.name() == "mtp.logits"));
        assert_eq!(recorded.len(), recorded_again.len());
        for ((p, a), (_, b)) in recorded.iter().zip(&recorded_again) {
            let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
            let eq = a.eq(&b).unwrap().min(0).unwrap().to_scalar::<u8>().unwrap();
            assert_eq!(eq, 1, "{} {precision:?}", p.name());
        }
    }
}

/// `--stream` on the emulated GPU: what a streamed model records is the resident model's, bit
/// for bit, in both precisions (block-FP8 in shards; bf16 with a tied head); and it holds one
/// layer's weights at a time, then the final norm and lm_head. The most it holds at once during
/// a prefill is at least the weights the check before a streamed run counts
/// (`memory::device_weights` streamed: the larger of the largest layer and the head, held at
/// different times), at most those and the working set (`cuda::working_set`), and below what the
/// model uploaded whole holds.
#[test]
fn a_streamed_model_holds_one_layer_at_a_time_on_the_emulated_gpu() {
    use glimpse::device::forward::{DeviceModel, LogitRows};
    use glimpse::device::{Backend, Target};
    use glimpse::memory::{device_weights, Residency};
    for case in ["fp8-sharded", "bf16-fused"] {
        for precision in [Precision::F32, Precision::Bf16] {
            let ops = || CudaOps::new(Gpu::emulated(), precision).unwrap();
            common::assert_streamed_records_as_resident(case, &ops());
            let ckpt = glimpse::checkpoint::Checkpoint::open(&common::golden(case)).unwrap();
            let model = glimpse::model::Model::load(&ckpt).unwrap();
            let tokens = glimpse::dump::Dump::open(&common::golden(case).join("reference.safetensors"))
                .unwrap()
                .tokens()
                .unwrap();
            let peak = |streamed: bool| {
                let ops = ops();
                let device =
                    if streamed { DeviceModel::streamed(&ops, &ckpt) } else { DeviceModel::new(&ops, &model).unwrap() };
                drop(device.forward_on_device(&tokens, LogitRows::All, &mut glimpse::hooks::NoObserver).unwrap());
                ops.gpu.emulated_bytes().unwrap().1
            };
            let (whole, streamed) = (peak(false), peak(true));
            let target = Target { precision, ..Target::from(Backend::CudaEmu) };
            let weights = device_weights(&ckpt, precision, Residency::Streamed);
            let working = glimpse::cuda::working_set::estimate(&ckpt, (tokens.batch, tokens.seq), target, false).total;
            println!(
                "{case} {precision:?}: whole {whole}, streamed {streamed}, of weights {weights} + working {working}"
            );
            assert!(weights <= streamed && streamed <= weights + working, "{case} {precision:?}");
            assert!(streamed < whole, "{case} {precision:?}");
        }
    }
}

/// A sweep (`audit --stream`) on the emulated GPU records each prompt as its prefill does, bit
/// for bit, in both precisions (a shared indexer layer's selection waits on the host between
/// layers), and holds on the device no more than a layer's weights and its longest prompt's
/// working set through the layers: never the head, nor logits.
#[test]
fn a_sweep_on_the_emulated_gpu_records_each_prompt_as_its_prefill() {
    use glimpse::device::forward::DeviceModel;
    use glimpse::device::{Backend, Target};
    use glimpse::hooks::{NoObserver, Observer, SweepObserver};
    use glimpse::memory::{device_weights, Residency};
    struct Quiet(NoObserver);
    impl SweepObserver for Quiet {
        fn prompt(&mut self, _: usize) -> &mut dyn Observer {
            &mut self.0
        }
        fn layer_done(&mut self, _: usize) -> bool {
            true
        }
    }
    for case in ["grouped-shared-yarn", "bf16-fused"] {
        for precision in [Precision::F32, Precision::Bf16] {
            let ckpt = glimpse::checkpoint::Checkpoint::open(&common::golden(case)).unwrap();
            let ops = CudaOps::new(Gpu::emulated(), precision).unwrap();
            common::assert_a_sweep_records_as_prefills(case, &DeviceModel::streamed(&ops, &ckpt));
            let ops = CudaOps::new(Gpu::emulated(), precision).unwrap();
            let prompts = common::sweep_prompts(case);
            let refs: Vec<_> = prompts.iter().collect();
            let n = ckpt.config.num_hidden_layers;
            DeviceModel::streamed(&ops, &ckpt).sweep(&refs, n - 1, &mut Quiet(NoObserver)).unwrap();
            let target = Target { precision, ..Target::from(Backend::CudaEmu) };
            let weights = device_weights(&ckpt, precision, Residency::Swept);
            let longest = prompts.iter().map(|t| (t.batch, t.seq)).max_by_key(|(b, s)| b * s).unwrap();
            let working = glimpse::cuda::working_set::estimate(&ckpt, longest, target, false).layers;
            let peak = ops.gpu.emulated_bytes().unwrap().1;
            println!("{case} {precision:?}: peak {peak}, of weights {weights} + working {working}");
            assert!(weights <= peak && peak <= weights + working, "{case} {precision:?}: {peak}");
        }
    }
}

/// Launchers refuse what a kernel would read out of bounds, before anything runs.
#[test]
fn a_launch_with_a_short_buffer_is_refused() {
    let gpu = Gpu::emulated();
    let (x, w) = (gpu.upload(&[1.0f32; 10]).unwrap(), gpu.upload(&[1.0f32; 5]).unwrap());
    let mut y = gpu.filled(10, f32::NAN).unwrap();
    let err = gpu.rms_norm(&x, &w, &mut y, 2, 6, 1e-6).unwrap_err().to_string();
    assert!(err.contains("rms_norm: argument 0 holds 10 values, the launch needs 12"), "{err}");
    assert!(gpu.download(&y).unwrap().iter().all(|v| v.is_nan()), "nothing was written");
    let ops = CudaOps::new(Gpu::emulated(), Precision::F32).unwrap();
    assert_eq!(ops.download(&ops.zeros(3).unwrap()).unwrap(), vec![0.0; 3]);
    // More experts chosen than exist: the kernel would index the logits with choices never made.
    let rc = glimpse::model::moe::RouterConfig {
        top_k: 4,
        n_group: 1,
        topk_group: 1,
        norm_topk_prob: true,
        routed_scaling_factor: 1.0,
    };
    let (logits, bias) = (gpu.upload(&[0.5f32; 6]).unwrap(), gpu.upload(&[0.0f32; 3]).unwrap());
    let (mut ids, mut w, mut m) =
        (gpu.filled(8, -1).unwrap(), gpu.filled(8, 0.0).unwrap(), gpu.filled(2, 0.0).unwrap());
    let err = gpu.route(&logits, &bias, 2, 3, &rc, &mut ids, &mut w, &mut m).unwrap_err().to_string();
    assert!(err.contains("route: 3 experts, top-4"), "{err}");
}

/// `glimpse selftest --device cuda-emu`: the kernels and products in both precisions, every
/// golden case through the f32 path against transformers (whole and streamed), and the bf16 path
/// (masked, then fused attention) against transformers with bf16 products; exit 0 only when all
/// pass.
#[test]
fn selftest_on_the_emulation_passes_in_both_precisions() {
    let (code, text) = common::code_and_text(&["selftest", "--device", "cuda-emu"]);
    println!("{text}");
    assert_eq!(code, 0);
    let verdicts = |what: &str| text.lines().filter(|l| l.starts_with("verify ") && l.contains(what)).count();
    assert_eq!(verdicts("(cuda-emu, float32)"), 5);
    assert_eq!(verdicts("(cuda-emu, float32, --stream)"), 5);
    assert_eq!(verdicts("bf16 products with float32 accumulation vs transformers with bf16 products"), 5);
    let fused = "bf16 products with float32 accumulation, fused attention vs transformers with bf16 products";
    assert_eq!(verdicts(fused), 5);
    assert_eq!(text.lines().filter(|l| l.starts_with("measure ")).count(), 5);
    assert!(!text.contains("FAILED"));
    // Every kernel was launched by some parity check, not only by the golden cases after them.
    let all = glimpse::cuda::selftest::kernel_names().count();
    let line = format!("kernel every kernel launched by a check ({all} of {all})");
    assert!(text.lines().any(|l| l.starts_with(&line) && l.ends_with("ok")), "{text}");
}

/// `verify --precision bf16` defaults to the case's reference with bf16 products, and matches it
/// at 2e-2 with decisions replayed (golden/mtp's MTP head included), where the f32 reference is
/// out of reach of bf16 rounding.
#[test]
fn bf16_verify_defaults_to_the_bf16_products_reference() {
    let args = ["verify", "--precision", "bf16", "--device", "cuda-emu", "--isolate", "--force-routing"];
    let (code, text) = common::code_and_text(&[&args[..], &["--force-selection"]].concat());
    println!("{text}");
    assert_eq!(code, 0);
    assert!(text.contains("against golden/flat/reference-bf16.safetensors"), "{text}");
    // golden/mtp's bf16 reference holds the MTP head, which runs on the device too: every tensor.
    let reference = glimpse::dump::Dump::open(&common::golden("mtp").join("reference-bf16.safetensors")).unwrap();
    let n = reference.names().len();
    assert!(reference.contains("mtp.logits"));
    let (code, text) = common::code_and_text(&[&args[..], &["--force-selection", "--model", "golden/mtp"]].concat());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&format!("{n} of {n} tensors match")), "{text}");
    // bf16-fused's bf16 run lands 4.8e-2 from its f32 reference (flat's only 2.1e-2, within
    // atol + rtol |x|).
    let golden = ["--model", "golden/bf16-fused", "--golden", "golden/bf16-fused/reference.safetensors"];
    let (code, text) = common::code_and_text(&[&args[..], &golden, &["--force-selection"]].concat());
    assert_eq!(code, 1, "bf16 products against the f32 reference: {text}");
    // And the other way: f32 products do not pass for bf16 ones against the bf16 reference.
    let f32_args = ["verify", "--device", "cuda-emu", "--model", "golden/bf16-fused", "--isolate", "--force-routing"];
    let bf16_golden = ["--golden", "golden/bf16-fused/reference-bf16.safetensors", "--force-selection"];
    let tol = ["--atol", "2e-2", "--rtol", "2e-2"];
    let (code, text) = common::code_and_text(&[&f32_args[..], &bf16_golden, &tol].concat());
    assert_eq!(code, 1, "f32 products against the bf16 reference: {text}");
}

/// The top-k's path by row length, at Hopper's shared memory (which the emulation reports): the
/// sort while a row fits (16k keys), then chunks of 16k, and ranks where no chunk of 2 (K + 1) fits.
#[test]
fn the_topk_path_follows_the_shared_memory() {
    use glimpse::cuda::gpu::TopK;
    let mut gpu = Gpu::emulated();
    assert_eq!(gpu.topk_path(16384, 2048), TopK::Sorted);
    assert_eq!(gpu.topk_path(16385, 2048), TopK::Chunked { chunk: 16384 });
    assert_eq!(gpu.topk_path(202752, 2048), TopK::Chunked { chunk: 16384 });
    // 47 KB: chunks of 4096 keys, enough for K = 1024 but not for K = 2048 (a chunk of 8192).
    gpu.shared_limit = 48 * 1024 - 1024;
    assert_eq!(gpu.topk_path(16385, 1024), TopK::Chunked { chunk: 4096 });
    assert_eq!(gpu.topk_path(16385, 2048), TopK::Ranked);
}

/// A run that does not record the indexer's scores selects a chunk of queries at a time without
/// them (`Ops::index_topk`; here one chunk per batch row), and still matches the reference at
/// every recorded point, the selections and their margins included.
#[test]
fn a_run_without_the_scores_selects_by_chunks_and_matches_the_reference() {
    let dir = "golden/grouped-shared-yarn";
    let reference = format!("{dir}/reference.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("run.safetensors");
    let dump = dump.to_str().unwrap();
    let run = ["run", "--device", "cuda-emu", "--model", dir, "--tokens-from", &reference, "--dump", dump];
    let (code, text) = common::code_and_text(&run);
    assert_eq!(code, 0, "{text}");
    let (code, text) = common::code_and_text(&["diff", dump, &reference]);
    println!("{text}");
    assert_eq!(code, 0);
    assert!(text.contains("only in golden/grouped-shared-yarn/reference.safetensors: layers.0.dsa.scores"), "{text}");
    let counts = text.lines().find_map(|l| l.strip_suffix(" common tensors match")).unwrap_or_default();
    let (matched, common) = counts.split_once(" of ").unwrap_or_default();
    assert_eq!(matched, common, "{text}");
    // Every recorded point is in the reference: selections, margins, activations, logits.
    assert!(common.parse::<usize>().unwrap_or(0) >= 45, "{text}");
}

/// `--precision bf16` is refused where the products are f32 only.
#[test]
fn bf16_precision_needs_a_cuda_backend() {
    let o = common::glimpse(&["verify", "--precision", "bf16", "--device", "cpu-ops"]);
    common::assert_error(&o, "--precision bf16 needs --device cuda or cuda-emu");
}

/// `--attention` is refused where it cannot apply: on the CPU paths, `fused` in f32, and on
/// `selftest` (which checks every path); `--attention fused` in bf16 runs and records its path.
#[test]
fn the_attention_flag_is_refused_where_it_cannot_apply() {
    let refused = |args: &[&str], needle: &str| common::assert_error(&common::glimpse(args), needle);
    refused(&["verify", "--attention", "masked", "--device", "cpu-ops"], "--attention needs --device cuda or cuda-emu");
    refused(&["verify", "--attention", "fused", "--device", "cuda-emu"], "--attention fused computes in bf16 only");
    let selftest = ["selftest", "--device", "cuda-emu", "--precision", "bf16", "--attention", "fused"];
    refused(&selftest, "selftest checks every attention path");
    let args = ["verify", "--device", "cuda-emu", "--precision", "bf16", "--attention", "fused", "--isolate"];
    let (code, text) = common::code_and_text(&[&args[..], &["--force-routing", "--force-selection"]].concat());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("bf16 products with float32 accumulation, fused attention"), "{text}");
}

/// The TUI's live run in bf16 products is compared, as verify's is, with the case's reference of
/// bf16 products.
#[test]
fn the_tui_in_bf16_takes_the_bf16_reference_and_tolerance() {
    use glimpse_tui::Source;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let target = glimpse::device::Target { precision: Precision::Bf16, ..glimpse::device::Backend::CudaEmu.into() };
    let src = glimpse::tui_source::open(&glimpse::tui_source::Open {
        model: Some(&dir),
        golden: None,
        dump: None,
        tokens: None,
        prompt: None,
        max_memory: None,
        target,
        stream: false,
        near_tie: None,
        tol: Precision::Bf16.tolerance(),
        per_name: &[],
    })
    .unwrap();
    let reference = dir.join("reference-bf16.safetensors");
    assert!(src.title().ends_with(&format!("vs reference {}", reference.display())), "{}", src.title());
}

/// The working set `memory::check_device` counts before a `cuda` run (`cuda::working_set`) is
/// what a prefill holds: on the emulation, whose buffers are counted as a GPU holds them, the
/// estimate is at least the most bytes alive at once beside the weights during a prefill, and
/// not far above it (5%), on every golden case in both precisions and on the default (masked at
/// these sizes), gathered and fused attention, whole and in chunks of a few queries, for a prompt
/// longer than `index_topk` (the indexer scores it) and one no longer, with the scores recorded
/// (so held whole) and not.
#[test]
fn the_working_set_estimate_bounds_what_a_prefill_holds() {
    use glimpse::device::{forward::LogitRows, Attention, Backend, Target};
    let paths = [
        (Attention::Auto, None),
        (Attention::Gathered, Some(AttentionPath::Gathered)),
        (Attention::Fused, Some(AttentionPath::Fused)),
    ];
    for case in common::GOLDEN_CASES {
        let dir = common::golden(case);
        let ckpt = glimpse::checkpoint::Checkpoint::open(&dir).unwrap();
        let model = glimpse::model::Model::load(&ckpt).unwrap();
        let all = glimpse::dump::Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
        let short = model.config.index_topk.min(all.seq);
        let first: Vec<u32> = all.ids.chunks(all.seq).flat_map(|row| row[..short].to_vec()).collect();
        let short = glimpse::model::Tokens { batch: all.batch, seq: short, ids: first };
        for precision in [Precision::F32, Precision::Bf16] {
            for (attention, path) in paths {
                if attention == Attention::Fused && precision == Precision::F32 {
                    continue;
                }
                let runs = [(&all, CHUNK_VALUES, false), (&short, CHUNK_VALUES, false)];
                // The chunks and the recorded scores on the default path (the others share them).
                let more = [(&all, 1000, false), (&short, CHUNK_VALUES, true), (&all, 1000, true)];
                let more = if attention == Attention::Auto { &more[..] } else { &[] };
                for &(tokens, chunk_values, scores) in runs.iter().chain(more) {
                    let ops = CudaOps::new(Gpu::emulated(), precision)
                        .unwrap()
                        .with_attention(AttentionPlan { path, chunk_values });
                    let device = glimpse::device::forward::DeviceModel::new(&ops, &model).unwrap();
                    ops.gpu.reset_peak();
                    let (before, _) = ops.gpu.emulated_bytes().unwrap();
                    // Recording the scores makes each layer's whole; the rest is downloaded.
                    let mut scored = glimpse::hooks::Recorder::new(glimpse::hooks::Selector::new("*.dsa.scores", None));
                    let observer: &mut dyn glimpse::hooks::Observer =
                        if scores { &mut scored } else { &mut glimpse::hooks::NoObserver };
                    let logits = device.forward_on_device(tokens, LogitRows::All, observer);
                    let (_, peak) = ops.gpu.emulated_bytes().unwrap();
                    drop(logits.unwrap());
                    let target = Target { backend: Backend::CudaEmu, ordinal: 0, precision, attention };
                    let (size, chunked) = ((tokens.batch, tokens.seq), chunk_values);
                    let estimate = glimpse::cuda::working_set::estimate_chunked(&ckpt, size, target, scores, chunked);
                    let held = peak - before;
                    println!(
                        "{case} {precision:?} {attention:?} {} x {}, chunks of {chunked} values, scores {scores}: held {held}, \
                         estimated {} ({:+.1}%)",
                        tokens.batch,
                        tokens.seq,
                        estimate.total,
                        100.0 * (estimate.total as f64 / held as f64 - 1.0)
                    );
                    assert!(estimate.total >= held, "{case}: {} < {held}", estimate.total);
                    assert!(estimate.total as f64 <= 1.05 * held as f64, "{case}: {} against {held}", estimate.total);
                }
            }
        }
    }
}

/// A prompt within `index_topk` is not scored on the emulated GPU either (`Ops::every_key` and its
/// kernel), and records the same as a scored one, bit for bit, in both precisions.
#[test]
fn a_prompt_within_index_topk_is_not_scored_on_the_emulation_and_records_the_same() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let model = glimpse::model::Model::load(&glimpse::checkpoint::Checkpoint::open(&dir).unwrap()).unwrap();
    for precision in [Precision::F32, Precision::Bf16] {
        let ops = CudaOps::new(Gpu::emulated(), precision).unwrap();
        let device = glimpse::device::forward::DeviceModel::new(&ops, &model).unwrap();
        common::assert_an_unscored_prompt_records_the_same(&model, |tokens, r| {
            device.forward(tokens, r).unwrap();
        });
    }
}

/// The benchmark on the emulation in bf16 mode times the attention's and the indexer's own
/// steps: the bf16 operands, the products (the indexer's FLOPs counted with all three split
/// terms) and the softmax, inside the profiled prefill.
#[test]
fn the_benchmark_times_the_attentions_steps() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let model = glimpse::model::Model::load(&glimpse::checkpoint::Checkpoint::open(&dir).unwrap()).unwrap();
    let ops = CudaOps::new(Gpu::emulated(), Precision::Bf16).unwrap();
    // More tokens than index_topk, so the indexer scores them.
    let t = model.config.index_topk + 4;
    let r = glimpse::bench::run_device(&ops, &model, t, 1).unwrap();
    let steps = r.steps.as_ref().expect("the CUDA ops time their steps");
    let names: Vec<&str> = steps.sections.iter().map(|s| s.name).collect();
    for name in
        ["indexer: split bf16", "indexer: top-k", "attention: round to bf16", "attention: selection bits, softmax"]
    {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let c = &model.config;
    let heads = c.num_attention_heads * c.num_hidden_layers;
    // One chunk of t queries over t keys a layer: the q k width, then the values'.
    let (_, scores) = steps.total("attention: scores");
    assert_eq!(scores, (2 * heads * t * t * (c.qk_nope_head_dim + c.qk_rope_head_dim)) as u64);
    let (_, values) = steps.total("attention: values");
    assert_eq!(values, (2 * heads * t * t * c.v_head_dim) as u64);
    assert!(r.render().contains("the steps inside the attention's and the indexer's sections (their FLOPs as issued"));
    let (_, qk) = steps.total("indexer: q k products");
    let (n, d) = (c.index_n_heads, c.index_head_dim);
    let full = (0..c.num_hidden_layers).filter(|&i| c.indexer_kind(i) == glimpse::config::IndexerKind::Full).count();
    assert_eq!(qk, (full * 2 * t * t * n * d * 3) as u64, "three terms of the indexer's products");
    // Profiling stops with the profiled prefill.
    assert!(ops.step_profile().is_none());
}
