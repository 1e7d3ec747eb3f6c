//! The estimates against what runs hold, and the size parser.

use super::*;

/// A sweep's GPU check takes the prompt shape that needs the most, not the most tokens: past
/// `index_topk` a prompt is scored by the indexer in chunks, whose scratch a batch of shorter
/// prompts of more tokens in all does not need (bf16-fused: index_topk 6).
#[cfg(feature = "cuda")]
#[test]
fn a_sweep_is_checked_on_the_gpu_for_its_most_demanding_prompt() {
    use crate::device::Precision;
    let ckpt = Checkpoint::open(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/bf16-fused")).unwrap();
    let target = Target { precision: Precision::Bf16, ..Target::from(Backend::Cuda) };
    let need = |dims| device_need(&ckpt, dims, (target, false), Residency::Swept).total();
    let (batch, long) = ((2, 6), (1, 11));
    assert!(need(long) > need(batch), "{} against {}", need(long), need(batch));
    assert_eq!(most_on_device(&ckpt, &[batch, long].into(), target), Some(long));
}

/// One forward pass of fewer than 512 rows on a CPU with AMX holds the FP8 codes as mapped
/// (1 byte a weight), where repeated passes, or 512 rows, pack them (2 bytes); elsewhere the
/// two are the same. Passes of at most `gemv::MAX_ROWS` rows never pack them, anywhere the
/// FP8 kernel runs (the codes, 1 byte a weight, measured: 1.38 GB estimated against a
/// 1.28 GB peak for 8 tokens of a 2-layer GLM-5-shaped FP8 checkpoint, 2.59 GB before).
#[test]
fn a_one_off_pass_holds_fp8_weights_as_mapped() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/fp8-sharded");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let all = 0..=ckpt.config.num_hidden_layers - 1;
    let weights = |rows, passes| estimate(&ckpt, (1, rows), &all, Residency::Whole, Recording::Nothing, passes).weights;
    let many = weights(16, Passes::Many);
    assert_eq!(weights(512, Passes::One), many, "512 rows pack at once");
    if crate::model::amx::available() && crate::model::bf16_gemm::available() {
        let one = weights(16, Passes::One);
        assert!(one < many, "{one} against {many}");
    } else {
        assert_eq!(weights(16, Passes::One), many);
    }
    let few = weights(crate::model::gemv::MAX_ROWS, Passes::Many);
    match crate::model::fp8_gemv::takes_blocks(ckpt.config.fp8.as_ref().unwrap().block[1]) {
        true => assert!(few < many && few == weights(1, Passes::One), "{few} against {many}"),
        // (Its bf16 projections, if any, are still read in place.)
        false => assert!(few <= many, "{few} against {many}"),
    }
}

/// A short generation on an FP8 checkpoint reads the codes in place (1 byte a weight) but
/// makes the absorbed form's f32 split of every `kv_b_proj` at its first step, which only a
/// bf16 one read in place avoids (the estimate once left it out: 1.38 GB for a 1.57 GB peak).
#[test]
fn a_short_fp8_generation_counts_its_codes_and_the_absorbed_splits() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/fp8-sharded");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let fp8 = |n: &&str| ckpt.dtype(n) == Some(Dtype::F8_E4M3);
    let codes: u64 = ckpt.names().filter(fp8).map(|n| numel(&ckpt, n)).sum();
    let splits: u64 = ckpt.names().filter(|n| n.ends_with("kv_b_proj.weight")).map(|n| 4 * numel(&ckpt, n)).sum();
    assert!(codes > 0 && splits > 0);
    // Beyond the one pass of its 4 rows: the splits, and where the FP8 kernel cannot read
    // the codes in place (the pass then packed them), the codes' pages the steps read.
    let all = 0..=ckpt.config.num_hidden_layers - 1;
    let pass = estimate(&ckpt, (1, 4), &all, Residency::Whole, Recording::Nothing, Passes::Many).weights;
    let generation = generate_estimate(&ckpt, (1, 4), (0, 1), 4, false, Recording::Nothing).weights;
    let in_place = crate::model::fp8_gemv::takes_blocks(ckpt.config.fp8.as_ref().unwrap().block[1]);
    assert_eq!(generation - pass, splits + if in_place { 0 } else { codes });
}

