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
        Ok(Dump { path: path.to_path_buf(), file })
    }

    pub fn metadata(&self) -> &std::collections::HashMap<String, String> {
        self.file.metadata()
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

    pub fn values(&self, name: &str) -> Result<(Values, Vec<usize>)> {
        let info = self.file.info(name).ok_or_else(|| Error::dump(&self.path, format!("no tensor `{name}`")))?;
        let is_int = matches!(info.dtype, Dtype::I64 | Dtype::I32 | Dtype::U32);
        let wrap = |e: Error| Error::dump(&self.path, e.to_string());
        if is_int {
            let (v, s) = self.file.i64(name).map_err(wrap)?;
            Ok((Values::I64(v), s))
        } else {
            let (v, s) = self.file.f32(name).map_err(wrap)?;
            Ok((Values::F32(v), s))
        }
    }

    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let dev = &candle_core::Device::Cpu;
        Ok(match self.values(name)? {
            (Values::F32(v), s) => Tensor::from_vec(v, s, dev)?,
            (Values::I64(v), s) => Tensor::from_vec(v, s, dev)?,
        })
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

/// The header metadata a glimpse dump carries.
pub fn metadata(source: &str, config_bytes: Option<&[u8]>, model: Option<&str>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("format".into(), FORMAT.into());
    m.insert("source".into(), source.into());
    if let Some(bytes) = config_bytes {
        m.insert("config_sha256".into(), sha256_hex(bytes));
    }
    if let Some(model) = model {
        m.insert("model".into(), model.into());
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
}

/// The writer thread and the queue that feeds it.
struct Spill {
    queue: std::sync::mpsc::SyncSender<Tensor>,
    thread: std::thread::JoinHandle<Result<File>>,
}

/// Tensors that may wait for the writer thread.
pub const SPILL_QUEUE: usize = 16;

/// Header bytes reserved per expected tensor: a name, dtype, 3-D shape and two offsets.
pub const HEADER_BYTES_PER_TENSOR: usize = 192;

impl DumpWriter {
    /// `expected` is how many tensors the run may report (sizes the header reservation).
    pub fn create(path: &Path, selector: Selector, expected: usize) -> Result<Self> {
        // Not `st::tmp_path`: the header-overflow fallback writes that one while reading this.
        let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(format!(".{}.partial", std::process::id()));
        let tmp_path = path.with_file_name(name);
        let file = File::create(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
        let reserve = (1024 + expected * HEADER_BYTES_PER_TENSOR).next_multiple_of(8);
        let (queue, tensors) = std::sync::mpsc::sync_channel::<Tensor>(SPILL_QUEUE);
        let spill_path = tmp_path.clone();
        let thread = std::thread::spawn(move || -> Result<File> {
            let io = |e| Error::io(&spill_path, e);
            let mut w = BufWriter::with_capacity(1 << 20, file);
            w.write_all(&vec![b' '; 8 + reserve]).map_err(io)?;
            for t in tensors {
                write_tensor(&mut w, &t).map_err(|e| match e {
                    Error::Io { source, .. } => io(source),
                    e => e,
                })?;
            }
            w.into_inner().map_err(|e| io(e.into_error()))
        });
        Ok(DumpWriter {
            path: path.to_path_buf(),
            tmp_path,
            spill: Some(Spill { queue, thread }),
            reserve,
            selector,
            entries: Vec::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
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
        Ok(self.entries.len())
    }
}

impl Drop for DumpWriter {
    fn drop(&mut self) {
        if self.spill.is_some() {
            let _ = self.join();
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Appends a CPU f32 or i64 tensor's bytes, straight from its storage (no copy, no fresh pages).
fn write_tensor(w: &mut impl Write, t: &Tensor) -> Result<()> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let range = layout.start_offset()..layout.start_offset() + t.elem_count();
    let io = |e| Error::io("<dump>", e);
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => w.write_all(&f32_bytes(&v[range])).map_err(io),
        Storage::Cpu(CpuStorage::I64(v)) => w.write_all(&st::le_bytes_i64(&v[range])).map_err(io),
        _ => Err(Error::Usage("only CPU f32 and i64 tensors can be recorded".into())),
    }
}

impl Observer for DumpWriter {
    /// `input_ids` always: a dump without its input cannot be replayed or verified.
    fn wants(&self, point: HookPoint) -> bool {
        point == HookPoint::InputIds || self.selector.wants(point)
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        let name = point.name();
        if self.entries.iter().any(|(n, _, _)| *n == name) {
            return Err(Error::dump(&self.path, format!("`{name}` reported twice")));
        }
        let (t, dtype) = match value.dtype() {
            DType::I64 => (value.clone(), Dtype::I64),
            DType::F32 => (value.clone(), Dtype::F32),
            _ => (value.to_dtype(DType::F32)?, Dtype::F32),
        };
        let spill = self.spill.as_ref().ok_or_else(|| Error::dump(&self.path, "already finished"))?;
        if spill.queue.send(t).is_err() {
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
