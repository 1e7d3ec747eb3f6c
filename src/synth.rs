//! `synth`: random-weight checkpoints in the released layout (config.json, shards, index), so
//! real-shaped runs and benchmarks need no download. Tensors are generated and written in bands of
//! rows, never whole, so multi-GB checkpoints take bounded memory. Values are deterministic in
//! (seed, tensor name): the same command always writes the same bytes.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use serde_json::{json, Value};

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::layout::{released_layout, Kind, WeightSpec};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthDtype {
    F32,
    Bf16,
    Fp8,
}

impl std::fmt::Display for SynthDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SynthDtype::F32 => "f32",
            SynthDtype::Bf16 => "bf16",
            SynthDtype::Fp8 => "fp8",
        })
    }
}

pub struct SynthOptions {
    /// The starting config.json (a preset's or a user's).
    pub config: Value,
    pub layers: Option<usize>,
    /// How many of the first layers are dense (`first_k_dense_replace`; default: the config's).
    pub dense: Option<usize>,
    pub experts: Option<usize>,
    pub vocab: Option<usize>,
    pub dtype: SynthDtype,
    pub shards: usize,
    pub mtp: bool,
    pub seed: u64,
    pub out: PathBuf,
}

/// The published GLM-5 config.json values.
pub fn preset_glm5() -> Value {
    json!({
        "architectures": ["GlmMoeDsaForCausalLM"],
        "model_type": "glm_moe_dsa",
        "vocab_size": 154880, "hidden_size": 6144, "intermediate_size": 12288,
        "moe_intermediate_size": 2048, "num_hidden_layers": 78, "num_attention_heads": 64,
        "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 256,
        "num_experts_per_tok": 8, "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1,
        "norm_topk_prob": true, "q_lora_rank": 2048, "kv_lora_rank": 512, "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64, "v_head_dim": 256, "first_k_dense_replace": 3,
        "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "rms_norm_eps": 1e-5, "max_position_embeddings": 202752, "hidden_act": "silu",
        "attention_bias": false, "tie_word_embeddings": false, "num_nextn_predict_layers": 1,
        "eos_token_id": [154820, 154827, 154829]
    })
}

/// `mlp_layer_types` for `n` layers, the first `dense` of them dense and the rest MoE.
fn dense_first(n: usize, dense: usize) -> Value {
    json!((0..n).map(|i| if i < dense { "dense" } else { "sparse" }).collect::<Vec<_>>())
}

