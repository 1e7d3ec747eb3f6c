//! The device forward pass (`device::forward`, the orchestration the CUDA backend runs) on the
//! CPU implementation of its ops: every golden case matches its transformers reference at the
//! spec's tolerance, every hook point of the main forward compared. On a GPU the same code runs
//! on the CUDA ops (`glimpse selftest --device cuda`).

use std::path::Path;

use glimpse::checkpoint::Checkpoint;
use glimpse::config::IndexerKind;
use glimpse::device::cpu::CpuOps;
use glimpse::device::forward::DeviceModel;
use glimpse::device::Backend;
use glimpse::dump::Dump;
use glimpse::model::Model;

#[test]
fn the_device_forward_on_cpu_ops_matches_every_golden_case() {
    common::assert_device_matches_every_golden_case(&CpuOps);
}

/// A prefill whose observer records no logits computes the last position's only, on the CPU
/// model and on the device path alike: the next token needs no more (`run` of 4096 tokens of a
/// GLM-5-shaped checkpoint computed 2.5 GB of logits it printed one argmax of). An observer that
/// records them gets every position's, as the model's forward returns them; `run`'s NaN watch,
/// which checks the logits it is shown, is no reason to make them all.
#[test]
fn a_prefill_computes_the_logits_it_is_asked_for() {
    use glimpse::device::{with_prefill, Target};
    use glimpse::hooks::{NoObserver, NonFiniteWatch, Recorder, Selector, Tee};
    use glimpse::model::Weights;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
    let tokens = Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
    let all = model.forward(&tokens, &mut NoObserver).unwrap(); // [B, S, V]
    let (b, s, v) = all.dims3().unwrap();
    let last = all.narrow(1, s - 1, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for backend in [Backend::Cpu, Backend::CpuOps] {
        let target = Target::from(backend);
        let got = with_prefill(target, Weights::Resident(&model), |p| p.prefill(&tokens, &mut NoObserver)).unwrap();
        assert_eq!(got.dims(), [b, 1, v], "{backend:?}");
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = got.iter().zip(&last).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{backend:?}: {worst}");
        // `run`'s observers: its NaN watch and the final norm an MTP head reads (the watch once
        // asked for every position's logits, so `run` made them all).
        let (mut watch, mut norm) = (NonFiniteWatch::default(), Recorder::new(Selector::new("final_norm", None)));
        let got =
            with_prefill(target, Weights::Resident(&model), |p| p.prefill(&tokens, &mut Tee(&mut watch, &mut norm)));
        assert_eq!(got.unwrap().dims(), [b, 1, v], "{backend:?}: run's observers");
        let mut recorder = Recorder::new(Selector::new("logits", None));
        let got = with_prefill(target, Weights::Resident(&model), |p| p.prefill(&tokens, &mut recorder)).unwrap();
        assert_eq!(got.dims(), [b, s, v], "{backend:?}: recorded, every position's");
    }
}

/// So does the MTP head: the draft of the token after the prompt is the last pair's, and `run
/// --mtp` made every pair's (S - 1 positions of lm_head), as a dump recording them still does.
#[test]
fn the_mtp_head_computes_the_drafts_it_is_asked_for() {
    use glimpse::device::{with_prefill, Target};
    use glimpse::hooks::{HookPoint, NoObserver, NonFiniteWatch, Recorder, Selector};
    use glimpse::model::mtp::Mtp;
    use glimpse::model::Weights;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/mtp");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let (model, head) = (Model::load(&ckpt).unwrap(), Mtp::load(&ckpt).unwrap());
    let tokens = Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
    let mut prefill = Recorder::new(Selector::new("final_norm", None));
    model.forward(&tokens, &mut prefill).unwrap();
    let h = prefill.get(HookPoint::FinalNorm).unwrap().narrow(1, 0, tokens.seq - 1).unwrap();
    let all = head.forward(&model, &h, &tokens, &mut NoObserver).unwrap(); // [B, S-1, V]
    let (b, pairs, v) = all.dims3().unwrap();
    let last = all.narrow(1, pairs - 1, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for backend in [Backend::Cpu, Backend::CpuOps] {
        let target = Target::from(backend);
        let got = with_prefill(target, Weights::Resident(&model), |p| {
            p.mtp(&head, &h, &tokens, &mut NonFiniteWatch::default())
        });
        let got = got.unwrap();
        assert_eq!(got.dims(), [b, 1, v], "{backend:?}");
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let worst = got.iter().zip(&last).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{backend:?}: {worst}");
        let mut recorder = Recorder::new(Selector::new("mtp.logits", None));
        let got =
            with_prefill(target, Weights::Resident(&model), |p| p.mtp(&head, &h, &tokens, &mut recorder)).unwrap();
        assert_eq!(got.dims(), [b, pairs, v], "{backend:?}: recorded, every pair's");
        assert_eq!(recorder.get(HookPoint::MtpLogits).map(|t| t.dims().to_vec()), Some(vec![b, pairs, v]));
    }
}

/// The device benchmark counts the matrix-product work it times: 2 x tokens x every weight a
/// token meets (experts: top-k of them), computed here from the config alone.
#[test]
fn the_device_benchmark_counts_the_matmul_flops_of_a_prefill() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
    let c = &model.config;
    let (h, t) = (c.hidden_size, 16u64);
    assert!(t as usize > c.index_topk, "a prompt the indexer scores");
    let per_token = matmul_weights_per_token(c, true);
    let r = glimpse::bench::run_device(&CpuOps, &model, t as usize, 2).unwrap();
    assert_eq!(r.flops, 2 * t * per_token as u64);
    // With the last position's logits only, the lm_head meets one token, not t.
    assert_eq!(r.flops_last, r.flops - 2 * (t - 1) * (c.vocab_size * h) as u64);
    assert_eq!((r.runs.len(), r.runs_last.len()), (2, 2));
    assert!(r.render().contains("prefill 16 tokens, logits left on the device: median"), "{}", r.render());
    // The profiled prefill's sections hold every counted product once, each attention section
    // ran once a layer, and the expert GEMMs are the routed experts' 3 products of top-k rows.
    let p = &r.profile;
    let counted: u64 =
        p.sections.iter().filter(|s| !s.name.ends_with("top-k") && !s.name.contains("softmax")).map(|s| s.flops).sum();
    assert_eq!(counted, r.flops, "{}", p.render());
    let layers = c.num_hidden_layers;
    for name in ["attention: projections, norms, RoPE", "attention: scores, softmax, values", "attention: o_proj"] {
        assert_eq!(p.sections.iter().find(|s| s.name == name).map(|s| s.calls), Some(layers), "{name}");
    }
    let moe = (0..layers).filter(|&i| c.mlp_kind(i) == glimpse::config::MlpKind::Moe).count() as u64;
    let (_, expert_flops) = p.total("expert GEMMs");
    let per_layer = 2 * t * (c.num_experts_per_tok * 3 * c.moe_intermediate_size * h) as u64;
    assert_eq!(expert_flops, moe * per_layer);
    // The attention's products: 2 x (nope + rope + v) x heads for each (query, selected key) pair.
    let (_, attn) = p.total("attention: scores, softmax, values");
    let k = (c.index_topk as u64).min(t); // each query's selected keys, fewer at the start
    let pairs: u64 = (1..=t).map(|p| p.min(k)).sum();
    let widths = (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * c.num_attention_heads;
    assert_eq!(attn, layers as u64 * 2 * pairs * widths as u64);
    assert!(r.steps.is_none(), "the host ops time no steps of their own");
}

/// The weights of the products a token meets in a prefill (experts: top-k of them; the
/// indexer's when it scores the prompt), from the config alone.
fn matmul_weights_per_token(c: &glimpse::config::Config, indexer: bool) -> usize {
    let h = c.hidden_size;
    let mut per_token = 0usize;
    for i in 0..c.num_hidden_layers {
        let (nh, qk, r, rd) = (c.num_attention_heads, c.qk_head_dim(), c.kv_lora_rank, c.qk_rope_head_dim);
        per_token += c.q_lora_rank * h + nh * qk * c.q_lora_rank + (r + rd) * h;
        per_token += nh * (c.qk_nope_head_dim + c.v_head_dim) * r + h * nh * c.v_head_dim;
        if indexer && c.indexer_kind(i) == glimpse::config::IndexerKind::Full {
            let (n, d) = (c.index_n_heads, c.index_head_dim);
            per_token += n * d * c.q_lora_rank + d * h + n * h;
        }
        per_token += match c.mlp_kind(i) {
            glimpse::config::MlpKind::Dense => 3 * c.intermediate_size * h,
            glimpse::config::MlpKind::Moe => {
                c.n_routed_experts * h
                    + c.num_experts_per_tok * 3 * c.moe_intermediate_size * h
                    + 3 * c.shared_intermediate_size() * h
            }
        };
    }
    per_token + c.vocab_size * h
}

/// `LogitRows::Last` computes the last row of each sequence's logits (batch 2 here).
#[test]
fn the_last_positions_logits_are_the_last_rows_of_all() {
    use glimpse::device::{forward::LogitRows, Ops};
    use glimpse::hooks::NoObserver;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/grouped-shared-yarn");
    let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
    let tokens = Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
    let (b, s, v) = (tokens.batch, tokens.seq, model.config.vocab_size);
    assert_eq!(b, 2);
    let device = DeviceModel::new(&CpuOps, &model).unwrap();
    let all = CpuOps.download(&device.forward_on_device(&tokens, LogitRows::All, &mut NoObserver).unwrap()).unwrap();
    let last = CpuOps.download(&device.forward_on_device(&tokens, LogitRows::Last, &mut NoObserver).unwrap()).unwrap();
    assert_eq!(last.len(), b * v);
    // Equal up to summation order: a product of 2 rows may block its sums differently.
    for r in 0..b {
        let rows = last[r * v..(r + 1) * v].iter().zip(&all[(r * s + s - 1) * v..(r * s + s) * v]);
        let worst = rows.map(|(a, e)| (a - e).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "sequence {r}: max abs diff {worst:e}");
    }
}

mod common;

/// The `--device` wiring, exercised with `cpu-ops` (the GPU path's code on the host): `run`
/// writes the same hook points as the CPU model (diff clean, every name in common), `audit`
/// prints the same table, `verify` matches its reference, and `bench`/`selftest` run it.
#[test]
fn the_device_flag_runs_the_device_path_in_every_command() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/grouped-shared-yarn");
    let m = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (ours, cpu) = (tmp.path().join("ops.safetensors"), tmp.path().join("cpu.safetensors"));
    let tokens = "1,2,3,4,5;6,7,8,9,10";
    for (out, extra) in [(&ours, vec!["--device", "cpu-ops"]), (&cpu, vec![])] {
        let args = [vec!["run", "--model", m, "--tokens", tokens, "--dump", out.to_str().unwrap()], extra].concat();
        let (code, text) = common::code_and_text(&args);
        assert_eq!(code, 0, "{text}");
    }
    let (code, text) = common::code_and_text(&["diff", ours.to_str().unwrap(), cpu.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("only in"), "the device path records every hook point the CPU does: {text}");

    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "1,2,3,4,5,6\n9,8,7\n").unwrap();
    let audit = |extra: &[&str]| {
        let args = [&["audit", "--model", m, "--prompts", prompts.to_str().unwrap()][..], extra].concat();
        let (code, text) = common::code_and_text(&args);
        assert_eq!(code, 0, "{text}");
        text
    };
    assert_eq!(audit(&["--device", "cpu-ops"]), audit(&[]));

    let (code, text) = common::code_and_text(&["verify", "--model", m, "--device", "cpu-ops"]);
    assert_eq!(code, 0, "{text}");
    let names = Dump::open(&dir.join("reference.safetensors")).unwrap().names().len();
    assert!(text.contains(&format!("{names} of {names} tensors match")), "{text}");
    // Isolation and replay go through the device path too.
    let replayed = ["verify", "--model", m, "--device", "cpu-ops", "--isolate", "--force-routing", "--force-selection"];
    let (code, text) = common::code_and_text(&replayed);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("{names} of {names} tensors match (atol 1e-4, rtol 1e-4, isolated layers, the reference's expert choices and DSA selections replayed)")),
        "{text}"
    );
    let (code, text) =
        common::code_and_text(&["bench", "--model", m, "--tokens", "8", "--repeat", "1", "--device", "cpu-ops"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("prefill 8 tokens, logits left on the device: median"), "{text}");
    let (code, text) = common::code_and_text(&["selftest", "--device", "cpu-ops"]);
    assert_eq!(code, 0, "{text}");
    // The device path checks the main forward and the MTP head: every reference name; streamed,
    // which cannot run the head, every name but the head's.
    let mtp = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/mtp");
    let layers = Checkpoint::open(&mtp).unwrap().config.num_hidden_layers;
    let names = Dump::open(&mtp.join("reference.safetensors")).unwrap().names();
    let main = names.iter().filter(|n| !n.starts_with("mtp.") && !n.starts_with(&format!("layers.{layers}."))).count();
    let all = names.len();
    assert!(main < all);
    assert!(text.contains(&format!("golden/mtp (cpu-ops): {all} of {all} tensors match")), "{text}");
    assert!(text.contains(&format!("golden/mtp (cpu-ops, --stream): {main} of {main} tensors match")), "{text}");
    let streamed = text.lines().filter(|l| l.starts_with("verify ") && l.contains("(cpu-ops, --stream)")).count();
    assert_eq!(streamed, common::GOLDEN_CASES.len(), "{text}");
    assert!(!text.contains("FAILED"), "{text}");
}

