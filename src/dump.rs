//! Activation dumps in the `glm5-dump/1` format (`../shared/spec/dump-format.md`): one safetensors
//! file of named F32 activations and I64 selections. Reading goes through a memory map, so a large
//! reference dump is paged in tensor by tensor; writing is atomic (temporary file, then rename).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::{CpuStorage, DType, Storage, Tensor};
use safetensors::tensor::Dtype;

use crate::error::{Error, Result};
use crate::hooks::{HookPoint, Observer, Selector};
use crate::model::Tokens;
use crate::st::{self, StFile};

pub const FORMAT: &str = "glm5-dump/1";

pub struct Dump {
    pub path: PathBuf,
    file: StFile,
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
            Some(other) => return Err(Error::dump(path, format!("format is \"{other}\", expected \"{FORMAT}\""))),
            None => {
                return Err(Error::dump(path, format!("no `format` in the header metadata (expected \"{FORMAT}\")")))
            }
        }
        // Refused at open, not when a command reaches the tensor (after its header was printed).
        let odd = |n: &str| file.info(n).filter(|i| !st::FLOATS.contains(&i.dtype) && !st::INTS.contains(&i.dtype));
        if let Some((name, info)) = file.names().find_map(|n| Some((n, odd(n)?))) {
            return Err(Error::dump(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}: a dump holds floats ({}) and integers ({})",
                    info.dtype,
                    st::listed(&st::FLOATS),
                    st::listed(&st::INTS)
                ),
            ));
        }
        // The spec's index tensors are integers: a float `dsa.topk` would be compared element by
        // element, order and padding counting, where the spec compares sets.
        let float_index = |n: &str| file.info(n).filter(|i| is_index_tensor(n) && st::FLOATS.contains(&i.dtype));
        if let Some((name, info)) = file.names().find_map(|n| Some((n, float_index(n)?))) {
            return Err(Error::dump(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}: the spec stores token ids and selections as integers (I64)",
                    info.dtype
                ),
            ));
        }
        Ok(Dump { path: path.to_path_buf(), file })
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
        (*sha != sha256_hex(config_bytes)).then(|| {
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
        (a != b).then(|| {
            format!("{} and {} were made from different config.json files", self.path.display(), other.path.display())
        })
    }

    /// Tensor names, in forward order for hook points, then the rest alphabetically.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.file.names().map(String::from).collect();
        names.sort_by(|a, b| match (HookPoint::parse(a), HookPoint::parse(b)) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.cmp(b),
        });
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.file.info(name).is_some()
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.file.info(name).map(|i| i.shape.clone())
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
        let shape = self.file.info(name).map(|i| i.shape.clone()).unwrap_or_default();
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
        let info = self.file.info(name).ok_or_else(|| Error::dump(&self.path, format!("no tensor `{name}`")))?;
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
    /// run of `batch` x `seq` tokens.
    pub fn selection(&self, name: &str, batch: usize, seq: usize) -> Result<crate::model::indexer::Selection> {
        let (Values::I64(idx), shape) = self.values(name)? else {
            return Err(Error::dump(&self.path, format!("`{name}` must be an integer tensor")));
        };
        match shape[..] {
            [b, s, _] if (b, s) == (batch, seq) => Ok(crate::model::indexer::Selection::from_i64(&idx, &shape)
                .ok_or_else(|| Error::dump(&self.path, format!("`{name}` must be [B, S, K], got {shape:?}")))?),
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

/// Lower-case hex sha256, as the spec's `config_sha256`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// An observer that streams the selected hook points of a run into a dump. Each tensor is handed
/// to a writer thread as it arrives, which appends it to the data section of a temporary file
/// after a header region reserved up front, while the forward pass goes on; at most
/// [`SPILL_QUEUE`] tensors wait, so memory stays bounded however long the run. `finish` writes the
/// header into its region and renames the file into place, so the target name never holds a
/// partial dump and an interrupted run leaves any earlier file there intact. A header that
/// outgrows its reservation is handled by copying the data once into a fresh file.
pub struct DumpWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    spill: Option<Spill>,
    reserve: usize,
    selector: Selector,
    entries: Vec<(String, Dtype, Vec<usize>)>,
    resume: Option<Resume>,
}

/// The writer thread and the queue that feeds it.
struct Spill {
    queue: std::sync::mpsc::SyncSender<Job>,
    thread: std::thread::JoinHandle<Result<File>>,
}

enum Job {
    Write(Tensor),
    /// Flush and fsync everything queued so far, then acknowledge.
    Sync(std::sync::mpsc::SyncSender<()>),
}

/// What a killed run leaves to resume from, beside the partial dump: the state (what the data
/// section holds, after which layer) and the hidden state the next layer starts from.
struct Resume {
    state_path: PathBuf,
    hidden_path: PathBuf,
    tokens: Tokens,
    config_sha256: String,
    /// `OUT.resume.lock`, held (`flock`) while this run owns the names above: a second run to
    /// the same dump would truncate the first's partial file under it.
    lock: ResumeLock,
}

/// The lock on a dump's resume files: taken before any of them is touched, released by the
/// kernel when the process ends however it ends (the file stays until the dump is finished).
struct ResumeLock {
    path: PathBuf,
    _held: File,
}

impl ResumeLock {
    fn take(path: &Path) -> Result<ResumeLock> {
        let lock_path = crate::output::sibling(path, ".resume.lock");
        // A run that finishes removes the file while it holds the lock: one opened just before
        // is then no longer the file at the path, and is opened again.
        for _ in 0..8 {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| Error::io(&lock_path, e))?;
            #[cfg(unix)]
            {
                use std::os::fd::AsRawFd;
                use std::os::unix::fs::MetadataExt;
                // SAFETY: flock on a descriptor this File owns; LOCK_NB never blocks.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                        return Err(Error::io(&lock_path, e));
                    }
                    return Err(Error::Usage(format!(
                        "{}: another glimpse is writing this dump now (its {} is locked): wait for it, or write another",
                        path.display(),
                        lock_path.display()
                    )));
                }
                let held = file.metadata().map_err(|e| Error::io(&lock_path, e))?;
                let current = std::fs::metadata(&lock_path).ok();
                if current.is_none_or(|m| (m.dev(), m.ino()) != (held.dev(), held.ino())) {
                    continue;
                }
            }
            return Ok(ResumeLock { path: lock_path, _held: file });
        }
        Err(Error::Usage(format!("{}: its lock file keeps being replaced", lock_path.display())))
    }
}

