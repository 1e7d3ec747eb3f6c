//! `bench`: prefill timings on a checkpoint, recording nothing against recording every hook point
//! into a dump, run alternately so machine noise hits both alike; medians are reported.

use std::path::Path;
use std::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::device::forward::LogitRows;
use crate::device::Backend;
use crate::dump::{self, DumpWriter};
use crate::error::{Error, Result};
use crate::hooks::{emit, HookPoint, LayerHook, NoObserver, Observer, Selector};
use crate::model::{Model, Tokens};

pub struct BenchReport {
    /// Opening the checkpoint and building the model (f32 weights are converted here; bf16 and
    /// FP8 ones are memory-mapped and made ready for the CPU's products on first use).
    pub load_s: f64,
    /// The first forward pass, which pages the weights in and packs or widens them: open to first
    /// logits is `load_s + first_s`.
    pub first_s: f64,
    pub tokens: usize,
    pub plain_s: Vec<f64>,
    pub recording_s: Vec<f64>,
    /// Of `recording_s`, the time spent writing the dump file after the forward pass.
    pub finish_s: Vec<f64>,
    pub dump_bytes: u64,
    pub peak_rss_bytes: Option<u64>,
    /// Hook points the forward pass asks about per run, and the measured cost of one question to
    /// an observer that wants nothing: the whole cost of hooks when nothing is recorded.
    pub hook_calls: usize,
    pub ns_per_hook_call: f64,
    /// What the bf16 and FP8 weights' products ran on (`model::cpu_products`).
    pub products: &'static str,
    /// How the checkpoint stores its projections (`bf16`, `fp8`, `f32`): f32 ones are converted
    /// at load and multiplied as f32, the others stay memory-mapped.
    pub stored: &'static str,
}

/// Wants nothing, counts how often it is asked.
#[derive(Default)]
struct CountingNothing(std::cell::Cell<usize>);

impl Observer for CountingNothing {
    fn wants(&self, _: HookPoint) -> bool {
        self.0.set(self.0.get() + 1);
        false
    }
    fn observe(&mut self, _: HookPoint, _: &candle_core::Tensor) -> Result<()> {
        Ok(())
    }
}