/// `--device cpu`, the default, goes with the flags only the CPU model takes, written out or not;
/// another device is refused beside each, naming the flag, before anything is written. (The
/// TUI's is only refused here: accepted, it would open the terminal.)
#[test]
fn the_flags_only_the_cpu_model_takes_refuse_another_device_and_not_the_cpu() {
    let m = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let m = m.to_str().unwrap();
    let reference = format!("{m}/reference.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("w.safetensors");
    let out = out.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["verify", "--model", m, "--layers", "1..2"], "--layers"),
        (&["verify", "--model", m, "--decode"], "--decode"),
        (&["run", "--model", m, "--from-dump", &reference, "--layers", "2..3", "--dump", out], "--layers"),
        (&["run", "--model", m, "--from-dump", &reference, "--dump", out], "--from-dump"),
        (&["tui", "--dump", &reference, "--golden", &reference], "--dump"),
    ];
    for (args, flag) in cases {
        if args[0] != "tui" {
            let _ = std::fs::remove_file(out);
            let (code, text) = common::code_and_text(&[args, &["--device", "cpu"]].concat());
            assert_eq!(code, 0, "{args:?} --device cpu: {text}");
        }
        let _ = std::fs::remove_file(out);
        let (code, text) = common::code_and_text(&[args, &["--device", "cpu-ops"]].concat());
        assert_eq!(code, 2, "{args:?}: {text}");
        let said = format!("--device cpu-ops cannot be used with {flag}: only the CPU model takes it");
        assert!(text.contains(&said) && text.trim().lines().count() == 1, "{args:?}: {text}");
        assert!(!Path::new(out).exists(), "{args:?}");
    }
}

