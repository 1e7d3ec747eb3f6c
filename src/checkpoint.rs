//! A checkpoint folder: `config.json` plus one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, all memory-mapped. Resolves a tensor name to its shard, decodes
//! it to f32 and dequantises block-FP8 weights (`weight_scale_inv`, partial edge blocks included).
//! Shapes are checked by the model builder through [`Loader`], which collects every problem before
//! failing so a user sees all missing or misshapen tensors at once (and by the few readers that
//! take a tensor without building the model, like `Routers::read`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::tensor::Dtype;
use serde_json::Value;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::st::StFile;

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";
/// The embedding table and the head, which `tie_word_embeddings` makes one tensor.
const EMBED: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";
/// Written by `synth` before its first shard and removed after its last: a folder that holds it
/// was left half written (synth killed), its shards possibly of two runs.
pub const SYNTH_UNFINISHED: &str = ".glimpse-synth-unfinished";

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    /// The raw config.json bytes (their sha256 goes into dump metadata).
    pub config_bytes: Vec<u8>,
    pub files: Vec<StFile>,
    /// Tensor name -> index into `files`.
    names: BTreeMap<String, usize>,
    /// Shards the index names that are not in the folder (a download in progress): their
    /// tensors are missing, which `inspect` counts and loading lists, not an error to open.
    pub absent_shards: Vec<String>,
    /// The tensors the index maps to them.
    absent_names: BTreeSet<String>,
}

