//! Memory budgets: before a run allocates anything large, estimate what it will hold (weights as
//! the CPU multiplies them, the largest activations of a layer, what waits to be recorded) and
//! refuse with the numbers when that exceeds `--max-memory` (default: the memory the OS says is
//! available), rather than be killed by the OS halfway through. And keep what a layer frees for
//! the next one ([`keep_freed_memory`]).

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use safetensors::tensor::Dtype;

use crate::checkpoint::Checkpoint;
use crate::config::{Config, IndexerKind, MlpKind};
use crate::device::{Backend, Target};
use crate::error::{Error, Result};
use crate::hooks::{HookPoint, LayerHook, Selector};
use crate::model::absorbed::absorbed_from;
use crate::model::attention::{self, Dims};

mod device;
pub use device::{
    check_device, check_gpu, device_copies, device_need, device_weights, mtp_device_copies, mtp_device_weights,
    DeviceNeed, DEVICE_UNCOUNTED,
};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub weights: u64,
    pub activations: u64,
    pub recorded: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.activations).saturating_add(self.recorded)
    }
}

/// Which of a model's decoder layers a device holds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Every layer, uploaded once (and the embeddings' table).
    Whole,
    /// One layer at a time, uploaded as the run reaches it (`--stream`), then the final norm and
    /// lm_head; the prompt's embedding rows are read on the host.
    Streamed,
    /// One layer at a time and never the head: a sweep (`audit --stream`), which computes no
    /// logits.
    Swept,
}

/// What a whole pass (the hook points `recording` names) of `batch x seq` tokens over `window`
/// holds on `target`: on the CPU, [`estimate`] of a model packing its weights; on a device, the
/// CPU model's weights as loaded, beside the copies the device holds in host memory
/// ([`device_copies`]), the MTP layer's too where the window holds it (its head runs on the
/// device). The activations are counted as the CPU's (the host's for `cpu-ops` and `cuda-emu`;
/// more than `cuda` keeps on the host).
pub fn estimate_on(
    target: Target,
    ckpt: &Checkpoint,
    dims: (usize, usize),
    window: &RangeInclusive<usize>,
    recording: Recording,
) -> Estimate {
    if target.backend == Backend::Cpu {
        return estimate(ckpt, dims, window, Residency::Whole, recording, Passes::Many);
    }
    let mut est = estimate(ckpt, dims, window, Residency::Whole, recording, Passes::Elsewhere);
    if window.contains(&ckpt.config.num_hidden_layers) {
        est.weights = est.weights.saturating_add(mtp_device_copies(ckpt, target));
    }
    est.weights = est.weights.saturating_add(device_copies(ckpt, target, Residency::Whole));
    est
}

/// What a streamed pass of `batch x seq` tokens on a device (`run --device ... --stream`) holds
/// in host memory: the largest layer as loaded (its copies or its file pages, the larger), the
/// final norm and lm_head as loaded (not for a sweep, [`Residency::Swept`], which never loads
/// them), the activations as the CPU's, and the device's copies that live in host memory
/// ([`device_copies`] of one layer at a time).
pub fn estimate_streamed_on(
    target: Target,
    ckpt: &Checkpoint,
    dims: (usize, usize),
    recording: Recording,
    residency: Residency,
) -> Estimate {
    let all = 0..=ckpt.config.num_hidden_layers.saturating_sub(1);
    let mut est = estimate(ckpt, dims, &all, residency, recording, Passes::Elsewhere);
    est.weights = est.weights.saturating_add(device_copies(ckpt, target, residency));
    est
}

pub(crate) fn gb(b: u64) -> String {
    match b {
        b if b >= 1_000_000_000 => format!("{:.2} GB", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        0 => "0 MB".to_string(),
        b if b >= 1_000 => format!("{:.1} KB", b as f64 / 1e3),
        b => format!("{b} bytes"),
    }
}

/// Parses `500M`, `16G`, `16GB`, `16GiB`, `1.5T` or a byte count (K, M, G, T are powers of
/// 1000; with `i`, of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let digits = upper.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let (num, unit) = (&t[..digits.len()], &upper[digits.len()..]);
    let power = |p: i32, binary: bool| if binary { 1024f64.powi(p) } else { 1000f64.powi(p) };
    let mul = match unit.strip_suffix('B').unwrap_or(unit) {
        "" => 1.0,
        u => match (u.trim_end_matches('I'), u.ends_with('I')) {
            ("K", b) => power(1, b),
            ("M", b) => power(2, b),
            ("G", b) => power(3, b),
            ("T", b) => power(4, b),
            _ => return Err(format!("\"{s}\" is not a size like 500M, 16G or 16GiB")),
        },
    };
    match num.parse::<f64>() {
        // Under one byte (`0.5`, a fraction without its unit) would refuse every run.
        Ok(x) if x.is_finite() && x * mul >= 1.0 => Ok((x * mul) as u64),
        Ok(x) if x > 0.0 && x.is_finite() => Err(format!("\"{s}\" is less than a byte (a unit missing? 16G)")),
        _ => Err(format!("\"{s}\" is not a size like 500M, 16G or 16GiB")),
    }
}