/// Feeds zeros as layer 1's input and as the final norm's: RMSNorm of zeros is zeros, so the
/// recorded `layers.1.input_norm` and `final_norm` show whether each forward pass took the
/// observer's hidden state (`isolated_input`) or kept its own.
struct ZeroInputs(glimpse::hooks::Recorder, usize);

impl glimpse::hooks::Observer for ZeroInputs {
    fn wants(&self, p: glimpse::hooks::HookPoint) -> bool {
        self.0.wants(p)
    }
    fn observe(&mut self, p: glimpse::hooks::HookPoint, v: &candle_core::Tensor) -> glimpse::error::Result<()> {
        self.0.observe(p, v)
    }
    fn isolated_input(&mut self, layer: usize) -> glimpse::error::Result<Option<candle_core::Tensor>> {
        let zeros =
            |shape: &[usize]| candle_core::Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu);
        Ok(if layer == 1 || layer == self.1 { Some(zeros(&[1, 6, 64])?) } else { None })
    }
}

#[test]
fn both_forward_passes_take_an_isolated_input_from_the_observer() {
    use glimpse::device::Prefill;
    use glimpse::hooks::{HookPoint, LayerHook, Recorder, Selector};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
    assert_eq!(model.config.hidden_size, 64);
    let tokens = glimpse::model::Tokens::parse("1,2,3,4,5,6").unwrap();
    let device = DeviceModel::new(&CpuOps, &model).unwrap();
    for (name, p) in [("cpu", &model as &dyn Prefill), ("cpu-ops", &device)] {
        let mut obs = ZeroInputs(Recorder::new(Selector::new("*", None)), model.layers.len());
        p.prefill(&tokens, &mut obs).unwrap();
        for point in
            [HookPoint::Layer(0, LayerHook::InputNorm), HookPoint::Layer(1, LayerHook::InputNorm), HookPoint::FinalNorm]
        {
            let max = obs.0.get(point).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            // Layer 0 keeps its own input (the embedding), the others got zeros.
            let fed = point != HookPoint::Layer(0, LayerHook::InputNorm);
            assert_eq!(max == 0.0, fed, "{name}: {} max |x| {max}", point.name());
        }
    }
}

