//! What a device pass holds: the copies of the weights it uploads (in host memory for the
//! host backends, in the GPU's for `cuda`) and, on a GPU, its weights and working set against the
//! card's free memory, checked before anything is uploaded.

use safetensors::tensor::Dtype;

use super::{file_bytes, gb, numel, Recording, Residency};
use crate::checkpoint::Checkpoint;
use crate::device::{Backend, Target};
use crate::error::{Error, Result};

/// The copies of the main model's weights a device pass uploads (`DeviceModel::new`, or
/// `::streamed` one layer at a time) that live in host memory: `cpu-ops` widens every one to
/// f32; `cuda-emu` holds them as the GPU would ([`device_weights`]); `cuda`'s are in the GPU's
/// memory and the CPU's none.
pub fn device_copies(ckpt: &Checkpoint, target: Target, residency: Residency) -> u64 {
    match target.backend {
        Backend::Cpu | Backend::Cuda => 0,
        Backend::CudaEmu => device_weights(ckpt, target.precision, residency),
        Backend::CpuOps => {
            let tied = if ckpt.tied_head() { widened(ckpt, ckpt.head_name()) } else { 0 };
            held_at_once(ckpt, residency, |n| widened(ckpt, n), tied)
        }
    }
}

/// [`device_copies`] of the MTP layer, once its head runs on the device.
pub fn mtp_device_copies(ckpt: &Checkpoint, target: Target) -> u64 {
    match target.backend {
        Backend::Cpu | Backend::Cuda => 0,
        Backend::CudaEmu => mtp_device_weights(ckpt, target.precision),
        Backend::CpuOps => mtp_layer(ckpt, |n| widened(ckpt, n)),
    }
}

/// Tensor `n` widened to f32 (`cpu-ops`' copy; FP8's scales are folded into its values).
fn widened(ckpt: &Checkpoint, n: &str) -> u64 {
    if n.ends_with("_scale_inv") {
        0
    } else {
        4 * numel(ckpt, n)
    }
}

/// What a device pass holds at once of the main model's weights (`DeviceModel::new`, or
/// `::streamed` with one layer at a time): each tensor as [`uploaded`] counts it. The MTP
/// layer's are apart ([`mtp_device_weights`]), uploaded when the head first runs.
pub fn device_weights(ckpt: &Checkpoint, precision: crate::device::Precision, residency: Residency) -> u64 {
    // A tied head is uploaded as a matrix of its own (the embeddings as stored), beside the
    // embeddings' f32 table where that is resident; an embedding that is the stored head, as
    // that table, which the walk over the stored names below does not meet.
    let embed = "model.embed_tokens.weight";
    let tied = match () {
        _ if ckpt.tied_head() => as_matrix(ckpt, precision, embed),
        _ if ckpt.embedding_is_head() && residency == Residency::Whole => uploaded(ckpt, precision, embed),
        _ => 0,
    };
    held_at_once(ckpt, residency, |n| uploaded(ckpt, precision, n), tied)
}

/// The MTP layer's weights (`model.layers.{num_hidden_layers}.*`) on the device once its head
/// runs there (`DeviceModel::mtp`, beside the resident model), as [`uploaded`] counts them.
pub fn mtp_device_weights(ckpt: &Checkpoint, precision: crate::device::Precision) -> u64 {
    mtp_layer(ckpt, |n| uploaded(ckpt, precision, n))
}

/// The bytes `bytes` gives the MTP layer's tensors.
fn mtp_layer(ckpt: &Checkpoint, bytes: impl Fn(&str) -> u64) -> u64 {
    let n = ckpt.config.num_hidden_layers;
    ckpt.names().filter(|name| crate::layout::layer_of(name) == Some(n)).map(bytes).sum()
}