/// `MemAvailable` of /proc/meminfo (Linux), in bytes.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// A forward pass allocates and frees the same large activations layer after layer. glibc gives
/// blocks over 32 MB back to the OS (they are separate mappings) and trims the heap's free top,
/// so each layer faulted its buffers in again, zeroed page by page: 19% of a 1024-token
/// `glimpse bench`'s samples were page faults. Keeping freed memory in the process made
/// 1024-token prefills about 8% faster here, for 0.3-3% more peak RSS (docs/performance.md).
/// Left alone when the user tunes malloc through `GLIBC_TUNABLES`.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only sets glibc's allocator parameters, under the allocator's lock.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0); // every block from the heap, none mapped apart
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX); // the heap's free top stays
        }
    }
}

/// Gives the memory freed so far back to the OS ([`keep_freed_memory`] kept it for the next
/// layer's buffers): for a long-lived process past its heavy work, as the TUI is once its
/// comparison is done (938 MB kept at 8192 tokens, 30 MB in use).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages, under the allocator's lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often a run multiplies each weight, which decides what it holds of the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passes {
    /// One forward pass (`run`, `verify`): on a CPU with AMX, a product of fewer than
    /// 512 rows (`Packing::reads_in_place`) reads bf16 and FP8 weights where they are mapped.
    One,
    /// Repeated passes, or a weight used twice: each weight ends up packed.
    Many,
    /// None: a device runs the pass (`--device`), and the CPU model it was built from keeps its
    /// weights as loaded (bf16 and FP8 projections where they are mapped, the rest as f32).
    Elsewhere,
}

/// What a run records into a dump, as far as its memory goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recording {
    /// No dump.
    Nothing,
    /// A selector's hook points: how many in all, whether they take the `[B, S, S]` indexer
    /// scores, and how many vocabulary-wide logits (the main model's, the MTP head's). Or a
    /// comparison's (`verify`): no tensor kept, but the scores made whole where the reference
    /// holds them.
    Hooks { tensors: usize, scores: bool, logits: usize },
}

impl Recording {
    /// Everything, the scores too.
    pub const ALL: Recording = Recording::Hooks { tensors: usize::MAX, scores: true, logits: 2 };

    /// What `selector` records of a model of `layers` layers, and of its MTP head and layer
    /// where the run runs it (`mtp`): a run without the head makes none of its tensors (the
    /// default selector wants its logits, which were counted as a second vocabulary-wide tensor).
    pub fn of(selector: &Selector, layers: usize, mtp: bool) -> Recording {
        let of_head = |p: &HookPoint| match p {
            HookPoint::MtpInputHidden | HookPoint::MtpEhProj | HookPoint::MtpFinalNorm | HookPoint::MtpLogits => true,
            p => p.layer() == Some(layers),
        };
        let made = |p: &HookPoint| mtp || !of_head(p);
        let tensors = HookPoint::all(layers).filter(made).filter(|&p| selector.wants(p)).count();
        let scores =
            (0..=layers).map(|i| HookPoint::Layer(i, LayerHook::DsaScores)).filter(made).any(|p| selector.wants(p));
        let logits =
            [HookPoint::Logits, HookPoint::MtpLogits].into_iter().filter(made).filter(|&p| selector.wants(p)).count();
        Recording::Hooks { tensors, scores, logits }
    }

    /// What a comparison against `reference` holds: the indexer's whole scores where the
    /// reference holds some to compare with.
    pub fn compared(reference: &crate::dump::Dump) -> Recording {
        match reference.names().iter().any(|n| n.ends_with(".dsa.scores")) {
            true => Recording::Hooks { tensors: 0, scores: true, logits: 0 },
            false => Recording::Nothing,
        }
    }

    /// [`Recording::of`] where a dump is written, else nothing.
    pub fn to(out: Option<&std::path::Path>, selector: &Selector, layers: usize, mtp: bool) -> Recording {
        out.map_or(Recording::Nothing, |_| Recording::of(selector, layers, mtp))
    }
}