/// `verify --device` of a reference holding the MTP head holds the head's layer beside the
/// model's (its head runs on the device too, from the device's final norm), so its memory check
/// counts it, as the CPU path's does: a budget between the two estimates refuses both paths
/// alike.
#[test]
fn verify_on_a_device_counts_the_mtp_heads_layer_in_its_memory_check() {
    use glimpse::memory::{estimate_on, Recording};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/mtp");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tokens = Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
    let n = ckpt.config.num_hidden_layers;
    let size = (tokens.batch, tokens.seq);
    let m = dir.to_str().unwrap();
    for (device, backend) in [("cpu-ops", Backend::CpuOps), ("cpu", Backend::Cpu)] {
        let total = |last: usize| estimate_on(backend.into(), &ckpt, size, &(0..=last), Recording::Nothing).total();
        let (main, with_head) = (total(n - 1), total(n));
        assert!(with_head > main, "the head's layer weighs something: {main} vs {with_head}");
        let between = ((main + with_head) / 2).to_string();
        let (code, text) =
            common::code_and_text(&["--max-memory", &between, "verify", "--model", m, "--device", device]);
        assert_eq!(code, 2, "{device}: {text}");
        assert!(text.contains("but --max-memory is"), "{device}: {text}");
        let enough = (with_head + with_head / 4).to_string();
        let (code, text) =
            common::code_and_text(&["--max-memory", &enough, "verify", "--model", m, "--device", device]);
        assert_eq!(code, 0, "{device}: {text}");
    }
}