/// Applies the shrinking flags to a config, keeping it consistent (per-layer lists cut to depth,
/// top-k and groups within the expert count).
fn shrink(mut v: Value, o: &SynthOptions) -> Result<Value> {
    let obj = v.as_object_mut().ok_or_else(|| Error::config("<root>", "config must be a JSON object"))?;
    // A zero here would be blamed on the config field it sets.
    for (flag, value) in [("--layers", o.layers), ("--experts", o.experts), ("--vocab", o.vocab)] {
        if value == Some(0) {
            return Err(Error::Usage(format!("{flag} 0: give 1 or more")));
        }
    }
    if let Some(n) = o.layers {
        obj.insert("num_hidden_layers".into(), json!(n));
        for key in ["mlp_layer_types", "indexer_types"] {
            if let Some(Value::Array(list)) = obj.get_mut(key) {
                list.truncate(n);
            }
        }
        // Keep GLM-5's "dense first" pattern but leave room for MoE layers in shallow models:
        // where every kept layer would be dense, the first half are (an explicit per-layer list,
        // which overrides the count, rewritten to agree).
        let listed = obj.get("mlp_layer_types").and_then(Value::as_array).map(|l| l.iter().all(|k| k == "dense"));
        let counted = obj.get("first_k_dense_replace").and_then(Value::as_u64).is_some_and(|k| k as usize >= n);
        if listed.unwrap_or(counted) && n > 1 {
            obj.insert("first_k_dense_replace".into(), json!(n / 2));
            if listed.is_some() {
                obj.insert("mlp_layer_types".into(), dense_first(n, n / 2));
            }
        }
    }
    if let Some(d) = o.dense {
        let n = obj.get("num_hidden_layers").and_then(Value::as_u64).unwrap_or(0) as usize;
        if d > n {
            return Err(Error::Usage(format!("--dense {d}: the checkpoint has {n} layers")));
        }
        obj.insert("first_k_dense_replace".into(), json!(d));
        // An explicit per-layer list would override the count: written to agree with it.
        if obj.contains_key("mlp_layer_types") {
            obj.insert("mlp_layer_types".into(), dense_first(n, d));
        }
    }
    if let Some(e) = o.experts {
        obj.insert("n_routed_experts".into(), json!(e));
        // transformers takes these names of the count first: the flag's count is the one.
        for alias in ["num_local_experts", "num_experts"] {
            obj.remove(alias);
        }
        let k = obj.get("num_experts_per_tok").and_then(Value::as_u64).unwrap_or(8) as usize;
        obj.insert("num_experts_per_tok".into(), json!(k.min(e)));
        let g = obj.get("n_group").and_then(Value::as_u64).unwrap_or(1) as usize;
        if g > 1 && e % g != 0 {
            obj.insert("n_group".into(), json!(1));
            obj.insert("topk_group".into(), json!(1));
        }
    }
    if let Some(vocab) = o.vocab {
        obj.insert("vocab_size".into(), json!(vocab));
        for key in ["bos_token_id", "pad_token_id"] {
            obj.remove(key);
        }
        // No end token in a vocabulary cut short (left out, the key would mean transformers'
        // default, token 1).
        obj.insert("eos_token_id".into(), Value::Null);
    }
    obj.insert("num_nextn_predict_layers".into(), json!(if o.mtp { 1 } else { 0 }));
    // transformers defaults this to 64 and fails on any other head count when it is absent.
    if let Some(heads) = obj.get("num_attention_heads").cloned() {
        obj.insert("num_key_value_heads".into(), heads);
    }
    obj.remove("quantization_config");
    if o.dtype == SynthDtype::Fp8 {
        obj.insert(
            "quantization_config".into(),
            json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}),
        );
    }
    obj.insert("torch_dtype".into(), json!(if o.dtype == SynthDtype::F32 { "float32" } else { "bfloat16" }));
    Ok(v)
}

impl Rng {
    /// The generator of one tensor's values: the seed and the tensor's name (FNV-1a).
    fn for_tensor(seed: u64, name: &str) -> Self {
        let h = name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        Rng(seed ^ h)
    }
}

/// How a tensor is initialised: values `center + spread * U(-1, 1)`, with uniform spread
/// `sqrt(3) * std` so the std is that of `N(0, 1/fan_in)` for projections.
fn init(spec: &WeightSpec) -> (f32, f32) {
    let fan_in = *spec.shape.last().unwrap_or(&1) as f32;
    let s3 = 3f32.sqrt();
    match spec.kind {
        Kind::Linear | Kind::Plain if spec.name.contains("embed_tokens") => (0.0, s3),
        Kind::Linear | Kind::Plain => (0.0, s3 / fan_in.sqrt()),
        Kind::NormWeight => (1.0, 0.1 * s3),
        Kind::NormBias => (0.0, 0.1 * s3),
        Kind::RouterBias => (0.0, 0.05 * s3),
    }
}

/// Storage dtype of a tensor: FP8 checkpoints quantise projections only and keep the router bias
/// in f32, like the released GLM-5-FP8.
fn storage(spec: &WeightSpec, dtype: SynthDtype) -> Dtype {
    match (dtype, spec.kind) {
        (_, Kind::RouterBias) => Dtype::F32,
        (SynthDtype::F32, _) => Dtype::F32,
        (SynthDtype::Fp8, Kind::Linear) => Dtype::F8_E4M3,
        _ => Dtype::BF16,
    }
}

const BLOCK: usize = 128;

/// A projection's blocks have gains `e^(g U(-1, 1))`, normalised to keep the weights' variance
/// (`E[e^(2gU)] = sinh(2g) / 2g`): a factor of 4 between the largest and the smallest.
const BLOCK_GAIN: f32 = 0.7;