/// What a run of `batch x seq` tokens over `window` will hold at its peak: every layer's weights
/// (`Whole`), or the largest layer's and the head as a streamed pass holds it (`Streamed`), or
/// the largest layer's alone (`Swept`: a sweep never reaches the head).
pub fn estimate(
    ckpt: &Checkpoint,
    (batch, seq): (usize, usize),
    window: &RangeInclusive<usize>,
    residency: Residency,
    recording: Recording,
    passes: Passes,
) -> Estimate {
    let c = &ckpt.config;
    // What the CPU holds of a weight once a prefill used it: bf16 panels where a panel kernel
    // multiplies a bf16 or FP8 projection (model::bf16_gemm), an f32 copy otherwise (and always
    // for the router's gate and the norms, loaded as f32). A one-off pass that reads its weights
    // in place holds their mapped pages only: 2 bytes a bf16 weight, 1 an FP8 one.
    let in_place = passes == Passes::One && crate::model::nn::Packing::reads_in_place(batch * seq);
    let fp8_panels = c.fp8.as_ref().is_some_and(|q| crate::model::bf16_gemm::takes_fp8_rows(q.block[0]));
    let held = |n: &str| {
        let projection = is_projection(ckpt, n);
        let mapped = matches!(ckpt.dtype(n), Some(Dtype::BF16 | Dtype::F8_E4M3));
        if projection && (reads_mapped(ckpt, n, batch * seq) || (mapped && passes == Passes::Elsewhere)) {
            return file_bytes(ckpt, n);
        }
        let (stored, bytes) = match ckpt.dtype(n) {
            Some(Dtype::BF16) => (true, 2),
            // (Every F8_E4M3 tensor has its scales: `Checkpoint::open` refuses one without.)
            Some(Dtype::F8_E4M3) => (fp8_panels, if in_place { 1 } else { 2 }),
            _ => (false, 4),
        };
        match stored && projection && crate::model::bf16_gemm::available() {
            true => numel(ckpt, n) * bytes,
            // An f32 copy, beside the file pages it was read from, which stay mapped (an f32
            // checkpoint's run peaked at twice the copies alone).
            false => 4 * numel(ckpt, n) + file_bytes(ckpt, n),
        }
    };
    // A bf16 or FP8 projection the CPU packs (its values reordered for the panels or tiles)
    // rather than reads where it is mapped.
    let packs = |n: &str| {
        let stored = match ckpt.dtype(n) {
            Some(Dtype::BF16) => true,
            Some(Dtype::F8_E4M3) => fp8_panels,
            _ => false,
        };
        stored && is_projection(ckpt, n) && !reads_mapped(ckpt, n, batch * seq)
    };
    // A layer's bytes: (what the CPU holds of its weights, their file pages (2 bytes a weight in
    // bf16, 1 in FP8 with its scales), the file pages of those it packs).
    let layer = |i: usize| {
        let prefix = format!("model.layers.{i}.");
        let names = ckpt.names().filter(|n| n.starts_with(&prefix) && !n.ends_with("_scale_inv"));
        names.fold((0u64, 0u64, 0u64), |(copies, file, packed), n| {
            let pages = if packs(n) { file_bytes(ckpt, n) } else { 0 };
            (copies + held(n), file + file_bytes(ckpt, n), packed + pages)
        })
    };
    // The embedding's f32 table, and the file pages it was read from, which stay mapped (a tied
    // head's few-row products read them in place): 1.9 GB at GLM-5's vocab, measured resident
    // beside the table.
    let embed = "model.embed_tokens.weight";
    let table = 4 * numel(ckpt, embed) + file_bytes(ckpt, embed);
    // The head is held as panels only from bf16 (`Model::load` reads an FP8 one as f32).
    let head = match ckpt.tied_head() {
        true => 0,
        false if ckpt.dtype("lm_head.weight") == Some(Dtype::BF16) => held("lm_head.weight"),
        false => 4 * numel(ckpt, "lm_head.weight"),
    };
    let weights = if residency != Residency::Whole {
        // One layer's copies or its file pages (a product reads the pages in place or packs
        // them, and the pages of a packed weight are not read again). Where the loaded layer
        // serves several passes (a sweep's prompts), some reading it in place and a later one
        // packing it, the copies and the pages of what it packs, both held (when every pass
        // packed, 2 prompts of 128 tokens of an 8-layer GLM-5-shaped checkpoint peaked at
        // 2.63 GB, 1 at 1.34 GB). And an lm_head chunk: the
        // CPU multiplies a chunk of its rows at a time, where a device pass holds it as loaded
        // until it is uploaded (a tied one read in place when bf16, else as the embeddings' f32
        // table).
        let biggest = window
            .clone()
            .map(|i| match (layer(i), passes) {
                ((copies, _, packed), Passes::Many) => copies + packed,
                ((copies, file, _), _) => copies.max(file),
            })
            .max()
            .unwrap_or(0);
        // (A sweep never reaches the head.)
        biggest + if residency == Residency::Streamed { streamed_head(ckpt, passes) } else { 0 }
    } else {
        // While a weight is packed, its file pages and its panels are both held (the pages go
        // once it is packed): the largest one's pages at the peak (lm_head's, 1.9 GB at GLM-5's
        // vocab; a 9-token run of a 1-layer real-vocab checkpoint peaked 1.7 GB over without it).
        let ours = |n: &&str| {
            crate::layout::layer_of(n).is_some_and(|i| window.contains(&i))
                || (*n == "lm_head.weight" && !ckpt.tied_head())
        };
        let packing = match !in_place && passes != Passes::Elsewhere && crate::model::bf16_gemm::available() {
            true => ckpt.names().filter(ours).filter(|n| packs(n)).map(|n| file_bytes(ckpt, n)).max().unwrap_or(0),
            false => 0,
        };
        window.clone().map(|i| layer(i).0).sum::<u64>() + table + head + packing
    };
    // In u128, saturated at the end: sizes from a dump's `input_ids` are the user's, and a
    // wrapped product would pass any --max-memory.
    let (b, s) = (batch as u128, seq as u128);
    let (h, nh) = (c.hidden_size as u128, c.num_attention_heads as u128);
    let (qk, nope, v) = (c.qk_head_dim() as u128, c.qk_nope_head_dim as u128, c.v_head_dim as u128);
    // The expanded keys and values exist only before a long prefill's absorbed form takes over,
    // which makes its own f32 split of `kv_b_proj`.
    let dims = Dims {
        batch,
        seq,
        keys: seq,
        heads: c.num_attention_heads,
        nope: c.qk_nope_head_dim,
        rope: c.qk_rope_head_dim,
        v: c.v_head_dim,
    };
    let e = absorbed_from(dims, c.kv_lora_rank, c.index_topk).unwrap_or(seq) as u128;
    let (r, rope) = (c.kv_lora_rank as u128, c.qk_rope_head_dim as u128);
    let split = if e < s { nh * (nope + v) * r } else { 0 };
    let widest = (c.intermediate_size.max(c.moe_intermediate_size * c.num_experts_per_tok) as u128).max(h);
    // The selection (8-byte positions), each thread's block of scores (model::attention: no
    // S x S matrix is whole, but for the indexer's summed scores [B, S, S] and their copy when a
    // recording run names them), the per-head queries and outputs and the expanded keys and
    // values (twice, for temporaries), and a few hidden-sized and intermediate-sized buffers.
    let (k, threads) = ((c.index_topk as u128).min(s), rayon::current_num_threads() as u128);
    let blocks = 2 * threads * attention::BLOCK as u128 * s;
    // An absorbed task's folded queries and their mixes, and one query's gathered keys and scores.
    let absorbed = if e < s { threads * (2 * attention::BLOCK as u128 * nh * r + k * (r + rope) + nh * k) } else { 0 };
    let (scores, logits_recorded, tensors_recorded) = match recording {
        Recording::Nothing => (false, 0, 0),
        Recording::Hooks { tensors, scores, logits } => (scores, logits, tensors as u128),
    };
    let whole_scores = if scores { 2 * b * s * s } else { 0 };
    let heads = 2 * b * nh * (s * (qk + v) + e * (nope + v)) + split;
    let per_layer = whole_scores + 2 * b * s * k + blocks + absorbed + heads + 8 * b * s * widest;
    // Every position's logits: a `run` or `audit` without them recorded makes the last one's
    // only, but verify, the MTP head, a device window's and a benchmark's make them all, and
    // the callers do not say which they are.
    let logits = 2 * b * s * c.vocab_size as u128;
    let activations = 4 * (per_layer.max(logits) + 4 * b * s * h);
    // Tensors waiting for the dump writer: at most its queue and the one it writes, or the run's
    // recorded hook points where fewer, each at most a layer's widest (the hidden size, the
    // router's or the recorded S x S scores'), and the logits where they are recorded.
    let widest_recorded = h.max(c.n_routed_experts as u128).max(if scores { s } else { 0 });
    let waiting = tensors_recorded.min(crate::dump::SPILL_QUEUE as u128 + 1);
    let logits_waiting = logits_recorded as u128 * c.vocab_size as u128;
    let recorded = 4 * b * s * (waiting * widest_recorded + logits_waiting);
    let saturated = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
    Estimate { weights, activations: saturated(activations), recorded: saturated(recorded) }
}