/// `cpu-ops` widens every weight of the main model to f32 beside the CPU model's (which keeps
/// them as loaded): its memory check counts those copies, 4 bytes a weight by the checkpoint's
/// own shapes, so a budget the CPU's run fits in can refuse it (measured: 7.85 GB estimated
/// against a 7.82 GB peak for 128 tokens of a 2-layer GLM-5-shaped bf16 checkpoint, where the
/// CPU's 2.98 GB was all it counted before).
#[test]
fn cpu_ops_counts_its_f32_copies_of_the_weights() {
    use glimpse::memory::{estimate_on, Recording};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let n = ckpt.config.num_hidden_layers;
    // Every weight of the main model, from the safetensors header.
    let weights: u64 = ckpt
        .names()
        .filter(|name| glimpse::layout::layer_of(name).is_none_or(|i| i < n) && !name.ends_with("_scale_inv"))
        .map(|name| ckpt.shape(name).unwrap().iter().product::<usize>() as u64)
        .sum();
    let estimate = |backend: Backend| estimate_on(backend.into(), &ckpt, (1, 8), &(0..=n - 1), Recording::Nothing);
    let (cpu, ops) = (estimate(Backend::Cpu), estimate(Backend::CpuOps));
    assert!(ops.weights >= 4 * weights, "{} bytes for {weights} weights", ops.weights);
    assert!(ops.total() > cpu.total() + 2 * weights, "cpu {cpu:?}, cpu-ops {ops:?}");
    let between = (cpu.total() + 2 * weights).to_string();
    let m = dir.to_str().unwrap();
    let run = |device| {
        common::code_and_text(&[
            "--max-memory",
            &between,
            "run",
            "--model",
            m,
            "--tokens",
            "1,2,3,4,5,6,7,8",
            "--device",
            device,
        ])
    };
    assert_eq!(run("cpu").0, 0, "{:?}", run("cpu"));
    let (code, text) = run("cpu-ops");
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("but --max-memory is"), "{text}");
}

/// Records the hook points a pass reports.
#[derive(Default)]
struct Seen(Vec<glimpse::hooks::HookPoint>);

impl glimpse::hooks::Observer for Seen {
    fn wants(&self, _: glimpse::hooks::HookPoint) -> bool {
        true
    }
    fn observe(&mut self, point: glimpse::hooks::HookPoint, _: &candle_core::Tensor) -> glimpse::Result<()> {
        self.0.push(point);
        Ok(())
    }
}

