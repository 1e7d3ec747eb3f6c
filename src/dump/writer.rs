//! Writing dumps: [`DumpWriter`] streams a run's selected hook points into a `glm5-dump/1` file
//! from a thread of its own, checkpoints a whole run after every layer so `--resume` can finish
//! it, and renames the file into place only when it is complete.

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
    /// Refuses when another process holds the lock on `path`'s resume files (it writes the dump
    /// now). Creates nothing: a writer holds its lock file while it runs, so without one nobody
    /// is writing, and a probe that created it would leave it behind.
    fn probe(path: &Path) -> Result<()> {
        let lock_path = crate::output::sibling(path, ".resume.lock");
        let file = match std::fs::OpenOptions::new().write(true).open(&lock_path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&lock_path, e)),
        };
        // (The lock, when taken, goes with the File, closed on return.)
        lock(&file, path, &lock_path)
    }

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
            lock(&file, path, &lock_path)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
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

/// Refuses to start over an interrupted run of the dump `path` (its partial file and state).
fn refuse_interrupted(path: &Path) -> Result<()> {
    let (partial, state_path, hidden) = resume_paths(path);
    if state_path.is_file() && partial.is_file() {
        // Its hidden state too, once a layer wrote one: it is the interrupted run's.
        let rest = match hidden.is_file() {
            true => format!(", {} and {}", state_path.display(), hidden.display()),
            false => format!(" and {}", state_path.display()),
        };
        return Err(Error::Usage(format!(
            "{} keeps an interrupted run of this dump: --resume finishes it (same tokens, config and --record); \
             to start over, delete it{rest}",
            partial.display(),
        )));
    }
    Ok(())
}

/// Takes the exclusive lock on `file` (the dump `path`'s `lock_path`) without waiting: refused
/// while another writer of the dump holds it. (Elsewhere than Unix, nothing to take.)
fn lock(file: &File, path: &Path, lock_path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor the File owns; LOCK_NB never blocks.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::io(lock_path, e));
            }
            return Err(Error::Usage(format!(
                "{}: another glimpse is writing this dump now (its {} is locked): wait for it, or write another",
                path.display(),
                lock_path.display()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = (file, path, lock_path);
    Ok(())
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
        let path = &crate::output::landing(path);
        // Not `output::tmp_sibling`: the header-overflow fallback writes that one while reading this.
        let tmp_path = crate::output::own_sibling(path, "partial");
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
        let path = &crate::output::landing(path);
        let lock = ResumeLock::take(path)?;
        let (partial, state_path, hidden_path) = resume_paths(path);
        refuse_interrupted(path)?;
        let mut w = DumpWriter::create_at(path, partial, selector, expected)?;
        let (tokens, config_sha256) = (tokens.clone(), config_sha256.into());
        w.resume = Some(Resume { state_path, hidden_path, tokens, config_sha256, lock });
        Ok(w)
    }

    /// Refuses to start a resumable run to `path` over an interrupted one, which may hold hours of
    /// layers: `--resume` finishes it, or the user deletes it (called before the model loads too).
    /// A run writing it now is named as such, not as an interrupted one (whose files the message
    /// says to delete).
    pub fn refuse_overwrite(path: &Path) -> Result<()> {
        let path = &crate::output::landing(path);
        ResumeLock::probe(path)?;
        refuse_interrupted(path)
    }

    /// Reopens what a killed resumable run left for the same tokens and config: the writer, the
    /// state the next layer starts from, and that layer. None when there is nothing to resume.
    pub fn resume(
        path: &Path,
        selector: Selector,
        tokens: &Tokens,
        config_sha256: &str,
    ) -> Result<Option<(Self, crate::model::stream::Start, usize)>> {
        let path = &crate::output::landing(path);
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
        // (A failed finish leaves no stray file: `drop` removes it, but a resumable run's
        // `.partial`, which keeps the run.)
        self.write_header_and_rename(metadata)
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
        }
        // Also after a write that failed (a full disk), which joined the writer already; after
        // the rename there is nothing left under the (process-unique) temporary name.
        if self.resume.is_none() {
            let _ = std::fs::remove_file(&self.tmp_path);
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