/// Whether products of at most `rows` rows read the projection `name` where it is mapped, never
/// packing it (`nn::Linear::forward`): a bf16 one up to `gemv::MAX_ROWS`, an FP8 one where the
/// FP8 kernel takes its blocks.
fn reads_mapped(ckpt: &Checkpoint, name: &str, rows: usize) -> bool {
    let fp8 = || {
        let cols = ckpt.config.fp8.as_ref().map_or(0, |q| q.block[1]);
        crate::model::fp8_gemv::takes_blocks(cols)
    };
    rows <= crate::model::gemv::MAX_ROWS
        && match ckpt.dtype(name) {
            Some(Dtype::BF16) => true,
            Some(Dtype::F8_E4M3) => fp8(),
            _ => false,
        }
}

/// The file pages of the tensor `name`: its stored bytes (2 a bf16 weight, 1 an FP8 code).
fn file_bytes(ckpt: &Checkpoint, name: &str) -> u64 {
    let size = match ckpt.dtype(name) {
        Some(Dtype::F8_E4M3 | Dtype::F8_E5M2 | Dtype::I8 | Dtype::U8) => 1,
        Some(Dtype::BF16 | Dtype::F16) => 2,
        Some(Dtype::F64 | Dtype::I64) => 8,
        _ => 4,
    };
    numel(ckpt, name) * size
}