/// Nanoseconds per `emit` to [`NoObserver`] (dynamic dispatch included), over many calls.
fn time_empty_emit() -> f64 {
    let n = 10_000_000u32;
    let mut none = NoObserver;
    let obs: &mut dyn Observer = std::hint::black_box(&mut none);
    let t = Instant::now();
    for i in 0..n {
        let point = HookPoint::Layer(std::hint::black_box(i as usize), LayerHook::Output);
        let _ = emit(obs, point, || Err(Error::Usage("never built".into())));
    }
    t.elapsed().as_secs_f64() * 1e9 / n as f64
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(
    model_dir: &Path,
    tokens: usize,
    repeat: usize,
    scratch: &Path,
    max_memory: Option<u64>,
) -> Result<BenchReport> {
    if tokens == 0 || repeat == 0 {
        return Err(Error::Usage("--tokens and --repeat must be at least 1".into()));
    }
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(model_dir)?;
    // (The recorded passes record what a dump records by default.)
    let recording = crate::memory::Recording::of(&Default::default(), ckpt.config.num_hidden_layers, false);
    let cpu = (Backend::Cpu.into(), crate::memory::Residency::Whole, false);
    crate::memory::check_run(&ckpt, (1, tokens), recording, cpu, max_memory, "fewer --tokens")?;
    let model = Model::load(&ckpt)?;
    let load_s = t0.elapsed().as_secs_f64();
    let stored = match ckpt.dtype("model.layers.0.self_attn.q_a_proj.weight") {
        Some(safetensors::Dtype::BF16) => "bf16",
        Some(safetensors::Dtype::F8_E4M3) => "fp8",
        _ => "f32",
    };
    let vocab = model.config.vocab_size as u32;
    // A fixed, spread-out token sequence: benchmarks must not depend on a tokenizer.
    let ids = (0..tokens as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab).collect();
    let tokens_t = Tokens::new(1, tokens, ids)?;
    let dump_path = scratch.join("glimpse-bench.safetensors");
    let (mut plain_s, mut recording_s, mut finish_s, mut dump_bytes) = (Vec::new(), Vec::new(), Vec::new(), 0);
    // The first pass pages the weights in (and counts the hook questions); not in the medians.
    let mut counter = CountingNothing::default();
    let t = Instant::now();
    model.forward(&tokens_t, &mut counter)?;
    let first_s = t.elapsed().as_secs_f64();
    let hook_calls = counter.0.get();
    // A second untimed pass: on AMX the first read the weights in place, and this one packs
    // them (`nn::Packing`), so the medians time what repeated prefills run (with `--repeat 1`,
    // the packing was the whole median).
    model.forward(&tokens_t, &mut NoObserver)?;
    for _ in 0..repeat {
        let t = Instant::now();
        model.forward(&tokens_t, &mut NoObserver)?;
        plain_s.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let mut w = DumpWriter::create(&dump_path, Selector::default(), model.max_hook_points())?;
        model.forward(&tokens_t, &mut w)?;
        let f = Instant::now();
        w.finish(&dump::metadata("glimpse bench", None, None))?;
        finish_s.push(f.elapsed().as_secs_f64());
        recording_s.push(t.elapsed().as_secs_f64());
        dump_bytes = std::fs::metadata(&dump_path).map(|m| m.len()).unwrap_or(0);
        // Not timed: freeing the last dump's pages is no part of recording the next one (a run that
        // replaces an existing dump pays it: 12 ms for this one at 128 tokens, docs/performance.md).
        let _ = std::fs::remove_file(&dump_path);
    }
    Ok(BenchReport {
        load_s,
        first_s,
        tokens,
        plain_s,
        recording_s,
        finish_s,
        dump_bytes,
        peak_rss_bytes: peak_rss(),
        hook_calls,
        ns_per_hook_call: time_empty_emit(),
        products: crate::model::cpu_products(),
        stored,
    })
}

/// A prefill benchmark of the device forward pass (`crate::device`) on `ops`.
pub struct DeviceBench {
    /// Building the device model: copying every weight to the device (`cpu-ops`: widened on the host).
    pub upload_s: f64,
    /// The first prefill (kernel and cuBLAS warm-up).
    pub first_s: f64,
    /// Copying one prefill's logits back to the host (not in `runs`).
    pub download_s: f64,
    pub tokens: usize,
    /// Prefills computing every position's logits (as a forward returns them).
    pub runs: Vec<f64>,
    /// Prefills computing the last position's logits only (as generation needs), alternating
    /// with `runs` so machine noise hits both alike.
    pub runs_last: Vec<f64>,
    /// Matrix-product FLOPs of one prefill, with every position's logits and with the last's.
    pub flops: u64,
    pub flops_last: u64,
    /// One more prefill (every position's logits), profiled: each section timed between
    /// synchronisations.
    pub profile: crate::device::profile::Profile,
    /// The backend's own steps inside its ops (the CUDA attention's and indexer's) in one more
    /// prefill, where it times them.
    pub steps: Option<crate::device::profile::Profile>,
}

/// Times `repeat` prefills of `tokens` tokens (the same ids as [`run`]) through the device
/// forward pass, up to the logits on the device (as transformers leaves them), synchronised:
/// every position's logits and, alternating, the last position's only. Copying the logits back is
/// timed once, apart.
pub fn run_device<O: crate::device::Ops>(ops: &O, model: &Model, tokens: usize, repeat: usize) -> Result<DeviceBench> {
    if tokens == 0 || repeat == 0 {
        return Err(Error::Usage("--tokens and --repeat must be at least 1".into()));
    }
    let vocab = model.config.vocab_size as u32;
    let ids = (0..tokens as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab).collect();
    let tokens_t = Tokens::new(1, tokens, ids)?;
    let t = Instant::now();
    let device = crate::device::forward::DeviceModel::new(ops, model)?;
    let upload_s = t.elapsed().as_secs_f64();
    let prefill = |rows| -> Result<(f64, O::F)> {
        let t = Instant::now();
        let logits = device.forward_on_device(&tokens_t, rows, &mut NoObserver)?;
        ops.synchronize()?;
        Ok((t.elapsed().as_secs_f64(), logits))
    };
    let (first_s, logits) = prefill(LogitRows::All)?;
    let flops = device.matmul_flops();
    let t = Instant::now();
    ops.download(&logits)?;
    let download_s = t.elapsed().as_secs_f64();
    drop(logits);
    prefill(LogitRows::Last)?; // its own warm-up, and its work count
    let flops_last = device.matmul_flops() - flops;
    let (mut runs, mut runs_last) = (Vec::with_capacity(repeat), Vec::with_capacity(repeat));
    for _ in 0..repeat {
        runs.push(prefill(LogitRows::All)?.0);
        runs_last.push(prefill(LogitRows::Last)?.0);
    }
    // More prefills: `repeat` profiled by sections (their median, section by section: the
    // expert GEMMs' rate rests on it), then one by the backend's steps, so neither profile's
    // synchronisations slow the other's; profiling stops whether or not they ran.
    let profiled = || {
        device.set_profiling(true); // (afresh: each prefill's own sections)
        device.forward_on_device(&tokens_t, LogitRows::All, &mut NoObserver).map(|_| device.profile())
    };
    let profiles: Result<Vec<_>> = (0..repeat).map(|_| profiled()).collect();
    device.set_profiling(false);
    let profiles: Vec<_> = profiles?.into_iter().flatten().collect();
    let profile = crate::device::profile::Profile::median(&profiles);
    ops.set_step_profiling(true);
    // (A backend that times no steps of its own is spared the prefill.)
    let steps = match ops.step_profile() {
        Some(_) => device.forward_on_device(&tokens_t, LogitRows::All, &mut NoObserver).map(|_| ops.step_profile()),
        None => Ok(None),
    };
    ops.set_step_profiling(false);
    let steps = steps?;
    Ok(DeviceBench { upload_s, first_s, download_s, tokens, runs, runs_last, flops, flops_last, profile, steps })
}

/// `bench --device cpu-ops|cuda`: [`run_device`] on that backend, rendered (for `cuda` with the
/// device and the memory in use after the runs).
pub fn run_on(target: crate::device::Target, model: &Model, tokens: usize, repeat: usize) -> Result<String> {
    match target.check()?.backend {
        crate::device::Backend::Cpu => Err(Error::Usage("the CPU model is timed by plain `bench`".into())),
        crate::device::Backend::CpuOps => Ok(run_device(&crate::device::cpu::CpuOps, model, tokens, repeat)?.render()),
        _ => on_cuda(target, model, tokens, repeat),
    }
}

#[cfg(feature = "cuda")]
fn on_cuda(target: crate::device::Target, model: &Model, tokens: usize, repeat: usize) -> Result<String> {
    let ops = crate::device::cuda_ops(target)?;
    let gpu = &ops.gpu;
    let head = format!("{}: {}\n", target.describe(), gpu.summary());
    let report = run_device(&ops, model, tokens, repeat)?.render();
    Ok(match ops.gpu.memory()? {
        Some((free, total)) => {
            let used = (total - free) as f64 / 1e9;
            // With the pool kept, this is the weights plus one prefill's peak.
            format!("{head}{report}device memory in use: {used:.2} GB of {:.2} GB\n", total as f64 / 1e9)
        }
        None => format!("{head}{report}"),
    })
}

#[cfg(not(feature = "cuda"))]
fn on_cuda(_: crate::device::Target, _: &Model, _: usize, _: usize) -> Result<String> {
    Err(crate::device::no_cuda())
}

impl DeviceBench {
    pub fn render(&self) -> String {
        let (m, last) = (median(&self.runs), median(&self.runs_last));
        format!(
            "upload (copy every weight; cpu-ops widens bf16 on the host): {:.2} s; first prefill: {:.3} s\n\
             prefill {} tokens, logits left on the device: median {:.4} s ({:.1} tok/s) over {} runs\n\
             copying the logits back (not in the prefill's time): {:.4} s\n\
             matrix products: {:.1} GFLOP per prefill = {:.2} TFLOP/s\n\
             prefill {} tokens, last position's logits only: median {:.4} s ({:.1} tok/s), \
             {:.1} GFLOP = {:.2} TFLOP/s\n",
            self.upload_s,
            self.first_s,
            self.tokens,
            m,
            self.tokens as f64 / m,
            self.runs.len(),
            self.download_s,
            self.flops as f64 / 1e9,
            self.flops as f64 / m / 1e12,
            self.tokens,
            last,
            self.tokens as f64 / last,
            self.flops_last as f64 / 1e9,
            self.flops_last as f64 / last / 1e12
        ) + &self.experts_line()
            + &self.indexer_line()
            + &format!(
                "{} more prefills, each section timed between synchronisations (which slow it: read the shares), \
                 its median over them:\n",
                self.runs.len()
            )
            + &self.profile.render()
            + &match &self.steps {
                Some(steps) => {
                    format!(
                        "one more prefill, the steps inside the attention's and the indexer's sections (their FLOPs as \
                         issued: each chunk's whole rectangle of keys, the split products' three terms; the sections \
                         above count the causal work once):\n{}",
                        steps.render()
                    )
                }
                None => String::new(),
            }
    }

    /// Whether the indexer went unscored (a prompt no longer than `index_topk`: each query keeps
    /// every causal key whatever the scores), said where the time is, as transformers' forward
    /// scores it anyway: a ratio against it counts that work as skipped, not as done faster.
    fn indexer_line(&self) -> String {
        match self.profile.sections.iter().find(|s| s.name == crate::device::forward::INDEXER_NOT_SCORED) {
            Some(s) => format!(
                "indexer: not scored at {} of its layers (no query sees more than index_topk keys, so \
                 each keeps them all, the same selection); transformers' forward scores them\n",
                s.calls
            ),
            None => String::new(),
        }
    }

    /// The routed experts' GEMMs in the profiled prefill (nothing without MoE layers).
    fn experts_line(&self) -> String {
        let [gate_up, down] = crate::device::forward::EXPERT_GEMMS.map(|name| self.profile.total(name));
        let (secs, flops) = (gate_up.0 + down.0, gate_up.1 + down.1);
        if flops == 0 {
            return String::new();
        }
        format!(
            "expert GEMMs (the median of {} more prefills, synchronised around them): {:.1} GFLOP in {:.4} s = \
             {:.2} TFLOP/s\n",
            self.runs.len(),
            flops as f64 / 1e9,
            secs,
            flops as f64 / secs / 1e12
        )
    }
}

impl BenchReport {
    pub fn render(&self) -> String {
        let (p, r) = (median(&self.plain_s), median(&self.recording_s));
        let mut s = match self.stored {
            "f32" => "weights: f32, converted at load; products in f32\n".to_string(),
            w => format!("weights: {w}, memory-mapped; products on {}\n", self.products),
        };
        s += &format!(
            "load (open): {:.2} s; first prefill (pages in; packs what it does not read in place): {:.2} s\n",
            self.load_s, self.first_s
        );
        s += &format!(
            "prefill {} tokens, recording nothing:      median {:.3} s ({:.1} tok/s) over {} runs\n",
            self.tokens,
            p,
            self.tokens as f64 / p,
            self.plain_s.len()
        );
        s += &format!(
            "prefill {} tokens, recording every point: median {:.3} s ({:.1} tok/s), dump {:.1} MB\n",
            self.tokens,
            r,
            self.tokens as f64 / r,
            self.dump_bytes as f64 / 1e6
        );
        s += &format!(
            "recording overhead: {:+.1}% (of which writing the file after the pass: median {:.3} s)\n",
            100.0 * (r / p - 1.0),
            median(&self.finish_s)
        );
        let hooks_s = self.hook_calls as f64 * self.ns_per_hook_call * 1e-9;
        s += &format!(
            "hooks with no observer: {} questions per pass x {:.1} ns = {:.0} ns ({:.1e} of the pass)\n",
            self.hook_calls,
            self.ns_per_hook_call,
            hooks_s * 1e9,
            hooks_s / p
        );
        if let Some(rss) = self.peak_rss_bytes {
            s += &format!("peak RSS: {:.2} GB\n", rss as f64 / 1e9);
        }
        s
    }
}