/// `verify --decode --chunk N` calls the cache with N rows: past `gemv::MAX_ROWS` they pack the
/// weights and split every `kv_b_proj`, which the estimate counted as one row's steps (a one-off
/// pass's pages, no splits); and FP8 blocks the kernel does not take are packed by any step.
#[test]
fn decode_steps_that_pack_are_no_one_off_pass() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let ckpt = Checkpoint::open(&golden.join("bf16-fused")).unwrap();
    let rows = crate::model::gemv::MAX_ROWS + 1;
    let decode = |ckpt: &Checkpoint, step| generate_estimate(ckpt, (1, 12), (0, step), 1, false, Recording::Nothing);
    let splits: u64 = ckpt.names().filter(|n| n.ends_with("kv_b_proj.weight")).map(|n| 4 * numel(&ckpt, n)).sum();
    let (one, many) = (decode(&ckpt, 1).weights, decode(&ckpt, rows).weights);
    assert!(splits > 0 && many >= one + splits, "{many} against {one} + {splits}");
    let all = 0..=ckpt.config.num_hidden_layers - 1;
    let pass = |passes| estimate(&ckpt, (1, 12), &all, Residency::Whole, Recording::Nothing, passes).weights;
    if crate::model::nn::Packing::reads_in_place(12) {
        assert_eq!(one, pass(Passes::One));
        assert!(many >= pass(Passes::Many) + splits, "{many} against {}", pass(Passes::Many));
    }
    // FP8 blocks of 8 inputs: the kernel reads 16 at a time, so the steps pack the codes.
    let mut fp8 = Checkpoint::open(&golden.join("fp8-sharded")).unwrap();
    let in_kernel = decode(&fp8, 1).weights;
    if let Some(q) = fp8.config.fp8.as_mut() {
        q.block[1] = 8;
    }
    let packed = decode(&fp8, 1).weights;
    if crate::model::nn::Packing::reads_in_place(12) && crate::model::fp8_gemv::takes_blocks(128) {
        assert!(packed > in_kernel, "{packed} against {in_kernel}");
    }
}

/// A device sweep's host estimate is a streamed pass's without the head, which a sweep never
/// loads.
#[test]
fn a_device_sweep_counts_no_head() {
    for case in ["flat", "bf16-fused"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(case);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let target = Target::from(Backend::CpuOps);
        let est = |r| estimate_streamed_on(target, &ckpt, (1, 8), Recording::Nothing, r).weights;
        let copies = |r| device_copies(&ckpt, target, r);
        let head = head_as_loaded(&ckpt);
        assert!(head > 0, "{case}");
        let (streamed, swept) = (est(Residency::Streamed), est(Residency::Swept));
        assert_eq!(streamed - copies(Residency::Streamed), swept - copies(Residency::Swept) + head, "{case}");
    }
}

/// Nor does a CPU sweep count the chunk of lm_head a streamed CPU pass multiplies by: it
/// holds a streamed pass of its longest prompt without it, and every prompt's held state,
/// refused a byte over.
#[test]
fn a_cpu_sweep_counts_no_head() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let all = 0..=ckpt.config.num_hidden_layers - 1;
    let prompts = [(1, 8), (2, 6)];
    let pass = estimate(&ckpt, (2, 6), &all, Residency::Streamed, Recording::Nothing, Passes::One);
    let chunk = streamed_head(&ckpt, Passes::One);
    assert_eq!(chunk, 4 * (crate::model::stream::HEAD_CHUNK * ckpt.config.hidden_size) as u64);
    let needs = pass.total() - chunk + sweep_held(&ckpt, &prompts);
    let target = Target::from(Backend::Cpu);
    check_sweep(&ckpt, &prompts, target, Some(needs)).unwrap();
    let refused = check_sweep(&ckpt, &prompts, target, Some(needs - 1)).unwrap_err().to_string();
    assert!(refused.contains("fewer or shorter prompts"), "{refused}");
}