/// Its folder and how many tensors it holds, not every header.
impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpoint({}, {} tensors)", self.dir.display(), self.names.len())
    }
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            let what = match dir.exists() {
                true => "is a file, not a folder",
                false => "does not exist",
            };
            return Err(Error::checkpoint(dir, format!("{what} (expected a checkpoint folder with config.json)")));
        }
        if dir.join(SYNTH_UNFINISHED).exists() {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "synth did not finish writing it (stopped?): its shards may be of two runs; run synth again \
                     (or delete {SYNTH_UNFINISHED} if you know it whole)"
                ),
            ));
        }
        let config_path = dir.join("config.json");
        let config_bytes = crate::st::read_input(&config_path)?;
        // (Parsed from the bytes read, which the dumps' config hash describes: read once.)
        let config = Config::from_bytes(&config_path, &config_bytes)?;
        let index = read_index(&dir.join(INDEX_FILE))?;
        let shard_names = shard_list(dir, index.as_ref())?;
        let progress = std::io::stderr().is_terminal() && shard_names.len() > 1;
        let mut files: Vec<StFile> = Vec::with_capacity(shard_names.len());
        let shard_of = |f: &StFile| f.path.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned());
        let mut names = BTreeMap::new();
        let mut absent_shards = Vec::new();
        for (i, shard) in shard_names.iter().enumerate() {
            if progress {
                eprint!("\ropening shard {}/{}: {shard}", i + 1, shard_names.len());
            }
            let path = dir.join(shard);
            // (Not there at all, not even as a broken link: a shard still to come.)
            if std::fs::symlink_metadata(&path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
                absent_shards.push(shard.clone());
                continue;
            }
            let file = StFile::open(&path)?;
            if file.metadata().get("format").is_some_and(|f| f == crate::dump::FORMAT) {
                return Err(Error::checkpoint(
                    &path,
                    "is an activation dump (format glm5-dump/1), not the checkpoint's weights",
                ));
            }
            for name in file.names() {
                if let Some(prev) = names.insert(name.to_string(), files.len()) {
                    return Err(Error::checkpoint(
                        dir,
                        format!("tensor `{name}` appears in both {} and {shard}", shard_of(&files[prev])),
                    ));
                }
            }
            files.push(file);
        }
        if progress {
            eprintln!();
        }
        let absent_names = index
            .iter()
            .flatten()
            .filter(|(_, shard)| absent_shards.contains(shard))
            .map(|(name, _)| name.clone())
            .collect();
        let ckpt =
            Checkpoint { dir: dir.to_path_buf(), config, config_bytes, files, names, absent_shards, absent_names };
        if let Some(map) = index {
            ckpt.check_index(map)?;
        }
        ckpt.check_scales_pair()?;
        Ok(ckpt)
    }

    /// Every FP8 tensor has its block scales beside it, and every block scale an FP8 tensor to
    /// scale: alone, an FP8 tensor's codes are not its weight (they ran as if scaled by 1), and a
    /// scale beside a bf16 or f32 weight would multiply values that are already the weight.
    fn check_scales_pair(&self) -> Result<()> {
        // (A partner in a shard still to come is missing, which loading lists.)
        for name in self.names() {
            if let Some(weight) = name.strip_suffix("_scale_inv").filter(|w| !self.absent_names.contains(*w)) {
                let dtype = self.dtype(weight);
                if dtype != Some(Dtype::F8_E4M3) {
                    let what = dtype.map_or("missing".to_string(), |d| format!("{d:?}"));
                    return Err(Error::checkpoint(
                        &self.dir,
                        format!("`{name}` scales `{weight}`, which is {what}: block scales go beside F8_E4M3 weights"),
                    ));
                }
            } else if self.dtype(name) == Some(Dtype::F8_E5M2) {
                // Dumps may hold E5M2; a checkpoint's FP8 is E4M3 with block scales, and E5M2
                // codes run at face value would be a weight nobody quantised that way.
                return Err(Error::checkpoint(
                    &self.dir,
                    format!("`{name}` is F8_E5M2: a checkpoint's FP8 weights are F8_E4M3 with block scales"),
                ));
            } else if self.dtype(name) == Some(Dtype::F8_E4M3)
                && self.scale_name(name).is_none()
                && !self.absent_names.contains(&format!("{name}_scale_inv"))
            {
                return Err(Error::checkpoint(
                    &self.dir,
                    format!(
                        "F8_E4M3 tensor `{name}` has no `{name}_scale_inv`: its codes are not the weight by themselves"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `name`'s block scales, each finite and not negative (0 scales a block of zeros).
    fn scales(&self, scale_name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (file, _) = self.file(scale_name)?;
        let (scale, shape) = file.f32(scale_name)?;
        if let Some(i) = scale.iter().position(|s| !s.is_finite() || *s < 0.0) {
            let at = crate::compare::coord(&shape, i);
            return Err(Error::checkpoint(
                &file.path,
                format!("`{scale_name}` {at:?} is {}: a block's scale must be a finite number, 0 or more", scale[i]),
            ));
        }
        Ok((scale, shape))
    }

    /// Every name the index (`map`, read once at open) maps must be in the shard it names.
    fn check_index(&self, map: BTreeMap<String, String>) -> Result<()> {
        let path = self.dir.join(INDEX_FILE);
        for (name, shard) in map.into_iter().filter(|(name, _)| !self.absent_names.contains(name)) {
            let file = self.names.get(&name).map(|&i| &self.files[i]);
            match file {
                // (The shard's path under the folder: an index may name shards in subfolders, as
                // transformers joins them.)
                Some(f) if f.path == self.dir.join(&shard) => {}
                _ => return Err(Error::checkpoint(&path, format!("maps `{name}` to {shard}, which does not hold it"))),
            }
        }
        Ok(())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// The tensors the index places in shards the folder lacks.
    pub fn absent(&self) -> impl Iterator<Item = &str> {
        self.absent_names.iter().map(String::as_str)
    }

    /// Whether the index maps `name` to a shard not in the folder.
    pub fn is_absent(&self, name: &str) -> bool {
        self.absent_names.contains(name)
    }

    /// What the index names that the folder lacks, said where the tensors they hold are missing.
    pub fn absent_note(&self) -> Option<String> {
        let (n, first) = (self.absent_shards.len(), self.absent_shards.first()?);
        let more = if n > 1 { format!(" and {} more", n - 1) } else { String::new() };
        Some(format!("{INDEX_FILE} names {n} shard(s) not in the folder, {first}{more}: a download in progress?"))
    }
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(self.stored(name))
    }

    /// Whether lm_head is the embedding table: `tie_word_embeddings`, unless the checkpoint
    /// stores an `lm_head.weight` of its own, which transformers then keeps (it unties the two
    /// when both are stored and differ, with a warning; equal ones give the same logits).
    pub fn tied_head(&self) -> bool {
        self.config.tie_word_embeddings && !self.contains(HEAD)
    }

    /// Whether the embedding table is `lm_head.weight`: `tie_word_embeddings` with only the head
    /// stored, which transformers 5.24 loads into both (the mirror of [`Checkpoint::tied_head`]).
    /// Its readers then read the head wherever they ask for `model.embed_tokens.weight`.
    pub fn embedding_is_head(&self) -> bool {
        self.config.tie_word_embeddings
            && self.names.contains_key(HEAD)
            && !self.names.contains_key(EMBED)
            && !self.absent_names.contains(EMBED)
    }

    /// The tensor lm_head multiplies by (see [`Checkpoint::tied_head`]).
    pub fn head_name(&self) -> &'static str {
        if self.tied_head() {
            EMBED
        } else {
            HEAD
        }
    }

    /// The stored tensor a read of `name` reads: itself, but the embedding where it is the head.
    fn stored<'a>(&self, name: &'a str) -> &'a str {
        match name == EMBED && self.embedding_is_head() {
            true => HEAD,
            false => name,
        }
    }

    /// The file that holds `name`, and its name there.
    fn file<'a>(&'a self, name: &'a str) -> Result<(&'a StFile, &'a str)> {
        let stored = self.stored(name);
        self.names
            .get(stored)
            .map(|&i| (&self.files[i], stored))
            .ok_or_else(|| Error::checkpoint(&self.dir, format!("missing tensor `{name}`")))
    }
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.file(name).ok().and_then(|(f, name)| f.info(name)).map(|i| i.dtype)
    }
    /// The stored shape (for FP8 weights, the true weight's shape: same as stored).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.file(name).ok().and_then(|(f, name)| f.info(name)).map(|i| i.shape.clone())
    }
    /// The FP8 scale tensor that belongs to `name`, if any (`X.weight` -> `X.weight_scale_inv`).
    pub fn scale_name(&self, name: &str) -> Option<String> {
        let s = format!("{}_scale_inv", self.stored(name));
        self.contains(&s).then_some(s)
    }

    /// A stored-BF16 weight read in place by the few-row decode products (None for other
    /// dtypes, FP8 included; a scale beside a bf16 weight is refused at open).
    pub fn bf16_weight(&self, name: &str) -> Option<crate::model::gemv::Bf16Weight> {
        let (file, name) = self.file(name).ok()?;
        file.bf16_weight(name)
    }

    /// A block-FP8 weight read in place (None for other dtypes, or when its scales do not fit or
    /// hold a bad value: then [`Checkpoint::f32`] reports the problem).
    pub fn fp8_weight(&self, name: &str) -> Option<crate::model::fp8::Fp8Weight> {
        let scale_name = self.scale_name(name)?;
        let (scale, scale_shape) = self.scales(&scale_name).ok()?;
        let block = self.config.fp8_block();
        let (file, name) = self.file(name).ok()?;
        file.fp8_weight(name, (scale, &scale_shape), block)
    }

    /// A tensor decoded to f32 with its shape; block-FP8 weights are dequantised.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (file, stored) = self.file(name)?;
        let (mut data, shape) = file.f32(stored)?;
        if let Some(scale_name) = self.scale_name(name) {
            let (scale, sshape) = self.scales(&scale_name)?;
            let block = self.config.fp8_block();
            dequantize_blocks(&mut data, &shape, &scale, &sshape, block)
                .map_err(|msg| Error::checkpoint(&file.path, format!("`{name}`: {msg}")))?;
        }
        Ok((data, shape))
    }

    /// Rows `[start, start + count)` of a 2-D weight as f32 [count, cols], reading only those rows
    /// (FP8 weights are dequantised whole first: their embeddings and lm_head are never FP8).
    pub fn rows(&self, name: &str, start: usize, count: usize) -> Result<Tensor> {
        let Some(&[_, cols]) = self.shape(name).as_deref() else {
            return Err(Error::checkpoint(&self.dir, format!("tensor `{name}` is not a 2-D weight")));
        };
        if self.scale_name(name).is_some() {
            let rows = self.tensor(name)?.narrow(0, start, count);
            return rows
                .map_err(|e| Error::checkpoint(&self.dir, format!("tensor `{name}` rows {start}..+{count}: {e}")));
        }
        let (file, stored) = self.file(name)?;
        let data = file.f32_rows(stored, start, count)?;
        Ok(Tensor::from_vec(data, (count, cols), &Device::Cpu)?)
    }

    /// Drops the resident pages of every tensor whose name starts with `prefix`.
    pub fn release(&self, prefix: &str) {
        let prefix = self.stored(prefix);
        for (name, &i) in self.names.range(prefix.to_string()..).take_while(|(n, _)| n.starts_with(prefix)) {
            self.files[i].release(name);
        }
    }

    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (data, shape) = self.f32(name)?;
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }

    /// Tensors of the MTP layer(s) `model.layers.{num_hidden_layers + j}.*`: kept in the checkpoint,
    /// not used by the main forward.
    pub fn mtp_names(&self) -> Vec<&str> {
        let n = self.config.num_hidden_layers;
        let prefixes: Vec<String> =
            (0..self.config.num_nextn_predict_layers.max(1)).map(|j| format!("model.layers.{}.", n + j)).collect();
        self.names().filter(|name| prefixes.iter().any(|p| name.starts_with(p))).collect()
    }
}