/// Writes the tensor `spec` (and its FP8 scale, when quantised) band by band.
fn write_tensor(
    spec: &WeightSpec,
    dtype: Dtype,
    seed: u64,
    w: &mut dyn Write,
    scales: Option<&mut Vec<f32>>,
) -> std::io::Result<()> {
    let mut rng = Rng::for_tensor(seed, &spec.name);
    let (center, spread) = init(spec);
    let cols = if spec.shape.len() == 2 { spec.shape[1] } else { spec.shape.iter().product() };
    let rows = if spec.shape.len() == 2 { spec.shape[0] } else { 1 };
    // Each 128 x 128 block of a projection FP8 would quantise has a gain of its own, so its block
    // scales differ as a trained checkpoint's do: with every block drawn alike their scales were
    // equal to 1e-4, and a port applying them transposed, or one scale for the tensor, ran as
    // the right one. (Drawn from a stream of their own: the values stay those of before, scaled,
    // the same in every dtype.)
    let mut gains = Rng::for_tensor(seed, &format!("{}#block-gains", spec.name));
    // (A tensor of one block keeps a gain of 1: it has one scale whatever its gain.)
    let blocks = rows.div_ceil(BLOCK) * cols.div_ceil(BLOCK);
    let mut gain = || match spec.kind {
        Kind::Linear if blocks > 1 => {
            (BLOCK_GAIN * gains.uniform()).exp() / ((2.0 * BLOCK_GAIN).sinh() / (2.0 * BLOCK_GAIN)).sqrt()
        }
        _ => 1.0,
    };
    let mut band = Vec::with_capacity(BLOCK * cols);
    let mut bytes = Vec::new();
    let mut scales = scales;
    for r0 in (0..rows).step_by(BLOCK) {
        let n = BLOCK.min(rows - r0);
        let band_gains: Vec<f32> = (0..cols.div_ceil(BLOCK)).map(|_| gain()).collect();
        band.clear();
        band.extend((0..n * cols).map(|i| center + spread * band_gains[(i % cols) / BLOCK] * rng.uniform()));
        bytes.clear();
        match dtype {
            Dtype::F32 => bytes.extend(crate::st::le_bytes_f32(&band)),
            Dtype::BF16 => bytes.extend(band.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())),
            Dtype::F8_E4M3 => {
                // One scale per 128x128 block: amax / 448 maps the block onto E4M3's range.
                let nb = cols.div_ceil(BLOCK);
                let block_scales: Vec<f32> = (0..nb)
                    .map(|b| {
                        let amax = (0..n)
                            .flat_map(|r| band[r * cols + b * BLOCK..(r * cols + ((b + 1) * BLOCK).min(cols))].iter())
                            .fold(0f32, |m, x| m.max(x.abs()));
                        if amax > 0.0 {
                            amax / 448.0
                        } else {
                            1.0
                        }
                    })
                    .collect();
                bytes.extend(band.iter().enumerate().map(|(i, x)| f32_to_e4m3(x / block_scales[(i % cols) / BLOCK])));
                if let Some(s) = scales.as_deref_mut() {
                    s.extend(block_scales);
                }
            }
            _ => unreachable!("synth stores F32, BF16 or F8_E4M3"),
        }
        w.write_all(&bytes)?;
    }
    Ok(())
}

/// Rounds to the nearest FP8 E4M3 value (saturating at ±448; ties to the even code) from the
/// f32 bits: the mantissa's top 3 bits, rounded, or a multiple of 2^-9 below the normal range.
/// (A search over the codes cost 30 s of a 1-layer synth; the tests check the two agree.)
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(448.0); // (a NaN saturates too: f32::min takes the number)
    let bits = a.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32 - 127;
    if exp < -6 {
        // Subnormal: code = a / 2^-9, ties to even; 8 is the smallest normal's code, 0x08.
        let q = a * 512.0;
        let (r, f) = (q.floor(), q - q.floor());
        let r = r as u8 + u8::from(f > 0.5 || (f == 0.5 && r as u8 % 2 == 1));
        return sign | r;
    }
    let (top, rest) = ((bits >> 20) & 7, bits & 0xF_FFFF);
    let up = rest > 0x8_0000 || (rest == 0x8_0000 && top % 2 == 1);
    let code = (((exp + 7) as u32) << 3) + top + u32::from(up); // a carry moves into the exponent
    sign | code.min(0x7E) as u8
}