/// The recording counts what `--record` names: one hook point a layer holds one tensor
/// waiting, not the writer's whole queue of logits-sized ones, and the S x S indexer scores
/// only where they are recorded (a `--stream` run of one `layers.0.output` was refused at
/// 25.7 GB for a 5.9 GB peak).
#[test]
fn the_recording_is_estimated_by_what_it_records() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let (layers, all) = (ckpt.config.num_hidden_layers, 0..=ckpt.config.num_hidden_layers - 1);
    let est = |r| estimate(&ckpt, (1, 4096), &all, Residency::Streamed, r, Passes::One);
    let of = |patterns: &str| Recording::of(&Selector::new(patterns, None), layers, true);
    let (h, s, v) = (ckpt.config.hidden_size as u64, 4096u64, ckpt.config.vocab_size as u64);
    assert_eq!(of("layers.0.output"), Recording::Hooks { tensors: 1, scores: false, logits: 0 });
    assert_eq!(est(of("layers.0.output")).recorded, 4 * s * h);
    // Every layer's output (the MTP layer's too) and the logits: as many wait as the run
    // records, at most the writer's queue, each at most a layer's widest; and the logits.
    let queue = (crate::dump::SPILL_QUEUE + 1).min(layers + 2) as u64;
    assert_eq!(est(of("layers.*.output,logits")).recorded, 4 * s * (queue * h + v));
    assert_eq!(est(Recording::Nothing).recorded, 0);
    // The scores' [S, S] and its copy, only where recorded.
    let scores = est(of("*,*.dsa.scores"));
    assert_eq!(scores.activations - est(of("*")).activations, 4 * 2 * s * s);
    assert_eq!(est(of("*")).activations, est(Recording::Nothing).activations);
}

/// A generation holds the latent cache of the positions it fed, not a prefill's activations
/// for all of them: 5000 new tokens on golden/flat were estimated at 46 MB as a prefill of
/// 5003 positions; about 13 MB now (peak RSS of a 20,000-token run: 36 MB, estimated 45 MB).
#[test]
fn a_generation_is_estimated_by_its_cache_not_as_a_prefill() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let limit = Some(25_000_000);
    // Each thread's blocks of scores count: the numbers below are for 2.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
        assert!(check_run(
            &ckpt,
            (1, 5003),
            Recording::Nothing,
            (Backend::Cpu.into(), Residency::Whole, false),
            limit,
            ""
        )
        .is_err());
        assert!(check_generate(&ckpt, (1, 3), 0, 5000, false, Recording::Nothing, limit).is_ok());
        // The cache still grows with the positions.
        assert!(check_generate(&ckpt, (1, 3), 0, 50_000, false, Recording::Nothing, limit).is_err());
        // Sizes whose products pass u64 (a dump's `input_ids` of 2^40 positions) are refused,
        // not wrapped into a small estimate.
        assert!(check_run(
            &ckpt,
            (1, 1 << 40),
            Recording::ALL,
            (Backend::Cpu.into(), Residency::Whole, false),
            Some(u64::MAX - 1),
            ""
        )
        .is_err());
    });
    let (plain, mtp) = (ckpt.config.cache_values_per_token(false).0, ckpt.config.cache_values_per_token(true).0);
    let c = &ckpt.config;
    assert_eq!(mtp - plain, c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim);
}

#[test]
fn sizes() {
    assert_eq!(parse_size("500M"), Ok(500_000_000));
    assert_eq!(parse_size("1.5g"), Ok(1_500_000_000));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("16GB"), Ok(16_000_000_000));
    assert_eq!(parse_size("2GiB"), Ok(2 * 1024 * 1024 * 1024));
    assert_eq!(parse_size("512mib"), Ok(512 * 1024 * 1024));
    assert_eq!(parse_size("100B"), Ok(100));
    assert!(parse_size("-1G").is_err() && parse_size("lots").is_err() && parse_size("").is_err());
    assert!(parse_size("5X").is_err() && parse_size("5GiBB").is_err() && parse_size("G").is_err());
    assert_eq!(parse_size("0.5"), Err("\"0.5\" is less than a byte (a unit missing? 16G)".into()));
    assert!(parse_size("0").is_err() && parse_size("1.5") == Ok(1));
}

/// `verify --decode` holds two whole records of the main model's hook points: their bytes, as
/// the check counts them, are those of the tensors a run of the golden cases records, shared
/// indexers and dense layers included.
#[test]
fn a_record_is_counted_at_the_bytes_it_holds() {
    for case in ["flat", "grouped-shared-yarn"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(case);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let model = crate::model::Model::load(&ckpt).unwrap();
        let tokens = crate::dump::Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
        let mut recorder = crate::hooks::Recorder::new(Selector::default());
        model.forward(&tokens, &mut recorder).unwrap();
        let held: usize = recorder.tensors.iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum();
        let counted = record_bytes(&ckpt.config, (tokens.batch, tokens.seq), &Selector::default());
        assert_eq!(counted, held as u64, "{case}");
    }
}