/// `audit --layers A..B`'s prefill runs no further than layer B on both paths (the CPU model and
/// the device pass): nothing of a later layer, the final norm or the logits is reported; past
/// the last layer it is the whole prefill.
#[test]
fn a_prefill_through_a_layer_stops_there() {
    use glimpse::device::Prefill;
    use glimpse::hooks::HookPoint;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
    let tokens = Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
    let device = DeviceModel::new(&CpuOps, &model).unwrap();
    let passes: [&dyn Prefill; 2] = [&model, &device];
    for (path, p) in ["cpu", "cpu-ops"].iter().zip(passes) {
        let mut seen = Seen::default();
        p.prefill_through(&tokens, 2, &mut seen).unwrap();
        let last = seen.0.iter().filter_map(|h| h.layer()).max();
        assert_eq!(last, Some(2), "{path}");
        assert!(seen.0.contains(&HookPoint::Layer(2, glimpse::hooks::LayerHook::Output)), "{path}");
        assert!(!seen.0.iter().any(|h| matches!(h, HookPoint::FinalNorm | HookPoint::Logits)), "{path}");
        let mut whole = Seen::default();
        p.prefill_through(&tokens, model.config.num_hidden_layers - 1, &mut whole).unwrap();
        assert!(whole.0.contains(&HookPoint::FinalNorm), "{path}");
    }
}

/// A prompt no longer than `index_topk` keeps every causal key whatever the indexer's scores, so
/// both forward passes (the CPU model's and the device forward on the host ops) skip scoring it
/// unless the scores are recorded: every other hook point is the same bit for bit
/// (`common::assert_an_unscored_prompt_records_the_same`); and the skipping device forward counts
/// no indexer products.
#[test]
fn a_prompt_within_index_topk_is_not_scored_and_records_the_same() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat");
    let model = Model::load(&Checkpoint::open(&dir).unwrap()).unwrap();
    let c = &model.config;
    let device = DeviceModel::new(&CpuOps, &model).unwrap();
    common::assert_an_unscored_prompt_records_the_same(&model, |tokens, r| {
        model.forward(tokens, r).unwrap();
    });
    common::assert_an_unscored_prompt_records_the_same(&model, |tokens, r| {
        device.forward(tokens, r).unwrap();
    });
    let (s, full) =
        (c.index_topk, (0..c.num_hidden_layers).filter(|&i| c.indexer_kind(i) == IndexerKind::Full).count());
    // The indexer's products (wq_b, wk, weights_proj) are not run, so not counted.
    let r = glimpse::bench::run_device(&CpuOps, &model, s, 1).unwrap();
    assert_eq!(r.flops, 2 * (s * matmul_weights_per_token(c, false)) as u64);
    let p = &r.profile;
    assert!(p.sections.iter().all(|x| !x.name.starts_with("indexer: projections")), "{}", p.render());
    let skipped = p.sections.iter().find(|x| x.name == glimpse::device::forward::INDEXER_NOT_SCORED);
    assert_eq!(skipped.map(|x| x.calls), Some(full), "{}", p.render());
    // The benchmark says so where its times are (transformers scores such a prompt); a prompt one
    // longer is scored, and nothing is said.
    let said = format!("indexer: not scored at {full} of its layers");
    assert!(r.render().contains(&said), "{}", r.render());
    let longer = glimpse::bench::run_device(&CpuOps, &model, s + 1, 1).unwrap().render();
    assert!(!longer.contains("indexer: not scored"), "{longer}");
}