/// The files of the checkpoint in `dir` that glimpse reads (those that exist): its config,
/// tokenizer, index and weights (the index's shards, read leniently: a broken index is the
/// checkpoint reader's to name). No output may replace one.
pub fn own_files(dir: &Path) -> Vec<PathBuf> {
    let mut names: BTreeSet<String> = ["config.json", crate::tokenizer::TOKENIZER_FILE, INDEX_FILE, SINGLE_FILE]
        .iter()
        .map(|n| n.to_string())
        .collect();
    if let Ok(Some(map)) = read_index(&dir.join(INDEX_FILE)) {
        names.extend(map.into_values());
    }
    names.into_iter().map(|n| dir.join(n)).filter(|p| p.exists()).collect()
}

/// The shard files of a checkpoint (those its index `index_map` names, else the single file),
/// validated to stay inside its folder.
fn shard_list(dir: &Path, index_map: Option<&BTreeMap<String, String>>) -> Result<Vec<String>> {
    let index = dir.join(INDEX_FILE);
    let single = dir.join(SINGLE_FILE);
    if index_map.is_some() && single.exists() {
        // transformers reads the single file first and never the index: refused, not guessed,
        // so the two cannot run different weights from one folder.
        return Err(Error::checkpoint(
            dir,
            format!(
                "holds both {SINGLE_FILE} and {INDEX_FILE}: transformers loads {SINGLE_FILE} and ignores the \
                 index; remove whichever is not the checkpoint"
            ),
        ));
    }
    if let Some(map) = index_map {
        let shards: BTreeSet<String> = map.values().cloned().collect();
        let root = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        // The Hugging Face cache keeps a revision's files in `REPO/snapshots/REV/` as links to
        // `REPO/blobs/`: links there stay inside the download.
        let blobs = (root.parent().and_then(Path::file_name) == Some("snapshots".as_ref()))
            .then(|| root.parent().and_then(Path::parent).map(|repo| repo.join("blobs")))
            .flatten();
        for s in &shards {
            let p = Path::new(s);
            let inside = p.components().all(|c| matches!(c, Component::Normal(_)));
            if !inside || s.is_empty() {
                return Err(Error::checkpoint(&index, format!("shard name \"{s}\" escapes the model folder")));
            }
            // A symlink may still point outside: follow it and check where it lands.
            if let Ok(real) = dir.join(p).canonicalize() {
                if !real.starts_with(&root) && !blobs.as_ref().is_some_and(|b| real.starts_with(b)) {
                    return Err(Error::checkpoint(&index, format!("shard \"{s}\" links outside the model folder")));
                }
            }
        }
        return Ok(shards.into_iter().collect());
    }
    if single.is_file() {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    // Something by that name that is not a readable file: say what it is.
    match std::fs::symlink_metadata(&single) {
        Ok(m) if m.is_dir() => Err(Error::checkpoint(&single, "is a folder, not a safetensors file")),
        Ok(m) if m.file_type().is_symlink() => Err(Error::checkpoint(&single, "is a link to nothing readable")),
        Ok(_) => Err(Error::checkpoint(&single, "is not a regular file")),
        _ => Err(Error::checkpoint(dir, format!("no {SINGLE_FILE} and no {INDEX_FILE}"))),
    }
}

/// `weight_map` of an index file, or None when there is no index.
fn read_index(path: &Path) -> Result<Option<BTreeMap<String, String>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = crate::st::read_input(path)?;
    parse_index(path, &bytes).map(Some)
}