/// The metadata key of the hidden state's file that holds the state it belongs to.
const PAIRED_STATE: &str = "resume_state";

/// What a resumable run records, as its state holds it: a resumed run must record the same.
fn selection_json(selector: &Selector) -> serde_json::Value {
    serde_json::json!({
        "patterns": selector.patterns,
        "layers": selector.layers.as_ref().map(|r| [*r.start(), *r.end()]),
    })
}

/// `OUT.partial` (the data written so far), `OUT.resume.json` and `OUT.resume.hidden` beside a
/// dump `OUT`.
fn resume_paths(path: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let with = |suffix| crate::output::sibling(path, suffix);
    (with(".partial"), with(".resume.json"), with(".resume.hidden"))
}

impl Spill {
    /// A writer thread appending to `file`; `header` reserves the header region first.
    fn start(file: File, path: &Path, header: Option<usize>) -> Spill {
        let (queue, jobs) = std::sync::mpsc::sync_channel::<Job>(SPILL_QUEUE);
        let path = path.to_path_buf();
        let thread = std::thread::spawn(move || -> Result<File> {
            let io = |e| Error::io(&path, e);
            let mut w = BufWriter::with_capacity(1 << 20, file);
            if let Some(reserve) = header {
                w.write_all(&vec![b' '; 8 + reserve]).map_err(io)?;
            }
            let mut unsent = 0;
            for job in jobs {
                match job {
                    Job::Write(t) => {
                        write_tensor(&mut w, &t, &path)?;
                        unsent += t.elem_count() * t.dtype().size_in_bytes();
                        if unsent >= WRITEBACK_BYTES {
                            w.flush().map_err(io)?;
                            start_writeback(w.get_ref());
                            unsent = 0;
                        }
                    }
                    Job::Sync(ack) => {
                        w.flush().map_err(io)?;
                        w.get_ref().sync_data().map_err(io)?;
                        unsent = 0;
                        let _ = ack.send(());
                    }
                }
            }
            w.into_inner().map_err(|e| io(e.into_error()))
        });
        Spill { queue, thread }
    }
}