/// The head as a streamed pass holds it: a device pass as loaded until it is uploaded
/// ([`head_as_loaded`]); the CPU a chunk of its rows at a time, in f32.
fn streamed_head(ckpt: &Checkpoint, passes: Passes) -> u64 {
    match passes {
        Passes::Elsewhere => head_as_loaded(ckpt),
        Passes::One | Passes::Many => 4 * (crate::model::stream::HEAD_CHUNK * ckpt.config.hidden_size) as u64,
    }
}

/// The head as a streamed device pass holds it on the host until it is uploaded: a tied one read
/// in place when bf16, else as the embeddings' f32 table beside its file pages; a bf16 one as
/// its mapped pages; an FP8 or f32 one as f32 (`Model::load_head`).
fn head_as_loaded(ckpt: &Checkpoint) -> u64 {
    let (embed, head) = ("model.embed_tokens.weight", "lm_head.weight");
    match (ckpt.tied_head(), ckpt.dtype(ckpt.head_name())) {
        (true, Some(Dtype::BF16)) => file_bytes(ckpt, embed),
        (true, _) => 4 * numel(ckpt, embed) + file_bytes(ckpt, embed),
        (false, Some(Dtype::BF16)) => file_bytes(ckpt, head),
        (false, _) => 4 * numel(ckpt, head),
    }
}

/// Whether `name` is a projection the kernels multiply as stored: a matrix or more (not a norm
/// or a bias), and not the router's gate, which is loaded as f32.
fn is_projection(ckpt: &Checkpoint, name: &str) -> bool {
    ckpt.shape(name).is_some_and(|s| s.len() >= 2) && !name.ends_with(".gate.weight")
}

pub(crate) fn numel(ckpt: &Checkpoint, name: &str) -> u64 {
    ckpt.shape(name).map_or(0, |s| s.iter().product::<usize>() as u64)
}

/// Estimates a whole-model run of `batch x seq` tokens on `target`, its layers loaded once or
/// streamed (`--stream`: on the CPU its streamed [`estimate`]; on a device the host's
/// [`estimate_streamed_on`], and the GPU's memory against one layer's weights at a time), and
/// refuses it past `max`; `hint` says what the command can do instead (e.g. "fewer tokens").
pub fn check_run(
    ckpt: &Checkpoint,
    dims: (usize, usize),
    recording: Recording,
    (target, residency, mtp): (Target, Residency, bool),
    max: Option<u64>,
    hint: &str,
) -> Result<()> {
    target.supports(&ckpt.config)?;
    check(&estimate_run(ckpt, dims, recording, (target, residency, mtp)), max, hint)?;
    check_gpu(ckpt, dims, recording, target, (residency, mtp))
}

/// `verify --decode`'s check: the prefill of the reference's tokens and their decode through
/// the cache (`chunk` positions a call), as `generate` holds them (the steps reading the weights' pages beside the panels
/// the prefill packed), and both runs' whole records, every hook point of the main model kept
/// until the two are compared (`decode_check`: a prefill's estimate, with a dump writer's queue
/// of them, was half what it held).
pub fn check_decode(ckpt: &Checkpoint, dims: (usize, usize), chunk: usize, max: Option<u64>, hint: &str) -> Result<()> {
    let step = chunk.clamp(1, dims.1.max(1));
    let mut est = generate_estimate(ckpt, dims, (0, step), 1, false, Recording::Nothing);
    est.recorded = 2 * record_bytes(&ckpt.config, dims, &Selector::default());
    check(&est, max, hint)
}