/// Tensor `n` as a device holds it: every matrix but the embeddings as [`as_matrix`]; the rest
/// (the embeddings when resident, the MTP head's own where it has them, norms, the correction
/// bias, FP8's scale grids) as f32.
fn uploaded(ckpt: &Checkpoint, precision: crate::device::Precision, n: &str) -> u64 {
    let matrix = ckpt.shape(n).is_some_and(|s| s.len() >= 2);
    match matrix && !n.ends_with("embed_tokens.weight") && !n.ends_with("_scale_inv") {
        true => as_matrix(ckpt, precision, n),
        false => 4 * numel(ckpt, n),
    }
}

/// Matrix `n` through `upload_weight`: bf16 and FP8 codes as stored (with FP8's scales as f32,
/// counted apart); an f32 one as f32, or rounded to bf16 for bf16 products; the router's gate,
/// which the CPU model loads as f32, as an f32 one.
fn as_matrix(ckpt: &Checkpoint, precision: crate::device::Precision, n: &str) -> u64 {
    let stored = matches!(ckpt.dtype(n), Some(Dtype::BF16 | Dtype::F8_E4M3)) && !n.ends_with(".gate.weight");
    match precision {
        _ if stored => file_bytes(ckpt, n),
        crate::device::Precision::Bf16 => 2 * numel(ckpt, n),
        crate::device::Precision::F32 => 4 * numel(ckpt, n),
    }
}

/// `bytes` summed over the main model's tensors (the MTP layer's left out) a device holds at once,
/// with `tied_head` (a tied head's own copy) among those outside the decoder layers: all of
/// them; or streamed, the largest layer's or those outside the layers but the embeddings (whose
/// rows are read on the host), whichever is more, since the head is uploaded once the last
/// layer is freed; or swept, the largest layer's alone.
fn held_at_once(ckpt: &Checkpoint, residency: Residency, bytes: impl Fn(&str) -> u64, tied_head: u64) -> u64 {
    let n = ckpt.config.num_hidden_layers;
    let (mut layers, mut rest) = (vec![0u64; n], tied_head);
    for name in ckpt.names() {
        match crate::layout::layer_of(name) {
            Some(i) if i < n => layers[i] += bytes(name),
            Some(_) => {} // the MTP layer's
            None if residency != Residency::Whole && name == "model.embed_tokens.weight" => {}
            None => rest += bytes(name),
        }
    }
    let largest = layers.iter().copied().max().unwrap_or(0);
    match residency {
        Residency::Whole => rest + layers.iter().sum::<u64>(),
        Residency::Streamed => rest.max(largest),
        Residency::Swept => largest,
    }
}

/// Refuses a `cuda` pass of `batch x seq` tokens whose weights ([`device_weights`], and with
/// `mtp` the MTP layer's, [`mtp_device_weights`]) and working set (`cuda::working_set`: the
/// activations alive at once, the ops' scratch, the logits, and with `scores` recorded a layer's
/// whole indexer scores; the MTP head's, over one position fewer, is no larger) need more than
/// GPU `free` bytes (of `total`), with [`DEVICE_UNCOUNTED`] to spare: before minutes of uploads
/// end in an allocation failure.
pub fn check_device(
    ckpt: &Checkpoint,
    (batch, seq): (usize, usize),
    (target, scores, residency, mtp): (Target, bool, Residency, bool),
    (free, total): (u64, u64),
) -> Result<()> {
    let DeviceNeed { mut weights, working, logits } = device_need(ckpt, (batch, seq), (target, scores), residency);
    if mtp {
        weights = weights.saturating_add(mtp_device_weights(ckpt, target.precision));
    }
    let need = weights.saturating_add(working).saturating_add(DEVICE_UNCOUNTED);
    if need <= free {
        return Ok(());
    }
    let prefill = format!("its prefill's working set {} (of which logits {})", gb(working), gb(logits));
    let (held, working, try_instead) = match residency {
        // (The MTP head needs the resident model: no --stream to suggest.)
        Residency::Whole if mtp => {
            ("its weights, the MTP head's layer included, take", prefill, "a checkpoint of fewer layers, fewer tokens")
        }
        Residency::Whole => ("its weights take", prefill, "--stream, a checkpoint of fewer layers, fewer tokens"),
        Residency::Streamed => ("its largest layer or its head takes", prefill, "fewer tokens"),
        Residency::Swept => (
            "its largest layer takes",
            format!("its most demanding prompt's working set {}", gb(working)),
            "fewer or shorter prompts",
        ),
    };
    Err(Error::Device(format!(
        "GPU {} has {} free of {}, and this run needs {}: {held} {} there and {working}, and cuBLAS and the \
         kernels about {}; try {try_instead}, or a GPU with more memory",
        target.ordinal,
        gb(free),
        gb(total),
        gb(need),
        gb(weights),
        gb(DEVICE_UNCOUNTED)
    )))
}