/// The `weight_map` of an index file's bytes.
pub fn parse_index(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let v: Value = serde_json::from_slice(bytes).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::checkpoint(path, "no \"weight_map\" object"))?;
    map.iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|s| (k.clone(), s.to_string()))
                .ok_or_else(|| Error::checkpoint(path, format!("weight_map entry `{k}` is not a file name")))
        })
        .collect::<Result<_>>()
}

/// `w[i,j] *= scale[i / br, j / bc]`, the block-FP8 dequantisation. The last row and column blocks
/// may be partial (e.g. 576 rows = 4.5 blocks of 128): the scale grid is `ceil(rows/br) x ceil(cols/bc)`.
pub fn dequantize_blocks(
    w: &mut [f32],
    shape: &[usize],
    scale: &[f32],
    scale_shape: &[usize],
    [br, bc]: [usize; 2],
) -> std::result::Result<(), String> {
    let [rows, cols] = shape else {
        return Err(format!("FP8 weight must be 2-D, got shape {shape:?}"));
    };
    if br == 0 || bc == 0 {
        return Err(format!("FP8 blocks must be positive, got {br}x{bc}"));
    }
    let want = [rows.div_ceil(br), cols.div_ceil(bc)];
    if scale_shape != want {
        return Err(format!(
            "weight_scale_inv has shape {scale_shape:?}, expected {want:?} for {br}x{bc} blocks of {shape:?}"
        ));
    }
    // (A weight of no columns has nothing to scale: `chunks_exact_mut(0)` would panic.)
    if *cols == 0 {
        return Ok(());
    }
    for (i, row) in w.chunks_exact_mut(*cols).enumerate() {
        let srow = &scale[(i / br) * want[1]..(i / br + 1) * want[1]];
        for (j, x) in row.iter_mut().enumerate() {
            *x *= srow[j / bc];
        }
    }
    Ok(())
}