/// The bytes of what `selector` records of the main model's run of `b` x `s` tokens, each hook
/// point at its shape (`docs/spec/dump-format.md`): f32 activations, i64 ids and selections.
fn record_bytes(c: &Config, (b, s): (usize, usize), selector: &Selector) -> u64 {
    use LayerHook::*;
    let (h, e, k) = (c.hidden_size, c.n_routed_experts, c.num_experts_per_tok);
    // (Values a token, and bytes a value.)
    let per_token = |p: HookPoint| -> (usize, usize) {
        match p {
            HookPoint::InputIds => (1, 8),
            HookPoint::Embeddings | HookPoint::FinalNorm => (h, 4),
            HookPoint::Logits => (c.vocab_size, 4),
            HookPoint::Layer(i, hook) => {
                let routed = c.mlp_kind(i) == MlpKind::Moe;
                // (A shared indexer reuses the full layer's keys: no margin of its own.)
                let full = c.indexer_kind(i) == IndexerKind::Full;
                match hook {
                    InputNorm | AttnOut | PostAttnNorm | MlpOut | Output => (h, 4),
                    QLatent => (c.q_lora_rank, 4),
                    KvLatent => (c.kv_lora_rank, 4),
                    KvNormPre | KvNorm | KRopeNorm => (1, 4),
                    DsaMargin if full => (1, 4),
                    DsaScores if full => (s, 4),
                    DsaTopk => (c.index_k(s), 8),
                    RouterLogits | RouterScores | RouterBiasedScores if routed => (e, 4),
                    TopkIds if routed => (k, 8),
                    TopkWeights if routed => (k, 4),
                    RouterMargin if routed => (1, 4),
                    BiasChanged if routed => (1, 8),
                    _ => (0, 0),
                }
            }
            _ => (0, 0),
        }
    };
    let main = HookPoint::all(c.num_hidden_layers).filter(|p| p.layer().is_none_or(|i| i < c.num_hidden_layers));
    let bytes: usize = main.filter(|&p| selector.wants(p)).map(per_token).map(|(n, size)| n * size).sum();
    (bytes as u64).saturating_mul((b * s) as u64)
}

/// [`check_run`]'s estimate; with `mtp` (a resident run), the MTP head's layer too.
fn estimate_run(
    ckpt: &Checkpoint,
    dims: (usize, usize),
    recording: Recording,
    (target, residency, mtp): (Target, Residency, bool),
) -> Estimate {
    let all = 0..=ckpt.config.num_hidden_layers.saturating_sub(1);
    match (residency, target.backend) {
        (Residency::Whole, _) => {
            let window = 0..=*all.end() + usize::from(mtp);
            estimate_on(target, ckpt, dims, &window, recording)
        }
        (Residency::Streamed | Residency::Swept, Backend::Cpu) => {
            estimate(ckpt, dims, &all, residency, recording, Passes::One)
        }
        (residency, _) => estimate_streamed_on(target, ckpt, dims, recording, residency),
    }
}

/// What a sweep (`audit --stream`: prompts run layer by layer) holds between layers beside a
/// streamed pass of its largest prompt: each prompt's hidden state (f32) and DSA selection (the
/// CPU's [`crate::model::indexer::Selection`], an 8-byte index a kept key and a 4-byte margin a
/// row; a device's waits on the host as 4-byte indices).
fn sweep_held(ckpt: &Checkpoint, prompts: &[(usize, usize)]) -> u64 {
    let cfg = &ckpt.config;
    let row = |seq: usize| (4 * cfg.hidden_size + 8 * cfg.index_k(seq) + 4) as u64;
    prompts.iter().map(|&(batch, seq)| (batch * seq) as u64 * row(seq)).fold(0, u64::saturating_add)
}