/// What a `cuda` run holds beyond its weights and working set, allowed for by [`check_device`]:
/// cuBLAS's workspace (32 MiB a handle on Hopper) and the kernels' loaded modules (a few MB).
pub const DEVICE_UNCOUNTED: u64 = 64 << 20;

/// What a prefill on a GPU needs there, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNeed {
    /// [`device_weights`].
    pub weights: u64,
    /// The prefill's working set, the logits included (`cuda::working_set`).
    pub working: u64,
    pub logits: u64,
}

impl DeviceNeed {
    /// What the GPU must hold: the weights and the working set.
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.working)
    }
}

impl std::fmt::Display for DeviceNeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (weights, working, logits) = (gb(self.weights), gb(self.working), gb(self.logits));
        write!(f, "weights {weights} + working set {working} (of which logits {logits})")
    }
}

/// What a `cuda` prefill of `batch x seq` tokens needs on the GPU ([`check_device`]'s numbers).
pub fn device_need(
    ckpt: &Checkpoint,
    (batch, seq): (usize, usize),
    (target, scores): (Target, bool),
    residency: Residency,
) -> DeviceNeed {
    let (working, logits) = working_set(ckpt, (batch, seq), target, scores, residency);
    DeviceNeed { weights: device_weights(ckpt, target.precision, residency), working, logits }
}

/// A prefill's working set on a GPU and its logits' share, in bytes (`cuda::working_set`; a
/// build without the `cuda` feature has no GPU to run on, and counts the logits alone). A sweep
/// ([`Residency::Swept`]) computes no logits, and holds the layers' share alone.
fn working_set(
    ckpt: &Checkpoint,
    (batch, seq): (usize, usize),
    target: Target,
    scores: bool,
    residency: Residency,
) -> (u64, u64) {
    #[cfg(feature = "cuda")]
    let (total, layers, logits) = {
        let w = crate::cuda::working_set::estimate(ckpt, (batch, seq), target, scores);
        (w.total, w.layers, w.logits)
    };
    #[cfg(not(feature = "cuda"))]
    let (total, layers, logits) = {
        let _ = (target, scores);
        // (Saturated: the token counts are the user's.)
        let logits = [batch, seq, ckpt.config.vocab_size].iter().fold(4u64, |n, &d| n.saturating_mul(d as u64));
        (logits, 0, logits)
    };
    match residency {
        Residency::Swept => (layers, 0),
        Residency::Whole | Residency::Streamed => (total, logits),
    }
}