/// `verify --isolate` starts each layer from the reference's state on both forward passes, a
/// shared-indexer layer from the reference's selection too (the CPU's layer windows start so; the
/// device forward asked only for the hidden state, and carried its own selection): with one row
/// of a full layer's selection changed in the reference, both report the same tensors off, the
/// shared layer after it among them.
#[test]
fn isolated_shared_indexer_layers_start_from_the_references_selection_on_both_paths() {
    use glimpse::dump::Values;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/grouped-shared-yarn");
    let config = Checkpoint::open(&dir).unwrap().config;
    let (full, shared) = (2, 3);
    assert_eq!((config.indexer_kind(full), config.indexer_kind(shared)), (IndexerKind::Full, IndexerKind::Shared));
    let tmp = tempfile::tempdir().unwrap();
    let edited = common::edit_dump(&dir.join("reference.safetensors"), &tmp.path().join("edited.st"), |t| {
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| n == &format!("layers.{full}.dsa.topk")).unwrap();
        let (Values::I64(ids), &[_, s, k]) = (v, &shape[..]) else { panic!("dsa.topk is [B, S, K] of i64") };
        // The last query of the first row keeps other keys: the first k, or the last k if those
        // were its keys already.
        let row = &mut ids[(s - 1) * k..s * k];
        let first: Vec<i64> = (0..k as i64).collect();
        let other = if row == &first[..] { ((s - k) as i64..s as i64).collect() } else { first };
        row.copy_from_slice(&other);
    });
    let off = |device: &str| -> Vec<String> {
        let golden = edited.to_str().unwrap();
        let args =
            ["verify", "--model", dir.to_str().unwrap(), "--golden", golden, "--isolate", "--json", "--device", device];
        let json = common::text(&common::glimpse(&args)).0;
        let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        let tensors = v["tensors"].as_array().unwrap().iter();
        tensors.filter(|t| t["match"] == false).map(|t| t["name"].as_str().unwrap().to_string()).collect()
    };
    let cpu = off("cpu");
    assert!(cpu.iter().any(|n| n.starts_with(&format!("layers.{shared}."))), "{cpu:?}");
    assert_eq!(off("cpu-ops"), cpu);
}

/// `--stream` on a device: each layer is uploaded as the run reaches it and freed after, and
/// records every hook point the same, bit for bit, as the model uploaded whole, on every golden
/// case (f32, bf16 with a tied head, block-FP8 in shards, grouped routing with a shared indexer,
/// an MTP layer left out).
#[test]
fn a_streamed_device_model_records_as_the_resident_one() {
    for case in common::GOLDEN_CASES {
        common::assert_streamed_records_as_resident(case, &CpuOps);
    }
}

/// `run --device cpu-ops --stream` writes the dump the run without `--stream` writes, and its
/// memory check counts one layer's copies, not the model's; `verify --device cpu-ops --stream`
/// matches a golden case, isolated and replayed too, and refuses a reference that checks the MTP
/// head, which needs the resident model.
#[test]
fn run_and_verify_stream_on_a_device() {
    use glimpse::memory::{estimate_on, estimate_streamed_on, Recording, Residency};
    let m = common::golden("fp8-sharded");
    let tmp = tempfile::tempdir().unwrap();
    let tokens = m.join("reference.safetensors");
    let dump = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let args = ["run", "--model", m.to_str().unwrap(), "--tokens-from", tokens.to_str().unwrap(), "--device"];
        let args = [&args[..], &["cpu-ops", "--dump", out.to_str().unwrap()], extra].concat();
        let (code, text) = common::code_and_text(&args);
        assert_eq!(code, 0, "{text}");
        out
    };
    let (whole, streamed) = (dump("whole.safetensors", &[]), dump("streamed.safetensors", &["--stream"]));
    let args = ["diff", whole.to_str().unwrap(), streamed.to_str().unwrap(), "--atol", "0", "--rtol", "0"];
    let (code, text) = common::code_and_text(&args);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("only in"), "{text}");

    let ckpt = Checkpoint::open(&m).unwrap();
    let n = ckpt.config.num_hidden_layers;
    let (target, size) = (Backend::CpuOps.into(), (1, 8));
    let resident = estimate_on(target, &ckpt, size, &(0..=n - 1), Recording::Nothing);
    let streamed = estimate_streamed_on(target, &ckpt, size, Recording::Nothing, Residency::Streamed);
    assert!(streamed.weights < resident.weights / 2, "{streamed:?} against {resident:?}");

    let m = common::golden("grouped-shared-yarn");
    let names = Dump::open(&m.join("reference.safetensors")).unwrap().names().len();
    let verify = ["verify", "--model", m.to_str().unwrap(), "--device", "cpu-ops", "--stream"];
    for extra in [&[][..], &["--isolate", "--force-routing", "--force-selection"]] {
        let (code, text) = common::code_and_text(&[&verify[..], extra].concat());
        assert_eq!(code, 0, "{text}");
        assert!(text.contains(&format!("{names} of {names} tensors match")), "{text}");
    }
    let mtp = common::golden("mtp");
    let o = common::glimpse(&["verify", "--model", mtp.to_str().unwrap(), "--device", "cpu-ops", "--stream"]);
    common::assert_error(&o, "the reference checks the MTP head, which --stream does not run");
}