/// Refuses a sweep (`audit --stream`, recording nothing) of `prompts` (batch x seq each) that
/// needs more than `max` (host) or the GPU's memory: a streamed pass of the largest prompt, and
/// every prompt's held state ([`sweep_held`]).
pub fn check_sweep(ckpt: &Checkpoint, prompts: &[(usize, usize)], target: Target, max: Option<u64>) -> Result<()> {
    target.supports(&ckpt.config)?;
    // Every distinct shape is estimated and the largest checked: a pass's memory does not grow
    // with batch x seq alone (the indexer's chunks and the kept keys follow seq), so 1 x 16383
    // can need more than 8 x 2048.
    let shapes: BTreeSet<(usize, usize)> = prompts.iter().copied().collect();
    let all = 0..=ckpt.config.num_hidden_layers.saturating_sub(1);
    // A streamed layer is read in place by every prompt of fewer than 512 rows (on AMX); a
    // longer one packs it, beside the pages a shorter one read before it (the prompts run each
    // layer in order: a shorter one after it takes the packed product, and the pages go).
    let in_place = |&(batch, seq): &(usize, usize)| crate::model::nn::Packing::reads_in_place(batch * seq);
    let first_in_place = prompts.iter().position(in_place);
    let last_packing = prompts.iter().rposition(|p| !in_place(p));
    let mixed = matches!((first_in_place, last_packing), (Some(i), Some(j)) if i < j);
    let passes = if mixed { Passes::Many } else { Passes::One };
    let pass = |&dims: &(usize, usize)| match target.backend {
        Backend::Cpu => estimate(ckpt, dims, &all, Residency::Swept, Recording::Nothing, passes),
        _ => estimate_run(ckpt, dims, Recording::Nothing, (target, Residency::Swept, false)),
    };
    let Some(mut est) = shapes.iter().map(pass).max_by_key(Estimate::total) else { return Ok(()) };
    est.activations = est.activations.saturating_add(sweep_held(ckpt, prompts));
    check(&est, max, "fewer or shorter prompts")?;
    match most_on_device(ckpt, &shapes, target) {
        Some(dims) => check_gpu(ckpt, dims, Recording::Nothing, target, (Residency::Swept, false)),
        None => Ok(()),
    }
}

/// The shape of `shapes` whose sweep needs the most of a GPU.
fn most_on_device(ckpt: &Checkpoint, shapes: &BTreeSet<(usize, usize)>, target: Target) -> Option<(usize, usize)> {
    let need = |&&dims: &&(usize, usize)| device_need(ckpt, dims, (target, false), Residency::Swept).total();
    shapes.iter().max_by_key(need).copied()
}

/// The weights a whole-model run of `dims` tokens recording `recording` runs on `target`, once
/// [`check_run`] passes: streamed from `ckpt` a layer at a time (whose tensors are checked to be
/// there first: a missing shard is named before the first layer), or loaded whole into
/// `resident`.
pub fn load_for_run<'a>(
    ckpt: &'a Checkpoint,
    resident: &'a mut Option<crate::model::Model>,
    (dims, recording): ((usize, usize), Recording),
    (target, residency, mtp): (Target, Residency, bool),
    max: Option<u64>,
) -> Result<crate::model::Weights<'a>> {
    let all = 0..=ckpt.config.num_hidden_layers.saturating_sub(1);
    Ok(match residency {
        // (A run reaches the head: whatever it is given, it is counted as streamed. It runs no
        // MTP head.)
        Residency::Streamed | Residency::Swept => {
            check_run(ckpt, dims, recording, (target, Residency::Streamed, false), max, "fewer tokens")?;
            crate::model::stream::check_streamed(ckpt, &all)?;
            crate::model::Weights::Streamed(ckpt)
        }
        Residency::Whole => {
            // (The MTP head needs the resident model: no --stream to suggest with it.)
            let hint = if mtp { "fewer tokens" } else { "fewer tokens, or --stream" };
            check_run(ckpt, dims, recording, (target, residency, mtp), max, hint)?;
            crate::model::Weights::Resident(resident.insert(crate::model::Model::load(ckpt)?))
        }
    })
}

/// What `generate` of `new` tokens after a `batch x prompt` prompt holds (`chunk` prompt
/// positions a call, 0: all at once; `mtp`: with the MTP head, whose layer is loaded too and runs
/// the whole prompt in one call): the prompt's pass (or a chunk's, with the prompt's hidden states
/// kept), the latent cache of every position fed, each chunk's or step's blocks of scores
/// reaching all of them, the weights both packed (the prompt's many-row products; none where
/// every call has at most `gemv::MAX_ROWS` rows) and mapped (the decode steps read them in
/// place), the absorbed `kv_b_proj` copies where a call has more
/// than `MAX_ROWS` rows; with a dump, the largest hook point joined at the end (the logits: the
/// steps' parts wait on disk until then). Not a prefill of `prompt + new` positions: decoding
/// holds no such activations. Refused past `max`.
#[allow(clippy::too_many_arguments)]
pub fn check_generate(
    ckpt: &Checkpoint,
    size: (usize, usize),
    chunk: usize,
    new: usize,
    mtp: bool,
    recording: Recording,
    max: Option<u64>,
) -> Result<()> {
    check(&generate_estimate(ckpt, size, (chunk, 1), new, mtp, recording), max, "fewer tokens")
}

