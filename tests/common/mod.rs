//! Helpers shared by the integration tests that drive the `glimpse` binary.
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};

pub mod tui;

/// A bundled golden case's folder.
pub fn golden(case: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(case)
}

/// A path as an argument.
pub fn s(p: &std::path::Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_string()
}

/// Runs the binary with no standard input.
pub fn glimpse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).stdin(Stdio::null()).output().expect("the binary runs")
}

/// Exit code and stdout + stderr, checking that nothing panicked.
pub fn code_and_text(args: &[&str]) -> (i32, String) {
    let o = glimpse(args);
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!text.contains("panicked"), "{args:?}: {text}");
    (o.status.code().unwrap_or(-1), text)
}

/// Stdout and stderr as text.
pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Exit code 0; (stdout, stderr).
pub fn assert_ok(o: &Output) -> (String, String) {
    let (out, err) = text(o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    (out, err)
}

/// A GLM-5-shaped config small enough to synthesise in a test (2 layers, 4 experts).
pub const TINY_CONFIG: &str = r#"{
  "model_type": "glm_moe_dsa", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 40,
  "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
  "n_routed_experts": 4, "num_experts_per_tok": 2, "q_lora_rank": 24, "kv_lora_rank": 16,
  "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "first_k_dense_replace": 1,
  "index_topk": 3, "index_head_dim": 8, "index_n_heads": 4
}"#;

