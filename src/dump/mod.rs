//! Activation dumps in the `glm5-dump/1` format (`docs/spec/dump-format.md`): one safetensors
//! file of named F32 activations and I64 selections. Reading goes through a memory map, so a large
//! reference dump is paged in tensor by tensor; writing (`writer.rs`) is atomic (temporary file, then rename).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::hooks::{HookPoint, LayerHook};
use crate::model::Tokens;
use crate::st::{self, StFile};

mod writer;
pub(crate) use writer::{as_recorded, write_tensor};
pub use writer::{DumpWriter, HEADER_BYTES_PER_TENSOR, SPILL_QUEUE};

pub const FORMAT: &str = "glm5-dump/1";

pub struct Dump {
    pub path: PathBuf,
    file: StFile,
    /// Tensors another tool added that glimpse does not read: under names outside the spec's hook
    /// points, of a dtype a dump's values do not take (a bool mask), or under one of glimpse's
    /// own extra names in a dtype or rank glimpse never writes it in (another tool's `moe.margin`
    /// of its own making). Out of [`Dump::names`].
    unread: Vec<Unread>,
}

/// A tensor [`Dump::open`] left unread, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Unread {
    pub name: String,
    pub dtype: String,
    pub why: String,
}

/// A tensor read from a dump: floats as f32, selections as i64.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl Values {
    /// A tensor's values: I64 index tensors as they are, everything else as f32.
    pub fn from_tensor(t: &Tensor) -> Result<Values> {
        Ok(match t.dtype() {
            candle_core::DType::I64 => Values::I64(t.flatten_all()?.to_vec1::<i64>()?),
            _ => Values::F32(t.flatten_all()?.to_vec1::<f32>()?),
        })
    }
}

impl Dump {
    pub fn open(path: &Path) -> Result<Self> {
        let file = StFile::open(path).map_err(|e| match e {
            Error::Checkpoint { msg, .. } => Error::dump(path, msg),
            e => e,
        })?;
        match file.metadata().get("format").map(String::as_str) {
            Some(FORMAT) => {}
            Some(other) => {
                let hint = weights_hint(&file);
                return Err(Error::dump(path, format!("format is \"{other}\", expected \"{FORMAT}\"{hint}")));
            }
            None => {
                let hint = weights_hint(&file);
                return Err(Error::dump(
                    path,
                    format!("no `format` in the header metadata (expected \"{FORMAT}\"){hint}"),
                ));
            }
        }
        // Refused at open, not when a command reaches the tensor (after its header was printed);
        // the first in name order, so the same file always names the same tensor.
        let mut names: Vec<&str> = file.names().collect();
        names.sort_unstable();
        let mut unread = Vec::new();
        for name in names {
            // Names are printed in every report: a newline or an escape sequence in one would
            // forge a line of it, or recolour the terminal.
            if name.chars().any(char::is_control) {
                return Err(Error::dump(path, format!("tensor name {name:?} holds a control character")));
            }
            let Some(info) = file.info(name) else { continue };
            let (float, int) = (st::FLOATS.contains(&info.dtype), st::INTS.contains(&info.dtype));
            let hook = HookPoint::parse(name);
            let dtype = format!("{:?}", info.dtype);
            // glimpse's extra names are not the spec's: another tool may use one for a tensor of
            // its own (the spec allows any extra), which is listed, not read as glimpse's.
            if let Some(why) = hook.filter(|h| !h.in_spec()).and_then(|h| foreign(h, (float, int), info.shape.len())) {
                unread.push(Unread { name: name.to_string(), dtype, why });
                continue;
            }
            let problem = match hook {
                // Another tool's extra tensor (the spec allows them) is listed, not read.
                None if !float && !int => {
                    let why = "not a dtype of the spec's hook points".to_string();
                    unread.push(Unread { name: name.to_string(), dtype, why });
                    continue;
                }
                _ if !float && !int => format!(
                    "a dump holds floats ({}) and integers ({})",
                    st::listed(&st::FLOATS),
                    st::listed(&st::INTS)
                ),
                // The spec's index tensors are integers: a float `dsa.topk` would be compared
                // element by element, order and padding counting, where the spec compares sets.
                // (Another tool's `my_tool.dsa.topk`, no hook point, is its own business.)
                Some(_) if float && is_index_tensor(name) => {
                    "the spec stores token ids and selections as integers (I64)".to_string()
                }
                // (glimpse's own flags, integers.)
                Some(HookPoint::Layer(_, LayerHook::BiasChanged)) => continue,
                // And its activations floats: integer logits would be compared as if they were.
                Some(_) if int && !is_index_tensor(name) => {
                    "the spec stores activations, scores and weights as floats (F32)".to_string()
                }
                _ => continue,
            };
            return Err(Error::dump(path, format!("tensor `{name}` has dtype {:?}: {problem}", info.dtype)));
        }
        Ok(Dump { path: path.to_path_buf(), file, unread })
    }