/// How much the writer hands the page cache before asking the kernel to start writing it out.
const WRITEBACK_BYTES: usize = 8 << 20;

/// Starts writing `file`'s dirty pages to disk without waiting (Linux's `sync_file_range`), so the
/// `fsync` that makes the finished dump durable waits only for the last few MB, not the whole file.
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; offset 0 and length 0 mean the whole file.
        let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// The hidden state (and selection) a resumed run starts from.
fn read_hidden(path: &Path) -> Result<crate::model::stream::Start> {
    let f = StFile::open(path)?;
    let (h, shape) = f.f32("hidden")?;
    let hidden = Tensor::from_vec(h, shape, &candle_core::Device::Cpu)?;
    let selection = match f.info("selection") {
        Some(_) => {
            let (idx, shape) = f.i64("selection")?;
            let sel = crate::model::indexer::Selection::from_i64(&idx, &shape);
            Some(sel.ok_or_else(|| Error::dump(path, "bad selection shape"))?)
        }
        None => None,
    };
    Ok(crate::model::stream::Start { hidden, selection })
}

/// Tensors that may wait for the writer thread.
pub const SPILL_QUEUE: usize = 16;

/// Header bytes reserved per expected tensor: a name, dtype, 3-D shape and two offsets.
pub const HEADER_BYTES_PER_TENSOR: usize = 192;

impl DumpWriter {
    /// `expected` is how many tensors the run may report (sizes the header reservation).
    pub fn create(path: &Path, selector: Selector, expected: usize) -> Result<Self> {
        // Not `output::tmp_sibling`: the header-overflow fallback writes that one while reading this.
        let tmp_path = crate::output::sibling(path, &format!(".{}.partial", std::process::id()));
        DumpWriter::create_at(path, tmp_path, selector, expected)
    }