/// A tiny synthetic checkpoint written by the binary itself.
pub fn synth(dir: &std::path::Path, seed: u64) -> std::path::PathBuf {
    let cfg = dir.join("tiny.json");
    std::fs::write(&cfg, TINY_CONFIG).unwrap();
    let out = dir.join(format!("model-{seed}"));
    let seed = seed.to_string();
    let o = glimpse(&[
        "synth",
        "--config",
        cfg.to_str().unwrap(),
        "--dtype",
        "f32",
        "--seed",
        &seed,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    out
}

/// `glimpse run --model MODEL ARGS... --dump DIR/NAME`, which must succeed; the dump's path.
pub fn run_dump(model: &str, args: &[&str], dir: &std::path::Path, name: &str) -> String {
    let path = dir.join(name).to_str().unwrap().to_string();
    let run: Vec<&str> = ["run", "--model", model].iter().chain(args).chain(&["--dump", &path]).copied().collect();
    assert_ok(&glimpse(&run));
    path
}

/// Exit code 2, exactly one line on stderr containing `needle`, no panic.
pub fn assert_error(o: &Output, needle: &str) {
    let (out, err) = text(o);
    assert_eq!(o.status.code(), Some(2), "stdout: {out}\nstderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// 8 layers (1 dense, 7 MoE with 16 experts), about 400 MB in f32.
pub const EIGHT_LAYERS: &str = r#"{
  "model_type": "glm_moe_dsa", "vocab_size": 1024, "hidden_size": 512, "intermediate_size": 1024,
  "moe_intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 4,
  "n_routed_experts": 16, "num_experts_per_tok": 4, "q_lora_rank": 256, "kv_lora_rank": 128,
  "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "first_k_dense_replace": 1,
  "index_topk": 8, "index_head_dim": 64, "index_n_heads": 8
}"#;

/// The golden cases the device forward pass is checked on (every bundled one).
pub const GOLDEN_CASES: [&str; 5] = ["flat", "grouped-shared-yarn", "fp8-sharded", "bf16-fused", "mtp"];

/// The device forward pass on `ops` matches every golden case at the spec's tolerance: every
/// tensor of the main forward compared, none missing, DSA selections and logits among them.
pub fn assert_device_matches_every_golden_case<O: glimpse::device::Ops>(ops: &O) {
    use glimpse::verify::{format_line, verify_prefill};
    for case in GOLDEN_CASES {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(case);
        let ckpt = glimpse::checkpoint::Checkpoint::open(&dir).unwrap();
        let model = glimpse::model::Model::load(&ckpt).unwrap();
        let golden = glimpse::dump::Dump::open(&dir.join("reference.safetensors")).unwrap();
        let device = glimpse::device::forward::DeviceModel::new(ops, &model).unwrap();
        let mut r =
            verify_prefill(&device, glimpse::model::Weights::Resident(&model), &golden, &Default::default()).unwrap();
        // And the MTP head, on the device, where the reference checks it.
        let mtp = glimpse::verify::has_mtp(&golden);
        if mtp {
            let head = glimpse::model::mtp::Mtp::load(&ckpt).unwrap();
            glimpse::verify::verify_mtp(&device, (&model.config, &head), &golden, &Default::default(), &mut r).unwrap();
        }
        let bad: Vec<String> = r.results.iter().filter(|c| !c.ok).map(format_line).collect();
        assert!(bad.is_empty(), "{case}:\n{}", bad.join("\n"));
        assert!(r.only_in_reference.is_empty(), "{case}: not produced: {:?}", r.only_in_reference);
        assert_eq!(r.results.len(), golden.names().len(), "{case}: every tensor of the reference compared");
        let compared = |name: &str| r.results.iter().any(|c| c.name == name);
        assert!(compared("layers.1.dsa.topk") && compared("logits"));
        assert_eq!(compared("mtp.logits"), mtp, "{case}");
        println!("{case}: {} tensors match", r.results.len());
    }
}

/// A streamed device model (`DeviceModel::streamed`: each layer uploaded as the run reaches it,
/// the prompt's embedding rows read on the host) records every hook point of `case`'s reference
/// tokens, the indexer's scores and the router's extras included, bit for bit as the model with
/// every weight uploaded at once does, on the same `ops`: the same hook points, from `input_ids`
/// and `embeddings` through every layer's output to the logits.
#[allow(dead_code)]
pub fn assert_streamed_records_as_resident<O: glimpse::device::Ops>(case: &str, ops: &O) {
    use glimpse::device::forward::DeviceModel;
    use glimpse::hooks::{HookPoint, LayerHook, Recorder, Selector};
    let dir = golden(case);
    let ckpt = glimpse::checkpoint::Checkpoint::open(&dir).unwrap();
    let model = glimpse::model::Model::load(&ckpt).unwrap();
    let tokens = glimpse::dump::Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap();
    let record = |p: &dyn glimpse::device::Prefill| {
        let mut r = Recorder::new(Selector::new("*,*.dsa.scores", None));
        p.prefill(&tokens, &mut r).unwrap();
        r.tensors
    };
    let whole = record(&DeviceModel::new(ops, &model).unwrap());
    let layer_by_layer = record(&DeviceModel::streamed(ops, &ckpt));
    let points: Vec<HookPoint> = whole.iter().map(|(p, _)| *p).collect();
    assert_eq!(points, layer_by_layer.iter().map(|(p, _)| *p).collect::<Vec<_>>(), "{case}");
    let n = ckpt.config.num_hidden_layers;
    let ends = [HookPoint::InputIds, HookPoint::Embeddings, HookPoint::Logits];
    let outputs = (0..n).map(|i| HookPoint::Layer(i, LayerHook::Output));
    assert!(ends.into_iter().chain(outputs).all(|p| points.contains(&p)), "{case}: {points:?}");
    let bits = |t: &candle_core::Tensor| -> Vec<u64> {
        let v = t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    for ((p, a), (_, b)) in whole.iter().zip(&layer_by_layer) {
        assert_eq!(a.dims(), b.dims(), "{case}: {}", p.name());
        assert!(bits(a) == bits(b), "{case}: {} differs", p.name());
    }
    println!("{case}: {} hook points the same", whole.len());
}

/// A prompt no longer than `index_topk` keeps every causal key, so a forward pass need not score
/// it: for prompts of `index_topk - 3` and `index_topk` tokens of the flat case in batch 2,
/// `forward` (a forward pass of `model` with an observer) records every hook point but
/// `dsa.scores` the same bit for bit whether the scores are recorded (so computed) or not, and
/// each full indexer layer's margins are +inf.
#[allow(dead_code)]
pub fn assert_an_unscored_prompt_records_the_same(
    model: &glimpse::model::Model,
    forward: impl Fn(&glimpse::model::Tokens, &mut glimpse::hooks::Recorder),
) {
    use glimpse::hooks::{HookPoint, LayerHook, Recorder, Selector};
    let c = &model.config;
    let full = (0..c.num_hidden_layers).filter(|&i| c.indexer_kind(i) == glimpse::config::IndexerKind::Full).count();
    let ids = glimpse::dump::Dump::open(&golden("flat").join("reference.safetensors")).unwrap().tokens().unwrap().ids;
    for s in [c.index_topk - 3, c.index_topk] {
        let tokens = glimpse::model::Tokens { batch: 2, seq: s, ids: [&ids[..s], &ids[s..2 * s]].concat() };
        let record = |scores: bool| {
            let mut r = Recorder::new(Selector::new(if scores { "*,*dsa.scores" } else { "*" }, None));
            forward(&tokens, &mut r);
            let scored = r.tensors.iter().filter(|(p, _)| matches!(p, HookPoint::Layer(_, LayerHook::DsaScores)));
            assert_eq!(scored.count(), if scores { full } else { 0 });
            r.tensors.retain(|(p, _)| !matches!(p, HookPoint::Layer(_, LayerHook::DsaScores)));
            r.tensors
        };
        let (scored, unscored) = (record(true), record(false));
        assert_eq!(scored.len(), unscored.len());
        let mut margins = 0;
        for ((p, a), (q, b)) in scored.iter().zip(&unscored) {
            assert_eq!(p, q);
            let bits = |t: &candle_core::Tensor| -> Vec<u64> {
                let v = t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            assert!(bits(a) == bits(b), "{} ({s} tokens)", p.name());
            if let HookPoint::Layer(_, LayerHook::DsaMargin) = p {
                assert!(bits(b).iter().all(|&x| x == f64::INFINITY.to_bits()), "{}", p.name());
                margins += 1;
            }
        }
        assert_eq!(margins, full);
    }
}

/// Prints every CUDA parity check and fails naming those that failed.
#[cfg(feature = "cuda")]
pub fn all_pass(checks: &[glimpse::cuda::selftest::Check]) {
    for c in checks {
        println!("{:<60} max_abs {:9.3e}  {}", c.name, c.max_abs, if c.ok { "ok" } else { "FAILED" });
    }
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok).map(|c| &c.name).collect();
    assert!(failed.is_empty(), "failed: {failed:?}");
}

/// The margin that decided row `row` (flat: batch x query) of `layer`'s DSA selection in a
/// transformers dump, computed here from its recorded `dsa.scores` [B, S, T] alone, independently
/// of glimpse: the K-th minus the (K+1)-th best causal score (+inf when every causal key is kept).
pub fn dsa_margin_from_scores(d: &glimpse::dump::Dump, layer: usize, row: usize) -> f32 {
    let (glimpse::dump::Values::F32(scores), shape) = d.values(&format!("layers.{layer}.dsa.scores")).unwrap() else {
        panic!("layers.{layer}.dsa.scores are not floats")
    };
    let (s, t) = (shape[1], shape[2]);
    let k = d.shape(&format!("layers.{layer}.dsa.topk")).unwrap()[2];
    let mut causal = scores[row * t..row * t + row % s + 1].to_vec();
    if causal.len() <= k {
        return f32::INFINITY;
    }
    causal.sort_by(|a, b| b.total_cmp(a));
    causal[k - 1] - causal[k]
}

/// A dump tensor: name, values, shape.
pub type Named = (String, glimpse::dump::Values, Vec<usize>);

/// A copy of dump `src` at `dst` with the float tensor `name`'s values edited by `edit` (given
/// them and the tensor's shape).
pub fn edit_floats(
    src: &std::path::Path,
    dst: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<f32>, &[usize]),
) -> std::path::PathBuf {
    edit_tensor(src, dst, name, |values, shape| match values {
        glimpse::dump::Values::F32(v) => edit(v, shape),
        _ => panic!("{name} is not F32"),
    })
}

/// [`edit_floats`] for an integer tensor (a selection, expert ids).
pub fn edit_ints(
    src: &std::path::Path,
    dst: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<i64>, &[usize]),
) -> std::path::PathBuf {
    edit_tensor(src, dst, name, |values, shape| match values {
        glimpse::dump::Values::I64(v) => edit(v, shape),
        _ => panic!("{name} is not I64"),
    })
}

/// A copy of dump `src` at `dst` with the tensor `name` edited by `edit`.
fn edit_tensor(
    src: &std::path::Path,
    dst: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut glimpse::dump::Values, &[usize]),
) -> std::path::PathBuf {
    edit_dump(src, dst, |t| {
        let (_, values, shape) = t.iter_mut().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("no {name}"));
        edit(values, shape);
    })
}