/// [`check_generate`]'s estimate, its decode steps `step` positions a call after the prompt
/// (1; `verify --decode`'s `--chunk`, whose prefill is a whole pass).
fn generate_estimate(
    ckpt: &Checkpoint,
    (batch, prompt): (usize, usize),
    (chunk, step): (usize, usize),
    new: usize,
    mtp: bool,
    recording: Recording,
) -> Estimate {
    let c = &ckpt.config;
    let layers = 0..=(c.num_hidden_layers + usize::from(mtp)).saturating_sub(1);
    let chunked = chunk > 0 && chunk < prompt;
    let rows = match (chunked, mtp) {
        (false, _) => prompt,
        (true, false) => chunk,
        (true, true) => chunk.max(prompt.saturating_sub(1)),
    };
    let projection = |n: &&str| {
        let ours = crate::layout::layer_of(n).is_some_and(|i| layers.contains(&i)) || *n == "lm_head.weight";
        ours && is_projection(ckpt, n)
    };
    // The cache's calls after the first (a chunked prompt's, the steps'): a bf16 or FP8 weight
    // they cannot read where it is mapped (more than `gemv::MAX_ROWS` rows, FP8 blocks the
    // kernel does not take) is packed by the second product that reaches it.
    let decode_rows = batch * if chunked { chunk.max(step) } else { step };
    let packed_by_steps =
        |n: &&str| matches!(ckpt.dtype(n), Some(Dtype::BF16 | Dtype::F8_E4M3)) && !reads_mapped(ckpt, n, decode_rows);
    // On a CPU with AMX a prompt of fewer than 512 rows reads each weight in place (its first
    // product), and decode steps of a few rows read it in place too (gemv): nothing is packed,
    // the pages are all it holds, as a one-off pass's. A chunked prompt's second chunk packs.
    let one_off = !chunked
        && crate::model::nn::Packing::reads_in_place(batch * rows)
        && !ckpt.names().filter(projection).any(|n| packed_by_steps(&n));
    let passes = if one_off { Passes::One } else { Passes::Many };
    let mut est = estimate(ckpt, (batch, rows), &layers, Residency::Whole, recording, passes);
    let (b, fed) = (batch as u64, (batch * (prompt + new.saturating_sub(1))) as u64);
    let threads = rayon::current_num_threads() as u64;
    let cache = 4 * c.cache_values_per_token(mtp).0 as u64 * fed;
    let hidden = 4 * b * prompt as u64 * c.hidden_size as u64;
    est.activations += cache + hidden + 4 * 2 * threads * crate::model::attention::BLOCK as u64 * fed;
    // The absorbed form's f32 split of `kv_b_proj` (`Attention::absorbed`), made by the first
    // decode call that does not read a bf16 one in place: one of more than `MAX_ROWS` rows, or
    // any call where it is stored FP8 or f32.
    let splits = |n: &str| ckpt.dtype(n) != Some(Dtype::BF16) || decode_rows > crate::model::gemv::MAX_ROWS;
    for name in ckpt.names().filter(projection) {
        // The decode steps read the weights in place: their pages, beside what the prompt's
        // products packed (what `estimate` counted, the pages themselves when none was packed).
        if !one_off && !reads_mapped(ckpt, name, batch * rows) {
            est.weights += match ckpt.dtype(name) {
                Some(Dtype::BF16 | Dtype::F8_E4M3) => file_bytes(ckpt, name),
                _ => 0,
            };
        }
        if name.ends_with("kv_b_proj.weight") && splits(name) {
            est.weights += 4 * numel(ckpt, name);
        }
    }
    if recording != Recording::Nothing {
        est.recorded = est.recorded.max(4 * 2 * fed * (c.vocab_size.max(c.hidden_size) as u64));
    }
    est
}

/// Refuses a run whose estimate exceeds `max` (default: available memory), suggesting `hint`
/// or a larger `--max-memory`.
pub fn check(est: &Estimate, max: Option<u64>, hint: &str) -> Result<()> {
    let Some(limit) = max.or_else(available) else { return Ok(()) };
    if est.total() <= limit {
        return Ok(());
    }
    let source = if max.is_some() { "--max-memory" } else { "available memory" };
    Err(Error::Usage(format!(
        "this run needs about {} (weights {}, activations {}, recording {}) but {source} is {}; \
         try {hint}, or a larger --max-memory",
        gb(est.total()),
        gb(est.weights),
        gb(est.activations),
        gb(est.recorded),
        gb(limit)
    )))
}

#[cfg(test)]
mod tests;