    /// `create`, writing to `tmp_path` until the dump is finished.
    fn create_at(path: &Path, tmp_path: PathBuf, selector: Selector, expected: usize) -> Result<Self> {
        crate::output::sweep_leftovers(path);
        let reserve = (1024 + expected * HEADER_BYTES_PER_TENSOR).next_multiple_of(8);
        let file = File::create(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
        let spill = Spill::start(file, &tmp_path, Some(reserve));
        Ok(DumpWriter {
            path: path.to_path_buf(),
            tmp_path,
            spill: Some(spill),
            reserve,
            selector,
            entries: Vec::new(),
            resume: None,
        })
    }

    /// Like `create`, but the run can be resumed after a kill: after every layer the data is
    /// made durable and `OUT.resume.json` / `OUT.resume.hidden` record where it stands. The data
    /// goes to the stable `OUT.partial` a later run can find (and the errors name).
    pub fn create_resumable(
        path: &Path,
        selector: Selector,
        expected: usize,
        tokens: &Tokens,
        config_sha256: &str,
    ) -> Result<Self> {
        let lock = ResumeLock::take(path)?;
        let (partial, state_path, hidden_path) = resume_paths(path);
        let mut w = DumpWriter::create_at(path, partial, selector, expected)?;
        let (tokens, config_sha256) = (tokens.clone(), config_sha256.into());
        w.resume = Some(Resume { state_path, hidden_path, tokens, config_sha256, lock });
        Ok(w)
    }

    /// Reopens what a killed resumable run left for the same tokens and config: the writer, the
    /// state the next layer starts from, and that layer. None when there is nothing to resume.
    pub fn resume(
        path: &Path,
        selector: Selector,
        tokens: &Tokens,
        config_sha256: &str,
    ) -> Result<Option<(Self, crate::model::stream::Start, usize)>> {
        let lock = ResumeLock::take(path)?;
        let (partial, state_path, hidden_path) = resume_paths(path);
        if !state_path.is_file() || !partial.is_file() {
            return Ok(None);
        }
        let bad = |msg: &str| Error::dump(&state_path, format!("{msg}; delete it to start over"));
        // The hidden state's file carries the state it belongs to (one atomic rename wrote both);
        // the JSON beside it is a readable copy, the only copy in files of older versions.
        let paired = StFile::open(&hidden_path).ok().and_then(|f| f.metadata().get(PAIRED_STATE).cloned());
        let text = match paired {
            Some(text) => text.into_bytes(),
            None => std::fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?,
        };
        let state: serde_json::Value = serde_json::from_slice(&text).map_err(|_| bad("not a resume state"))?;
        let ids: Vec<u32> = serde_json::from_value(state["tokens"].clone()).map_err(|_| bad("no tokens"))?;
        let (batch, seq) = (state["batch"].as_u64().unwrap_or(0) as usize, state["seq"].as_u64().unwrap_or(0) as usize);
        if ids != tokens.ids || (batch, seq) != (tokens.batch, tokens.seq) {
            return Err(bad("it was written for other tokens"));
        }
        if state["config_sha256"].as_str() != Some(config_sha256) {
            return Err(bad("it was written for another config.json"));
        }
        // (A state written before the selection was recorded in it has no `record`.)
        if !state["record"].is_null() && state["record"] != selection_json(&selector) {
            return Err(bad("it was written recording other hook points (--record)"));
        }
        let entries: Vec<(String, Dtype, Vec<usize>)> =
            serde_json::from_value(state["entries"].clone()).map_err(|_| bad("no entries"))?;
        let reserve = state["reserve"].as_u64().ok_or_else(|| bad("no reserve"))?;
        let layer = state["layer"].as_u64().and_then(|l| usize::try_from(l).ok()).ok_or_else(|| bad("no layer"))?;
        let bytes = |(_, d, s): &(String, Dtype, Vec<usize>)| {
            s.iter().try_fold(d.bitsize() as u64 / 8, |n, &x| n.checked_mul(x as u64))
        };
        let mut sizes = [Some(8), Some(reserve)].into_iter().chain(entries.iter().map(bytes));
        let end = sizes.try_fold(0u64, |n, b| n.checked_add(b?)).ok_or_else(|| bad("its sizes overflow"))?;
        let reserve = usize::try_from(reserve).map_err(|_| bad("its header reservation is too large"))?;
        let file = std::fs::OpenOptions::new().write(true).open(&partial).map_err(|e| Error::io(&partial, e))?;
        // The layers recorded must all be there: a shorter file lost some (it was truncated, or
        // its disk filled) and would resume into a dump of zeros.
        let len = file.metadata().map_err(|e| Error::io(&partial, e))?.len();
        if len < end {
            return Err(Error::dump(
                &partial,
                format!("holds {len} bytes, short of the {end} its recorded layers need; delete it to start over"),
            ));
        }
        // Anything written after the last checkpoint is dropped and written again.
        file.set_len(end).map_err(|e| Error::io(&partial, e))?;
        let mut file = file;
        file.seek(SeekFrom::End(0)).map_err(|e| Error::io(&partial, e))?;
        let start = read_hidden(&hidden_path)?;
        let spill = Spill::start(file, &partial, None);
        let (tokens, config_sha256) = (tokens.clone(), config_sha256.into());
        let resume = Resume { state_path, hidden_path, tokens, config_sha256, lock };
        let w = DumpWriter {
            path: path.to_path_buf(),
            tmp_path: partial,
            spill: Some(spill),
            reserve,
            selector,
            entries,
            resume: Some(resume),
        };
        Ok(Some((w, start, layer.saturating_add(1))))
    }

    /// Whether this writer checkpoints after every layer (`create_resumable`, `resume`), so a
    /// stopped run can be resumed.
    pub fn resumable(&self) -> bool {
        self.resume.is_some()
    }

    /// Makes everything queued durable, then records the state after `layer`; then, when Ctrl-C
    /// asked for it, stops the run (`Error::Interrupted`).
    fn checkpoint(
        &mut self,
        layer: usize,
        hidden: &Tensor,
        selection: Option<&crate::model::indexer::Selection>,
    ) -> Result<()> {
        let Some(r) = &self.resume else { return Ok(()) };
        let spill = self.spill.as_ref().ok_or_else(|| Error::dump(&self.path, "already finished"))?;
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        if spill.queue.send(Job::Sync(ack)).is_err() || done.recv().is_err() {
            return Err(self.join().err().unwrap_or_else(|| Error::dump(&self.path, "the dump writer stopped")));
        }
        let state = serde_json::json!({
            "layer": layer, "reserve": self.reserve, "entries": self.entries,
            "tokens": r.tokens.ids, "batch": r.tokens.batch, "seq": r.tokens.seq, "config_sha256": r.config_sha256,
            "record": selection_json(&self.selector),
        });
        let mut hidden_tensors = vec![(
            "hidden".to_string(),
            st::Entry::f32(hidden.dims().to_vec(), &hidden.flatten_all()?.to_vec1::<f32>()?),
        )];
        if let Some(sel) = selection {
            let idx: Vec<i64> = sel.idx.iter().map(|&i| i as i64).collect();
            hidden_tensors.push(("selection".into(), st::Entry::i64(vec![sel.batch, sel.seq, sel.k], &idx)));
        }
        // The state goes into the hidden state's file too: a kill between the two renames below
        // must not pair layer L's hidden state with layer L - 1's state (L would run twice).
        let state = state.to_string();
        st::write(&r.hidden_path, &hidden_tensors, &BTreeMap::from([(PAIRED_STATE.to_string(), state.clone())]))?;
        let tmp = r.state_path.with_extension("json.tmp");
        std::fs::write(&tmp, state).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &r.state_path).map_err(|e| Error::io(&r.state_path, e))?;
        if crate::interrupt::requested() {
            return Err(self.interrupted(layer));
        }
        Ok(())
    }