/// Every tensor of the dump `src`, edited by `edit`, written to `dst` (the metadata kept).
pub fn edit_dump(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl FnOnce(&mut Vec<Named>),
) -> std::path::PathBuf {
    use glimpse::dump::{Dump, Values};
    use glimpse::st::{self, Entry};
    let d = Dump::open(src).unwrap();
    let mut tensors: Vec<Named> = d
        .names()
        .into_iter()
        .map(|n| {
            let (v, s) = d.values(&n).unwrap();
            (n, v, s)
        })
        .collect();
    let meta: std::collections::BTreeMap<String, String> =
        d.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    edit(&mut tensors);
    let entries: Vec<(String, Entry)> = tensors
        .iter()
        .map(|(n, v, s)| {
            let e = match v {
                Values::F32(x) => Entry::f32(s.clone(), x),
                Values::I64(x) => Entry::i64(s.clone(), x),
            };
            (n.clone(), e)
        })
        .collect();
    st::write(dst, &entries, &meta).unwrap();
    dst.to_path_buf()
}

/// The safetensors file `src` with its float tensors edited by `edit(name, values, shape)`
/// (integers kept, metadata kept), written to `dst` (which may be `src`: it is read whole first).
pub fn rewrite_st(src: &std::path::Path, dst: &std::path::Path, edit: impl Fn(&str, &mut Vec<f32>, &mut Vec<usize>)) {
    use glimpse::st::{self, Entry, StFile};
    let f = StFile::open(src).unwrap();
    let meta: std::collections::BTreeMap<String, String> =
        f.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let entries: Vec<(String, Entry)> = f
        .names()
        .map(|n| {
            if f.info(n).unwrap().dtype == safetensors::Dtype::I64 {
                let (v, shape) = f.i64(n).unwrap();
                return (n.to_string(), Entry::i64(shape, &v));
            }
            let (mut v, mut shape) = f.f32(n).unwrap();
            edit(n, &mut v, &mut shape);
            (n.to_string(), Entry::f32(shape, &v))
        })
        .collect();
    drop(f);
    st::write(dst, &entries, &meta).unwrap();
}