/// A config error in a field one of `o`'s flags set is the flag's (`--experts 100000: ...`), not the
/// config file's.
fn blame_flag(e: Error, o: &SynthOptions) -> Error {
    let flags = [
        ("num_hidden_layers", "--layers", o.layers),
        ("n_routed_experts", "--experts", o.experts),
        ("vocab_size", "--vocab", o.vocab),
    ];
    match e {
        Error::Config { field, msg } => {
            match flags.iter().find(|(f, ..)| *f == field).and_then(|&(_, flag, v)| Some((flag, v?))) {
                Some((flag, v)) => Error::Usage(format!("{flag} {v}: {msg}")),
                None => Error::Config { field, msg },
            }
        }
        e => e,
    }
}

/// Writes the checkpoint and returns the config it was written for.
pub fn synth(o: &SynthOptions) -> Result<Config> {
    let config_json = shrink(o.config.clone(), o)?;
    let cfg = Config::from_json(&config_json).map_err(|e| blame_flag(e, o))?;
    if o.shards == 0 {
        return Err(Error::Usage("--shards must be at least 1".into()));
    }
    if o.out.exists() && !o.out.is_dir() {
        return Err(Error::Usage(format!("--out {}: is a file; give a folder for the checkpoint", o.out.display())));
    }
    refuse_foreign_files(&o.out)?;
    let specs = released_layout(&cfg, o.mtp);
    // A shard holds at least one weight (and its scale): no empty shards.
    if o.shards > specs.len() {
        return Err(Error::Usage(format!(
            "--shards {} is more than the checkpoint's {} weights: give at most that",
            o.shards,
            specs.len()
        )));
    }
    // Each quantised weight is followed by its scale tensor.
    let mut tensors: Vec<(WeightSpec, Dtype, bool)> = Vec::new(); // (spec, dtype, is_scale)
    for spec in specs {
        let dtype = storage(&spec, o.dtype);
        let quantised = dtype == Dtype::F8_E4M3;
        tensors.push((spec.clone(), dtype, false));
        if quantised {
            let shape = vec![spec.shape[0].div_ceil(BLOCK), spec.shape[1].div_ceil(BLOCK)];
            let name = format!("{}_scale_inv", spec.name);
            tensors.push((WeightSpec { name, shape, kind: spec.kind }, Dtype::F32, true));
        }
    }
    let bytes = |t: &(WeightSpec, Dtype, bool)| t.0.shape.iter().product::<usize>() * t.1.bitsize() / 8;
    let total: usize = tensors.iter().map(bytes).sum();
    // (Weights written before are replaced only once each new shard is whole: not counted free.)
    if let Some(free) = free_bytes(&o.out).filter(|&free| total as u64 > free) {
        return Err(Error::Usage(format!(
            "--out {}: the checkpoint needs {:.2} GB and {:.2} GB are free there",
            o.out.display(),
            total as f64 / 1e9,
            free as f64 / 1e9
        )));
    }
    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    // Until the last file is written the folder is no checkpoint (`Checkpoint::open` refuses it):
    // shards replaced one by one would otherwise mix two runs' weights unseen.
    let unfinished = o.out.join(crate::checkpoint::SYNTH_UNFINISHED);
    std::fs::write(&unfinished, b"").map_err(|e| Error::io(&unfinished, e))?;

    let shard_of = assign_shards(&tensors.iter().map(|t| (bytes(t), t.2)).collect::<Vec<_>>(), o.shards);
    let file_name = |s: usize| {
        if o.shards == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, o.shards)
        }
    };

    let progress = std::io::stderr().is_terminal();
    let mut done = 0usize;
    let mut weight_map = BTreeMap::new();
    for s in 0..o.shards {
        let members: Vec<usize> = (0..tensors.len()).filter(|&i| shard_of[i] == s).collect();
        let path = o.out.join(file_name(s));
        let layout: Vec<_> =
            members.iter().map(|&i| (tensors[i].0.name.clone(), tensors[i].1, tensors[i].0.shape.clone())).collect();
        let mut pending_scales: Vec<f32> = Vec::new();
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert(MARK.0.to_string(), MARK.1.to_string());
        crate::st::write_streaming(&path, &layout, &meta, |j, w| {
            let (spec, dtype, is_scale) = &tensors[members[j]];
            let io = |e| Error::io(&path, e);
            if *is_scale {
                // Scales were computed while writing the weight just before.
                w.write_all(&crate::st::le_bytes_f32(&pending_scales)).map_err(io)?;
                pending_scales.clear();
            } else {
                write_tensor(spec, *dtype, o.seed, w, Some(&mut pending_scales)).map_err(io)?;
            }
            done += bytes(&tensors[members[j]]);
            if progress {
                eprint!(
                    "\rsynth: shard {}/{}  {:5.1}% of {:.2} GB",
                    s + 1,
                    o.shards,
                    100.0 * done as f64 / total as f64,
                    total as f64 / 1e9
                );
            }
            Ok(())
        })?;
        for &i in &members {
            weight_map.insert(tensors[i].0.name.clone(), file_name(s));
        }
    }
    if progress {
        eprintln!();
    }
    if o.shards > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&o.out.join(INDEX_FILE), &index)?;
        // A single file from before (synth's own: `refuse_foreign_files` checked it) would be
        // what transformers loads, ahead of the index.
        match std::fs::remove_file(o.out.join(SINGLE_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(o.out.join(SINGLE_FILE), e)),
            _ => {}
        }
    } else {
        let _ = std::fs::remove_file(o.out.join(INDEX_FILE));
    }
    // Weight files left in this folder from before (another shard count) are no part of this
    // checkpoint. They are named, not removed: the folder may hold a real model's shards.
    let written: Vec<String> = (0..o.shards).map(file_name).collect();
    let weights = |n: &str| n == SINGLE_FILE || (n.starts_with("model-") && n.ends_with(".safetensors"));
    let mut stale: Vec<String> = std::fs::read_dir(&o.out)
        .map_err(|e| Error::io(&o.out, e))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| weights(n) && !written.contains(n))
        .collect();
    stale.sort();
    if !stale.is_empty() {
        eprintln!(
            "synth: note: {} also holds {} from before, which this checkpoint does not use",
            o.out.display(),
            stale.join(", ")
        );
    }
    write_json(&o.out.join("config.json"), &config_json)?;
    std::fs::remove_file(&unfinished).map_err(|e| Error::io(&unfinished, e))?;
    Ok(cfg)
}