    /// The warning a dump without the `source` the spec asks of every dump deserves (what made
    /// it is how a reader tells a bf16 port's dump from an f32 reference's).
    pub fn no_source(&self) -> Option<String> {
        (!self.metadata().contains_key("source")).then(|| {
            format!(
                "{}: no `source` in its metadata (the spec asks every dump for the tool, version, dtype and device \
                 that made it)",
                self.path.display()
            )
        })
    }

    pub fn metadata(&self) -> &std::collections::HashMap<String, String> {
        self.file.metadata()
    }

    /// A warning when the dump records a `config_sha256` other than `config_bytes`' (the
    /// checkpoint in `model_dir`): its decisions were made by another model, so comparing or
    /// auditing them with this one's routers is wrong, but not refused (a port may rewrite the
    /// config).
    pub fn other_config(&self, config_bytes: &[u8], model_dir: &Path) -> Option<String> {
        let sha = self.metadata().get("config_sha256")?;
        (!same_config(sha, &sha256_hex(config_bytes))).then(|| {
            format!("{} was made from a different config.json than {}", self.path.display(), model_dir.display())
        })
    }

    /// A warning when the dump's routers are not the `experts` of the checkpoint in `model_dir`:
    /// that checkpoint's routers cannot recompute its routing margins, which stay unknown.
    pub fn other_experts(&self, experts: usize, model_dir: &Path) -> Option<String> {
        let width = self.experts().filter(|&w| w != experts)?;
        Some(format!(
            "{}'s routers have {width} experts, {}'s {experts}: its routing margins are not recomputed",
            self.path.display(),
            model_dir.display()
        ))
    }

    /// A warning when both dumps record a `config_sha256` and they differ: two models' runs,
    /// compared as one's (a port may rewrite the config, so it is not refused).
    pub fn other_config_than(&self, other: &Dump) -> Option<String> {
        let (a, b) = (self.metadata().get("config_sha256")?, other.metadata().get("config_sha256")?);
        (!same_config(a, b)).then(|| {
            format!("{} and {} were made from different config.json files", self.path.display(), other.path.display())
        })
    }

    /// Tensors left unread (a tool's extra bool mask, or its tensor under a name glimpse uses for
    /// another): see `unread`.
    pub fn unread(&self) -> &[Unread] {
        &self.unread
    }

    /// An unread tensor's dtype, shape and raw little-endian bytes (what `diff` compares where
    /// both dumps hold it alike); None for a tensor read as values, or none of that name.
    pub fn unread_bytes(&self, name: &str) -> Option<(safetensors::Dtype, &[usize], &[u8])> {
        self.is_unread(name).then_some(())?;
        let (info, bytes) = self.file.bytes(name).ok()?;
        Some((info.dtype, &info.shape, bytes))
    }

    /// Whether `name` is one of [`Dump::unread`] (kept in name order at open: a binary search,
    /// as every name of a dump of many extras is looked up).
    fn is_unread(&self, name: &str) -> bool {
        self.unread.binary_search_by(|u| u.name.as_str().cmp(name)).is_ok()
    }

    /// [`Dump::unread`]'s list (or a report's copy of it) as JSON: `[{"name", "dtype", "why"}]`.
    pub fn unread_json(unread: &[Unread]) -> serde_json::Value {
        unread.iter().map(|u| serde_json::json!({"name": u.name, "dtype": u.dtype, "why": u.why})).collect()
    }