/// [`check_device`] where `target` is a GPU (its free memory read now).
pub fn check_gpu(
    ckpt: &Checkpoint,
    dims: (usize, usize),
    rec: Recording,
    target: Target,
    (res, mtp): (Residency, bool),
) -> Result<()> {
    let scores = matches!(rec, Recording::Hooks { scores: true, .. });
    match crate::device::gpu_memory(target)? {
        Some(memory) => check_device(ckpt, dims, (target, scores, res, mtp), memory),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `cuda` verify whose reference checks the MTP head counts the head's layer beside the
    /// model's: what fits without it is refused with it.
    #[test]
    fn a_cuda_run_with_the_mtp_head_counts_its_layer() {
        let ckpt = Checkpoint::open(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/mtp")).unwrap();
        let target = Target::from(Backend::Cuda);
        let (weights, head) =
            (device_weights(&ckpt, target.precision, Residency::Whole), mtp_device_weights(&ckpt, target.precision));
        assert!(head > 0);
        let (working, _) = working_set(&ckpt, (1, 16), target, false, Residency::Whole);
        let free = weights + working + DEVICE_UNCOUNTED;
        let fits = |mtp| check_device(&ckpt, (1, 16), (target, false, Residency::Whole, mtp), (free, 1 << 40));
        assert!(fits(false).is_ok());
        let err = fits(true).unwrap_err().to_string();
        assert!(err.contains("the MTP head's layer included") && !err.contains("--stream"), "{err}");
        let more = |mtp| check_device(&ckpt, (1, 16), (target, false, Residency::Whole, mtp), (free + head, 1 << 40));
        assert!(more(true).is_ok());
    }

    /// A `cuda` run whose weights do not fit the GPU's free memory is refused with the numbers,
    /// before anything is uploaded; one that fits passes. (The GPU's memory is given, not read:
    /// the rule, checked without a GPU.)
    #[test]
    fn a_cuda_run_whose_weights_do_not_fit_the_gpu_is_refused() {
        let ckpt = Checkpoint::open(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/flat")).unwrap();
        let target = Target { ordinal: 1, ..Target::from(Backend::Cuda) };
        let weights = device_weights(&ckpt, target.precision, Residency::Whole);
        let (working, logits) = working_set(&ckpt, (1, 32), target, false, Residency::Whole);
        assert_eq!(logits, 4 * 32 * ckpt.config.vocab_size as u64);
        assert!(working >= logits);
        let fits = |free, res| check_device(&ckpt, (1, 32), (target, false, res, false), (free, 1 << 40));
        assert!(fits(weights + working + DEVICE_UNCOUNTED, Residency::Whole).is_ok());
        let err = fits(weights + working + DEVICE_UNCOUNTED - 1, Residency::Whole).unwrap_err().to_string();
        let numbers = format!("its weights take {} there and its prefill's working set {}", gb(weights), gb(working));
        assert!(err.starts_with("cuda: GPU 1 has ") && err.contains(&numbers), "{err}");
        // bf16 products round the f32 matrices to bf16 at upload: fewer bytes.
        assert!(device_weights(&ckpt, crate::device::Precision::Bf16, Residency::Whole) < weights);
        // Streamed, one layer at a time (of 5) and no embedding table: what did not fit does.
        let streamed = device_weights(&ckpt, target.precision, Residency::Streamed);
        assert!(streamed < weights / 2, "{streamed} of {weights}");
        assert!(fits(weights + working + DEVICE_UNCOUNTED - 1, Residency::Streamed).is_ok());
        assert!(fits(streamed + working + DEVICE_UNCOUNTED - 1, Residency::Streamed).is_err());
        // Swept (`audit --stream`): a layer at a time and no head, through the layers' working set.
        let swept = device_weights(&ckpt, target.precision, Residency::Swept);
        let (layers, logits) = working_set(&ckpt, (1, 32), target, false, Residency::Swept);
        assert!(swept <= streamed && layers <= working && logits == 0, "{swept} {layers}");
        assert!(fits(swept + layers + DEVICE_UNCOUNTED, Residency::Swept).is_ok());
        let err = fits(swept + layers + DEVICE_UNCOUNTED - 1, Residency::Swept).unwrap_err().to_string();
        let numbers = format!(
            "its largest layer takes {} there and its most demanding prompt's working set {}",
            gb(swept),
            gb(layers)
        );
        assert!(
            err.contains(&numbers) && err.contains("try fewer or shorter prompts") && !err.contains("logits"),
            "{err}"
        );
    }
}