    /// The error of a run stopped by Ctrl-C after `layer`'s checkpoint.
    pub fn interrupted(&self, layer: usize) -> Error {
        Error::Interrupted(format!(
            "interrupted after layer {layer}: {} keeps the run; the same command with --resume continues it",
            self.tmp_path.display()
        ))
    }

    /// Waits for the writer thread; its error, if it failed.
    fn join(&mut self) -> Result<File> {
        let spill = self.spill.take().ok_or_else(|| Error::dump(&self.path, "already finished"))?;
        drop(spill.queue);
        spill.thread.join().unwrap_or_else(|_| Err(Error::dump(&self.path, "the dump writer thread failed")))
    }

    /// Writes the header, makes the file durable and renames it to the target. Returns the
    /// number of tensors written.
    pub fn finish(mut self, metadata: &BTreeMap<String, String>) -> Result<usize> {
        let result = self.write_header_and_rename(metadata);
        // A failed finish leaves no stray file, unless a resumable run can still be resumed.
        if result.is_err() && self.resume.is_none() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
        result
    }

    fn write_header_and_rename(&mut self, metadata: &BTreeMap<String, String>) -> Result<usize> {
        let tmp = self.tmp_path.clone();
        let io = |e| Error::io(&tmp, e);
        let mut file = self.join()?;
        let (mut header, sizes) = st::header_bytes(&self.path, &self.entries, metadata)?;
        if header.len() <= self.reserve {
            // Trailing spaces are valid JSON whitespace: the header fills its reservation exactly.
            header.resize(self.reserve, b' ');
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            file.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
            file.write_all(&header).map_err(io)?;
            file.sync_all().map_err(io)?;
            drop(file);
            std::fs::rename(&tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        } else {
            let mut reader = File::open(&tmp).map_err(io)?;
            reader.seek(SeekFrom::Start(8 + self.reserve as u64)).map_err(io)?;
            let mut buf = vec![0u8; 1 << 20];
            st::write_streaming(&self.path, &self.entries, metadata, |i, w| {
                let mut left = sizes[i];
                while left > 0 {
                    let chunk = &mut buf[..left.min(1 << 20)];
                    reader.read_exact(chunk).map_err(io)?;
                    w.write_all(chunk).map_err(io)?;
                    left -= chunk.len();
                }
                Ok(())
            })?;
            let _ = std::fs::remove_file(&tmp);
        }
        if let Some(r) = &self.resume {
            let _ = std::fs::remove_file(&r.state_path);
            let _ = std::fs::remove_file(&r.hidden_path);
            let _ = std::fs::remove_file(&r.lock.path);
        }
        Ok(self.entries.len())
    }
}

impl Drop for DumpWriter {
    /// An unfinished dump is removed, unless it can be resumed.
    fn drop(&mut self) {
        if self.spill.is_some() {
            let _ = self.join();
            if self.resume.is_none() {
                let _ = std::fs::remove_file(&self.tmp_path);
            }
        }
    }
}

/// A tensor as a dump records it: i64 and f32 as they are, any other float as f32.
pub(crate) fn as_recorded(t: &Tensor) -> Result<(Tensor, Dtype)> {
    Ok(match t.dtype() {
        DType::I64 => (t.clone(), Dtype::I64),
        DType::F32 => (t.clone(), Dtype::F32),
        _ => (t.to_dtype(DType::F32)?, Dtype::F32),
    })
}

/// Appends a CPU f32 or i64 tensor's bytes, straight from its storage (no copy, no fresh pages),
/// to `w`, the file at `path` (named by its errors).
pub(crate) fn write_tensor(w: &mut impl Write, t: &Tensor, path: &Path) -> Result<()> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let range = layout.start_offset()..layout.start_offset() + t.elem_count();
    let io = |e| Error::io(path, e);
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => w.write_all(&f32_bytes(&v[range])).map_err(io),
        Storage::Cpu(CpuStorage::I64(v)) => w.write_all(&st::le_bytes_i64(&v[range])).map_err(io),
        _ => Err(Error::Usage("only CPU f32 and i64 tensors can be recorded".into())),
    }
}