/// Each tensor's shard (of `shards`), the tensors given as (bytes, is the scale of the weight
/// before it): contiguous shards balanced by bytes, a weight and its scale together, and no shard
/// empty (a tensor larger than a shard's share, GLM-5's embedding, would leave the next one
/// with nothing). Needs at least `shards` weights.
fn assign_shards(tensors: &[(usize, bool)], shards: usize) -> Vec<usize> {
    let total: usize = tensors.iter().map(|t| t.0).sum();
    let weights = tensors.iter().filter(|t| !t.1).count();
    let (mut out, mut acc, mut w) = (Vec::with_capacity(tensors.len()), 0usize, 0usize);
    let mut prev: Option<usize> = None;
    for &(bytes, scale) in tensors {
        let s = match (scale, prev) {
            (true, Some(p)) => p,
            _ => {
                let balanced = (acc * shards / total.max(1)).min(shards - 1);
                // No shard skipped, and enough weights left for the shards after this one.
                let (low, high) =
                    (prev.unwrap_or(0).max((shards + w).saturating_sub(weights)), prev.map_or(0, |p| p + 1));
                w += 1;
                balanced.clamp(low.min(high), high)
            }
        };
        out.push(s);
        prev = Some(s);
        acc += bytes;
    }
    out
}

/// The metadata entry on every weight file synth writes: a folder whose weights lack it holds a
/// real checkpoint, which synth must not replace with random weights.
const MARK: (&str, &str) = ("glimpse", "synth");