/// The dump `reference` with token 0 of `layer`'s routing taking, instead of its best expert, the
/// one its biased scores rank last (`sigmoid(router_logits) + bias`, the bias `model`'s, computed
/// here): a choice the dump's own gate logits contradict, written to `dst`.
pub fn contradicted_routing(
    reference: &std::path::Path,
    model: &std::path::Path,
    layer: usize,
    dst: &std::path::Path,
) -> std::path::PathBuf {
    use glimpse::dump::Values;
    let routers = glimpse::model::moe::Routers::read(&glimpse::checkpoint::Checkpoint::open(model).unwrap()).unwrap();
    let bias = routers.bias[&layer].clone();
    edit_dump(reference, dst, |t| {
        let logits = match &t.iter().find(|(n, _, _)| *n == format!("layers.{layer}.moe.router_logits")).unwrap().1 {
            Values::F32(v) => v[..bias.len()].to_vec(),
            _ => panic!("router logits are floats"),
        };
        let (_, v, shape) = t.iter_mut().find(|(n, _, _)| *n == format!("layers.{layer}.moe.topk_ids")).unwrap();
        let k = shape[1];
        let Values::I64(ids) = v else { panic!("expert ids are integers") };
        let score = |e: usize| 1.0 / (1.0 + (-logits[e]).exp()) + bias[e];
        let worst = (0..bias.len()).min_by(|&a, &b| score(a).total_cmp(&score(b))).unwrap();
        let best = (0..k).max_by(|&a, &b| score(ids[a] as usize).total_cmp(&score(ids[b] as usize))).unwrap();
        ids[best] = worst as i64;
    })
}

/// The binary, to be run with SIGINT and SIGTERM at their default actions whatever this test's:
/// tests run in the background of a script (`cargo test &`, no job control) inherit SIGINT
/// ignored, which glimpse, as such a job should, keeps ignoring. The tests that signal it need
/// it to take the signal.
pub fn glimpse_taking_signals() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glimpse"));
    with_default_signals(&mut cmd);
    cmd
}

/// `cmd`'s process starts with SIGINT and SIGTERM at their default actions.
pub fn with_default_signals(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls signal(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            Ok(())
        })
    };
}

/// Starts glimpse with `args` (its output piped) and returns once it catches SIGINT (/proc's
/// `SigCgt`), so a Ctrl-C sent then is handled, not fatal.
pub fn spawn_catching_sigint(args: &[&str]) -> std::process::Child {
    let child = glimpse_taking_signals().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let catches_sigint = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        let caught = status.lines().find_map(|l| l.strip_prefix("SigCgt:")).map(str::trim).unwrap_or("0");
        // (SIGTERM asks for the same stop, and its handler comes with SIGINT's.)
        let both = (1 << (libc::SIGINT - 1)) | (1 << (libc::SIGTERM - 1));
        u64::from_str_radix(caught, 16).is_ok_and(|mask| mask & both == both)
    };
    let start = std::time::Instant::now();
    while !catches_sigint() {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "{args:?} never caught SIGINT");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child
}