impl Observer for DumpWriter {
    fn layer_done(
        &mut self,
        layer: usize,
        hidden: &Tensor,
        selection: Option<&crate::model::indexer::Selection>,
    ) -> Result<()> {
        self.checkpoint(layer, hidden, selection)
    }
    /// `input_ids` always: a dump without its input cannot be replayed or verified.
    fn wants(&self, point: HookPoint) -> bool {
        point == HookPoint::InputIds || self.selector.wants(point)
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        let name = point.name();
        if self.entries.iter().any(|(n, _, _)| *n == name) {
            return Err(Error::dump(&self.path, format!("`{name}` reported twice")));
        }
        let (t, dtype) = as_recorded(value)?;
        let spill = self.spill.as_ref().ok_or_else(|| Error::dump(&self.path, "already finished"))?;
        if spill.queue.send(Job::Write(t)).is_err() {
            // The writer thread stopped: report why.
            return Err(self.join().err().unwrap_or_else(|| Error::dump(&self.path, "the dump writer stopped")));
        }
        self.entries.push((name, dtype, value.dims().to_vec()));
        Ok(())
    }
}

/// The little-endian bytes of f32 values: on little-endian machines the values themselves, with no
/// conversion pass (recording sits on the forward pass's hot path).
#[cfg(target_endian = "little")]
fn f32_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    // SAFETY: any f32 is 4 initialised bytes, u8 has alignment 1, and the length covers exactly
    // the same memory.
    std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) })
}

#[cfg(not(target_endian = "little"))]
fn f32_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    std::borrow::Cow::Owned(st::le_bytes_f32(v))
}