    /// Tensor names (but those [`Dump::unread`]), in forward order for hook points (the MTP
    /// layer's after `mtp.eh_proj`, which feeds it), then the rest alphabetically.
    pub fn names(&self) -> Vec<String> {
        let unread = |n: &&str| self.is_unread(n);
        let mut names: Vec<String> = self.file.names().filter(|n| !unread(n)).map(String::from).collect();
        let mtp = self.mtp_layer();
        // (Every other hook point sorts as the enum orders them, which is the forward order.)
        let rank = |p: HookPoint| match p {
            HookPoint::Layer(i, h) if Some(i) == mtp => (HookPoint::MtpEhProj, Some(h)),
            p => (p, None),
        };
        names.sort_by(|a, b| match (HookPoint::parse(a), HookPoint::parse(b)) {
            (Some(x), Some(y)) => rank(x).cmp(&rank(y)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.cmp(b),
        });
        names
    }

    /// The MTP decoder layer's index, where the dump records the head: its last layer, when that
    /// layer's positions are the head's (one fewer than the main model's).
    pub(crate) fn mtp_layer(&self) -> Option<usize> {
        let seq = |n: &str| self.info(n).and_then(|i| i.shape.get(1).copied());
        let head = seq(&HookPoint::MtpEhProj.name()).or_else(|| seq(&HookPoint::MtpInputHidden.name()))?;
        let last = self.file.names().filter_map(|n| HookPoint::parse(n)?.layer()).max()?;
        let hidden = [LayerHook::Output, LayerHook::InputNorm, LayerHook::AttnOut, LayerHook::MlpOut];
        let positions = |i: usize| hidden.iter().find_map(|&h| seq(&HookPoint::Layer(i, h).name()));
        (positions(last) == Some(head) && (last == 0 || positions(last - 1) != Some(head))).then_some(last)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.info(name).is_some()
    }

    /// A tensor's header entry, None for one [`Dump::unread`] lists (as if it were not there).
    fn info(&self, name: &str) -> Option<&safetensors::tensor::TensorInfo> {
        self.file.info(name).filter(|_| !self.is_unread(name))
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).map(|i| i.shape.clone())
    }

    /// The routed-expert count this dump records for the routing `selection` (a
    /// `….moe.topk_ids` name): the width of the router logits beside it.
    pub fn experts_of(&self, selection: &str) -> Option<usize> {
        let layer = selection.strip_suffix(".moe.topk_ids")?;
        self.shape(&format!("{layer}.moe.router_logits"))?.last().copied()
    }

    /// The routed-expert count of the first layer that records its routing and router logits.
    pub fn experts(&self) -> Option<usize> {
        self.names().iter().find_map(|n| self.experts_of(n))
    }

    pub fn values(&self, name: &str) -> Result<(Values, Vec<usize>)> {
        let shape = self.info(name).map(|i| i.shape.clone()).unwrap_or_default();
        Ok((self.read(name, None)?, shape))
    }

    /// Rows `[start, start + count)` of the tensor `name` (rows of its last dimension), as
    /// [`Dump::values`] reads them: a slice of an S x S `dsa.scores`, or of a selection, without
    /// reading the rest.
    pub fn rows(&self, name: &str, start: usize, count: usize) -> Result<Values> {
        self.read(name, Some((start, count)))
    }