/// The prompts [`assert_a_sweep_records_as_prefills`] sweeps through the golden case `case`: its
/// reference's tokens in one row (the longest, past `index_topk`, so its indexer selects), a
/// shorter prompt and a batch of two.
pub fn sweep_prompts(case: &str) -> Vec<glimpse::model::Tokens> {
    use glimpse::model::Tokens;
    let dir = golden(case);
    let ids = glimpse::dump::Dump::open(&dir.join("reference.safetensors")).unwrap().tokens().unwrap().ids;
    let cfg = glimpse::config::Config::from_file(&dir.join("config.json")).unwrap();
    assert!(ids.len() > cfg.index_topk + 1, "{case}: a prompt the indexer selects from");
    vec![
        Tokens::new(1, ids.len(), ids.clone()).unwrap(),
        Tokens::new(1, 5, ids[3..8].to_vec()).unwrap(),
        Tokens::new(2, 6, ids[..12].to_vec()).unwrap(),
    ]
}

/// A sweep (`Prefill::sweep`, `audit --stream`'s layer-by-layer run) of the golden case
/// `case`'s [`sweep_prompts`] runs every prompt through a layer before the next layer, and records for each prompt what `prefill` records of it, bit for bit: every hook
/// point from `input_ids` to the last layer's output, the indexer's scores included.
pub fn assert_a_sweep_records_as_prefills(case: &str, p: &dyn glimpse::device::Prefill) {
    use glimpse::hooks::{HookPoint, LayerHook, Observer, Recorder, Selector, SweepObserver};
    use glimpse::model::Tokens;
    struct Log {
        prompt: usize,
        recorders: Vec<Recorder>,
        /// (layer, prompt) of each layer output, in the order reported.
        order: Vec<(usize, usize)>,
        layers_done: Vec<usize>,
    }
    impl Observer for Log {
        fn wants(&self, point: HookPoint) -> bool {
            self.recorders[self.prompt].wants(point)
        }
        fn observe(&mut self, point: HookPoint, value: &candle_core::Tensor) -> glimpse::error::Result<()> {
            if let HookPoint::Layer(i, LayerHook::Output) = point {
                self.order.push((i, self.prompt));
            }
            self.recorders[self.prompt].observe(point, value)
        }
    }
    impl SweepObserver for Log {
        fn prompt(&mut self, p: usize) -> &mut dyn Observer {
            self.prompt = p;
            self
        }
        fn layer_done(&mut self, layer: usize) -> bool {
            self.layers_done.push(layer);
            true
        }
    }
    let prompts = sweep_prompts(case);
    let n = glimpse::config::Config::from_file(&golden(case).join("config.json")).unwrap().num_hidden_layers;
    let selector = || Selector::new("*,*.dsa.scores", None);
    let mut log = Log {
        prompt: 0,
        recorders: prompts.iter().map(|_| Recorder::new(selector())).collect(),
        order: Vec::new(),
        layers_done: Vec::new(),
    };
    let refs: Vec<&Tokens> = prompts.iter().collect();
    assert_eq!(p.sweep(&refs, n - 1, &mut log).unwrap(), n - 1, "{case}");
    let layer_major: Vec<(usize, usize)> = (0..n).flat_map(|i| (0..prompts.len()).map(move |q| (i, q))).collect();
    assert_eq!(log.order, layer_major, "{case}");
    assert_eq!(log.layers_done, (0..n).collect::<Vec<_>>(), "{case}");
    let bits = |t: &candle_core::Tensor| -> Vec<u64> {
        let v = t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    for (q, (tokens, swept)) in prompts.iter().zip(&log.recorders).enumerate() {
        let mut alone = Recorder::new(selector());
        p.prefill(tokens, &mut alone).unwrap();
        // The sweep stops at the last layer's output: no final norm, no logits.
        let head = [HookPoint::FinalNorm, HookPoint::Logits];
        let alone: Vec<_> = alone.tensors.into_iter().filter(|(point, _)| !head.contains(point)).collect();
        let points = |r: &[(HookPoint, candle_core::Tensor)]| r.iter().map(|(p, _)| p.name()).collect::<Vec<_>>();
        assert_eq!(points(&swept.tensors), points(&alone), "{case} prompt {q}");
        for ((point, a), (_, b)) in swept.tensors.iter().zip(&alone) {
            assert_eq!(a.dims(), b.dims(), "{case} prompt {q}: {}", point.name());
            assert!(bits(a) == bits(b), "{case} prompt {q}: {} differs", point.name());
        }
    }
}