/// Refuses an `out` folder that holds weight files synth did not write (a real checkpoint,
/// perhaps with its reference dumps beside it), or a config or index without synth's weights
/// beside it (another folder's files, which synth would replace).
fn refuse_foreign_files(out: &Path) -> Result<()> {
    let files = crate::checkpoint::own_files(out);
    let mut marked = false;
    for path in files.iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")) {
        let ours =
            crate::st::StFile::open(path).is_ok_and(|f| f.metadata().get(MARK.0).map(String::as_str) == Some(MARK.1));
        if !ours {
            return Err(Error::Usage(format!(
                "--out {}: holds weights without synth's mark ({}: another tool's, or an older glimpse's); give an \
                 empty folder or one synth wrote",
                out.display(),
                path.display()
            )));
        }
        marked = true;
    }
    let unfinished = out.join(crate::checkpoint::SYNTH_UNFINISHED).exists();
    let replaced = files.iter().find(|p| p.file_name().is_some_and(|n| n == "config.json" || n == INDEX_FILE));
    match replaced {
        Some(path) if !marked && !unfinished => Err(Error::Usage(format!(
            "--out {}: holds {} but no weights synth wrote; give an empty folder or one synth wrote",
            out.display(),
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// Bytes free to this user on the file system that holds (or will hold) `dir`; None where that
/// is not known.
fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let existing =
            dir.ancestors().find(|a| a.is_dir()).filter(|a| !a.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
        // SAFETY: a NUL-terminated path and a zeroed struct the call fills.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--layers` leaves room for a MoE layer where every kept layer would be dense, whether the
    /// config counts its dense layers or lists every layer's kind (the list was only cut).
    #[test]
    fn layers_keep_a_moe_layer_whether_dense_layers_are_counted_or_listed() {
        let o = |layers| SynthOptions {
            config: Value::Null,
            layers: Some(layers),
            dense: None,
            experts: None,
            vocab: None,
            dtype: SynthDtype::Bf16,
            shards: 1,
            mtp: false,
            seed: 0,
            out: PathBuf::new(),
        };
        let counted = shrink(preset_glm5(), &o(2)).unwrap();
        assert_eq!(counted["first_k_dense_replace"], 1);
        let mut listed = preset_glm5();
        listed["mlp_layer_types"] = json!(["dense", "dense", "dense", "sparse", "sparse"]);
        let listed = shrink(listed, &o(2)).unwrap();
        assert_eq!(
            (&listed["first_k_dense_replace"], &listed["mlp_layer_types"]),
            (&json!(1), &json!(["dense", "sparse"]))
        );
        // Deep enough to keep a MoE layer: as given.
        assert_eq!(shrink(preset_glm5(), &o(4)).unwrap()["first_k_dense_replace"], 3);
    }

    /// Shards are contiguous, balanced by bytes, a scale with its weight, and none empty: GLM-5's
    /// one-layer layout in three left the third empty (the embedding filled the first, lm_head
    /// began past two thirds of the bytes).
    #[test]
    fn shards_are_balanced_contiguous_and_never_empty() {
        let check = |tensors: &[(usize, bool)], shards: usize| -> Vec<usize> {
            let s = assign_shards(tensors, shards);
            assert_eq!(s.len(), tensors.len());
            assert_eq!(s[0], 0);
            assert!(s.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1), "{s:?}");
            assert_eq!(s.last(), Some(&(shards - 1)), "{s:?}");
            for (i, t) in tensors.iter().enumerate().filter(|(_, t)| t.1) {
                assert_eq!(s[i], s[i - 1], "scale {i} apart from its weight: {s:?} ({t:?})");
            }
            s
        };
        // Like GLM-5's: the embedding, 19 small layer weights, lm_head as large as the embedding.
        let mut glm5 = vec![(1900, false)];
        glm5.extend([(10, false); 19]);
        glm5.push((1900, false));
        assert_eq!(check(&glm5, 3), [vec![0], vec![1; 19], vec![2]].concat());
        // Even sizes split evenly; FP8 scales stay with their weights.
        assert_eq!(check(&[(1, false); 6], 3), [0, 0, 1, 1, 2, 2]);
        let fp8 = [(8, false), (1, true), (8, false), (1, true), (8, false), (1, true), (8, false), (1, true)];
        assert_eq!(check(&fp8, 2), [0, 0, 0, 0, 1, 1, 1, 1]);
        // As many shards as weights: one each.
        assert_eq!(check(&[(5, false), (1, false), (1, false)], 3), [0, 1, 2]);
        assert_eq!(check(&[(5, false)], 1), [0]);
    }

    /// The nearest code by search over the monotone codes, ties to the even code.
    fn by_search(x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs().min(448.0);
        let near = (0u8..=0x7E).min_by(|&c, &d| {
            let (dc, dd) = ((crate::st::e4m3_to_f32(c) - a).abs(), (crate::st::e4m3_to_f32(d) - a).abs());
            dc.total_cmp(&dd).then((c % 2).cmp(&(d % 2)))
        });
        sign | near.unwrap_or(0)
    }

    /// A projection's 128 x 128 blocks get scales as different as a trained checkpoint's (a
    /// factor of 4 between extremes at most), the weights keep the variance of `N(0, 1/fan_in)`,
    /// and the f32 and FP8 twins hold the same values, up to FP8's rounding.
    #[test]
    fn block_scales_differ_and_the_twins_agree() {
        use crate::layout::{Kind, WeightSpec};
        // (64 blocks: the mean of their squared gains is within 0.3 of 1 by three sigmas.)
        let spec = WeightSpec { name: "w".into(), shape: vec![1024, 1024], kind: Kind::Linear };
        let (mut f32_bytes, mut fp8_bytes, mut scales) = (Vec::new(), Vec::new(), Vec::new());
        write_tensor(&spec, Dtype::F32, 7, &mut f32_bytes, None).unwrap();
        write_tensor(&spec, Dtype::F8_E4M3, 7, &mut fp8_bytes, Some(&mut scales)).unwrap();
        assert_eq!(scales.len(), 8 * 8);
        let (lo, hi) = scales.iter().fold((f32::MAX, 0f32), |(l, h), &x| (l.min(x), h.max(x)));
        assert!(hi / lo > 1.5 && hi / lo < 4.2, "block scales {lo} .. {hi}");
        let values: Vec<f32> =
            f32_bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let variance = values.iter().map(|x| (x * x) as f64).sum::<f64>() / values.len() as f64;
        assert!((variance * 1024.0 - 1.0).abs() < 0.3, "variance x fan_in {}", variance * 1024.0);
        for (i, (&code, &x)) in fp8_bytes.iter().zip(&values).enumerate() {
            let block = (i / 1024 / 128) * 8 + (i % 1024) / 128;
            let back = crate::st::e4m3_to_f32(code) * scales[block];
            assert!((back - x).abs() <= 0.07 * x.abs() + scales[block] * 2f32.powi(-9), "{i}: {back} vs {x}");
        }
    }

    /// Every code, the midpoints between neighbours (ties), and a sweep of values agree with the
    /// search.
    #[test]
    fn e4m3_rounding_agrees_with_the_search() {
        let mut values: Vec<f32> = (0u8..0x7E)
            .flat_map(|c| {
                let (a, b) = (crate::st::e4m3_to_f32(c), crate::st::e4m3_to_f32(c + 1));
                let mid = (a + b) / 2.0;
                [a, mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1)]
            })
            .collect();
        values.extend((0..200_000).map(|i| i as f32 * 0.00231));
        values.extend([448.0, 447.9, 460.0, 1e30, 1e-30, 0.0]);
        for v in values {
            assert_eq!(f32_to_e4m3(v), by_search(v), "{v:e}");
            assert_eq!(f32_to_e4m3(-v), by_search(-v), "{:e}", -v);
        }
    }

    #[test]
    fn e4m3_round_trip() {
        for code in 0u8..0x7F {
            let v = crate::st::e4m3_to_f32(code);
            assert_eq!(f32_to_e4m3(v), code, "code {code:#x} value {v}");
            assert_eq!(f32_to_e4m3(-v) & 0x7F, code);
        }
        assert_eq!(crate::st::e4m3_to_f32(f32_to_e4m3(1000.0)), 448.0);
        assert_eq!(crate::st::e4m3_to_f32(0x7E), 448.0);
        assert!(crate::st::e4m3_to_f32(0x7F).is_nan());
    }
}