    /// The tensor `name`, or its rows `(start, count)`.
    fn read(&self, name: &str, rows: Option<(usize, usize)>) -> Result<Values> {
        let info = self.info(name).ok_or_else(|| Error::dump(&self.path, format!("no tensor `{name}`")))?;
        // The reader's errors name the file already.
        let wrap = |e: Error| match e {
            Error::Checkpoint { msg, .. } => Error::dump(&self.path, msg),
            e => Error::dump(&self.path, e.to_string()),
        };
        // Else a float: `open` refused other dtypes.
        if st::INTS.contains(&info.dtype) {
            let v = match rows {
                Some((start, count)) => self.file.i64_rows(name, start, count),
                None => self.file.i64(name).map(|(v, _)| v),
            };
            return Ok(Values::I64(v.map_err(wrap)?));
        }
        let mut v = match rows {
            Some((start, count)) => self.file.f32_rows(name, start, count),
            None => self.file.f32(name).map(|(v, _)| v),
        }
        .map_err(wrap)?;
        unmask(name, &mut v);
        Ok(Values::F32(v))
    }

    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let dev = &candle_core::Device::Cpu;
        Ok(match self.values(name)? {
            (Values::F32(v), s) => Tensor::from_vec(v, s, dev)?,
            (Values::I64(v), s) => Tensor::from_vec(v, s, dev)?,
        })
    }

    /// A hidden state to start or isolate a layer from: a float tensor of shape `want`
    /// ([B, S, hidden] of the run it feeds).
    pub fn hidden(&self, name: &str, want: [usize; 3]) -> Result<Tensor> {
        let (Values::F32(v), shape) = self.values(name)? else {
            return Err(Error::dump(&self.path, format!("`{name}` must be a float tensor")));
        };
        if shape != want {
            return Err(Error::dump(
                &self.path,
                format!("`{name}` is {shape:?}; the run it feeds needs [batch, seq, hidden] = {want:?}"),
            ));
        }
        Ok(Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?)
    }

    /// A recorded DSA selection (`layers.{i}.dsa.topk`), to replay or start a window from, for a
    /// run of `batch` x `seq` tokens. Entries outside `0..=s` for query `s` are padding (the spec's
    /// past the query, and -1 as serving engines pad, as the comparison reads them); a row with no
    /// causal key (no top-k keeps none) is refused with its query.
    pub fn selection(&self, name: &str, batch: usize, seq: usize) -> Result<crate::model::indexer::Selection> {
        let (Values::I64(idx), shape) = self.values(name)? else {
            return Err(Error::dump(&self.path, format!("`{name}` must be an integer tensor")));
        };
        match shape[..] {
            // (No key a query, not even the first: every row keeps none.)
            [_, s, 0] if s > 0 => {
                Err(Error::dump(&self.path, format!("`{name}` is {shape:?}: it keeps no key for any query")))
            }
            [b, s, k] if (b, s) == (batch, seq) => {
                for (row, keys) in idx.chunks_exact(k.max(1)).enumerate() {
                    let (b, s) = (row / seq, row % seq);
                    if !keys.iter().any(|&j| (0..=s as i64).contains(&j)) {
                        let msg = format!("`{name}` keeps no causal key for query [{b}, {s}] (no top-k keeps none)");
                        return Err(Error::dump(&self.path, msg));
                    }
                }
                crate::model::indexer::Selection::from_i64(&idx, &shape)
                    .ok_or_else(|| Error::dump(&self.path, format!("`{name}` must be [B, S, K], got {shape:?}")))
            }
            _ => Err(Error::dump(
                &self.path,
                format!("`{name}` is {shape:?}; the run needs [batch, seq, K] with batch {batch}, seq {seq}"),
            )),
        }
    }

    /// [`Dump::tokens`], for a model of `vocab` tokens: an id past it is named with the dump.
    pub fn tokens_for(&self, vocab: usize) -> Result<Tokens> {
        let tokens = self.tokens()?;
        tokens.check_vocab(vocab).map_err(|e| Error::dump(&self.path, format!("`input_ids`: {e}")))?;
        Ok(tokens)
    }

    /// The batch rows and positions of the run, from a dump without `input_ids`: the largest
    /// `[B, S]` of its `[B, S, ...]` hook points (the MTP layer's hold one position fewer a row).
    pub fn positions(&self) -> Option<(usize, usize)> {
        let spread = ["embeddings", ".input_norm", ".output", ".dsa.topk", ".attn.out", "final_norm", "logits"];
        let of = |n: &String| match self.shape(n)?[..] {
            // (A width of 0 holds no data: its [B, S] would be the header's word alone.)
            [b, s, w] if b > 0 && s > 0 && w > 0 && spread.iter().any(|x| n.ends_with(x)) => Some((s, b)),
            _ => None,
        };
        self.names().iter().filter_map(of).max().map(|(s, b)| (b, s))
    }

    /// The run's batch rows: `input_ids`' first dimension, else that of its `[B, S, ...]` hook
    /// points ([`Dump::positions`]): where the routing's `[B*S, ...]` rows sit along the positions.
    pub fn batch(&self) -> Option<usize> {
        // (A `[S]` of another tool's is no batch of S rows.)
        let ids = self.shape("input_ids").and_then(|s| if let [b, _] = s[..] { Some(b) } else { None });
        ids.or_else(|| self.positions().map(|(b, _)| b))
    }

    /// The tokens the dump was produced from (`input_ids`, [B, S]).
    pub fn tokens(&self) -> Result<Tokens> {
        let (v, shape) = match self.values("input_ids")? {
            (Values::I64(v), s) => (v, s),
            _ => return Err(Error::dump(&self.path, "`input_ids` must be an integer tensor")),
        };
        let [b, s] = shape[..] else {
            return Err(Error::dump(&self.path, format!("`input_ids` must be [B, S], got {shape:?}")));
        };
        let ids = v
            .iter()
            .map(|&x| {
                u32::try_from(x).map_err(|_| Error::dump(&self.path, format!("`input_ids` holds invalid token id {x}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Tokens::new(b, s, ids).map_err(|e| Error::dump(&self.path, e.to_string()))
    }
}

/// Why a tensor under glimpse's extra hook point `h` (one outside the spec), of floats or
/// integers or neither, of `rank` dimensions, is not glimpse's: None where it is as glimpse
/// writes it.
fn foreign(h: HookPoint, (float, int): (bool, bool), rank: usize) -> Option<String> {
    use LayerHook::*;
    let (wants_float, wants_rank) = match h {
        HookPoint::Layer(_, BiasChanged) => (false, 1),
        HookPoint::Layer(_, RouterMargin) => (true, 1),
        HookPoint::Layer(_, RouterScores | RouterBiasedScores) => (true, 2),
        HookPoint::Layer(_, KvNormPre | KvNorm | KRopeNorm | DsaMargin) => (true, 2),
        _ => (true, 3),
    };
    let kind = if wants_float { "floats" } else { "integers" };
    let dims = if wants_rank == 1 { "1 dimension".to_string() } else { format!("{wants_rank} dimensions") };
    (!(float || int) || float != wants_float || rank != wants_rank)
        .then(|| format!("glimpse's own {} holds {kind} of {dims}: another tool's tensor under its name", h.name()))
}

/// The spec's index tensors: `input_ids` and the selections, `layers.{i}.dsa.topk` and
/// `layers.{i}.moe.topk_ids`.
pub fn is_index_tensor(name: &str) -> bool {
    name == "input_ids" || name.ends_with(".dsa.topk") || name.ends_with(".moe.topk_ids")
}

/// Scores at or below this (half of f32's lowest; torch's `finfo.min` of f32 and bf16 is below it)
/// are a mask.
const MASKED: f32 = f32::MIN / 2.0;

/// Indexer scores masked the way transformers masks attention (`finfo(dtype).min`, not `-inf`)
/// read as our `-inf`: the same mask, which would otherwise compare as a difference of 1e38.
fn unmask(name: &str, v: &mut [f32]) {
    if name.ends_with(".dsa.scores") {
        v.iter_mut().filter(|x| **x <= MASKED).for_each(|x| *x = f32::NEG_INFINITY);
    }
}

/// Where a file given as a dump holds a checkpoint's weights (`model.*` tensors), says so.
fn weights_hint(file: &StFile) -> &'static str {
    match file.names().any(|n| n.starts_with("model.") || n == "lm_head.weight") {
        true => {
            ": it holds a checkpoint's weights, not a dump (one `glimpse run --dump` or a reference generator writes)"
        }
        false => "",
    }
}

/// The header metadata a glimpse dump carries.
pub fn metadata(source: &str, config_bytes: Option<&[u8]>, model: Option<&str>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("format".into(), FORMAT.into());
    m.insert("source".into(), source.into());
    if let Some(bytes) = config_bytes {
        m.insert("config_sha256".into(), sha256_hex(bytes));
    }
    if let Some(model) = model {
        // The folder as it resolves, not as it was typed (`./flat/`, `golden/flat`): one run's
        // dump has the same bytes whatever the working directory.
        let resolved = std::fs::canonicalize(model).map(|p| p.display().to_string());
        m.insert("model".into(), resolved.unwrap_or_else(|_| model.into()));
    }
    m
}

/// Whether two `config_sha256` values name the same config.json (hex in either case).
pub fn same_config(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Lower-case hex sha256, as the spec's `config_sha256`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