/// Loads named tensors with expected shapes, collecting every problem instead of stopping at the
/// first, so `finish` can list all of them.
pub struct Loader<'a> {
    pub ckpt: &'a Checkpoint,
    problems: Vec<String>,
    /// The bf16 and FP8 weights loaded are read in place by every product of fewer rows, not
    /// the first only ([`crate::model::nn::Packing`]).
    pub(crate) in_place: bool,
}

impl<'a> Loader<'a> {
    pub fn new(ckpt: &'a Checkpoint) -> Self {
        Loader { ckpt, problems: Vec::new(), in_place: false }
    }

    /// A loader whose bf16 and FP8 weights are read in place by every product of fewer rows
    /// (a streamed layer, which one pass, or a sweep's prompts, use and then release).
    pub fn reading_in_place(mut self) -> Self {
        self.in_place = true;
        self
    }

    /// The tensor `name` of shape `shape`; on a problem, records it and returns an empty
    /// placeholder (the model is discarded by `finish`).
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Tensor {
        match self.ckpt.shape(name) {
            None => self.problems.push(format!("missing `{name}` (expected shape {shape:?})")),
            Some(s) if s != shape => self.problems.push(format!("`{name}` has shape {s:?}, expected {shape:?}")),
            Some(_) => match self.ckpt.tensor(name) {
                Ok(t) => return t,
                Err(e) => self.problems.push(e.to_string()),
            },
        }
        Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).unwrap_or_else(|_| unreachable!())
    }

    pub fn has(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }

    /// A problem found in a tensor's values, listed with the rest.
    pub fn refuse(&mut self, problem: String) {
        self.problems.push(problem);
    }

    /// `name` read in place as bf16, when it is stored so.
    pub fn bf16(&self, name: &str) -> Option<crate::model::gemv::Bf16Weight> {
        self.ckpt.bf16_weight(name)
    }

    /// `name` read in place as block-FP8, when it is stored so.
    pub fn fp8(&self, name: &str) -> Option<crate::model::fp8::Fp8Weight> {
        self.ckpt.fp8_weight(name)
    }

    pub fn finish<T>(self, value: T) -> Result<T> {
        if self.problems.is_empty() {
            return Ok(value);
        }
        let n = self.problems.len();
        let shown: Vec<_> = self.problems.iter().take(12).cloned().collect();
        let more = if n > 12 { format!("; and {} more", n - 12) } else { String::new() };
        let absent = match self.ckpt.absent_note() {
            Some(a) => format!(" ({a})"),
            None => String::new(),
        };
        Err(Error::Weights(format!(
            "{}: {n} weight problem(s): {}{more}{absent}",
            self.ckpt.dir.display(),
            shown.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3x5 weight in 2x2 blocks: the scale grid is 2x3 and the last row and column blocks are partial.
    #[test]
    fn fp8_edge_blocks_are_partial() {
        let mut w = vec![1f32; 15];
        let scale = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        dequantize_blocks(&mut w, &[3, 5], &scale, &[2, 3], [2, 2]).unwrap();
        #[rustfmt::skip]
        let want = [
            1.0, 1.0, 2.0, 2.0, 3.0,
            1.0, 1.0, 2.0, 2.0, 3.0,
            4.0, 4.0, 5.0, 5.0, 6.0,
        ];
        assert_eq!(w, want);
        // GLM-5's kv_a_proj_with_mqa: 576 rows are 4.5 blocks of 128, so 5 row blocks.
        let mut w = vec![1f32; 576 * 3];
        let scale: Vec<f32> = (0..5).map(|i| i as f32).collect();
        dequantize_blocks(&mut w, &[576, 3], &scale, &[5, 1], [128, 128]).unwrap();
        assert_eq!((w[575 * 3], w[512 * 3], w[511 * 3]), (4.0, 4.0, 3.0));
        let err = dequantize_blocks(&mut w, &[576, 3], &scale, &[4, 1], [128, 128]).unwrap_err();
        assert!(err.contains("expected [5, 1]"), "{err}");
        // No columns, or no block size: nothing to scale, or said; no panic.
        dequantize_blocks(&mut [], &[4, 0], &[], &[1, 0], [128, 128]).unwrap();
        assert!(dequantize_blocks(&mut w, &[576, 3], &scale, &[5, 1], [0, 128]).unwrap_err().contains("positive"));
    }
}
