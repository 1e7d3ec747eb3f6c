//! Activation dumps in the `glm5-dump/1` format (`../shared/spec/dump-format.md`): one safetensors
//! file of named F32 activations and I64 selections. Reading goes through a memory map, so a large
//! reference dump is paged in tensor by tensor; writing is atomic (temporary file, then rename).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use safetensors::tensor::Dtype;

use crate::error::{Error, Result};
use crate::hooks::{HookPoint, Observer, Selector};
use crate::model::Tokens;
use crate::st::{self, Entry, StFile};

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
        let file = StFile::open(path).map_err(|e| Error::dump(path, e.to_string()))?;
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

/// Writes recorded tensors as a dump (atomically).
pub fn write(path: &Path, tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let entries = tensors
        .iter()
        .map(|(name, t)| {
            let shape = t.dims().to_vec();
            let entry = match t.dtype() {
                DType::I64 => Entry::i64(shape, &t.flatten_all()?.to_vec1::<i64>()?),
                _ => Entry::f32(shape, &t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            };
            Ok((name.clone(), entry))
        })
        .collect::<Result<Vec<_>>>()?;
    st::write(path, &entries, metadata)
}

/// Lower-case hex sha256, as the spec's `config_sha256`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// An observer that streams the selected hook points of a run into a dump. Each tensor goes to a
/// spill file as it arrives (memory stays at one tensor, however long the run); `finish` writes
/// the safetensors file beside the target and renames it into place, so the target name never
/// holds a partial dump and an interrupted run leaves any earlier file there intact.
pub struct DumpWriter {
    path: PathBuf,
    spill_path: PathBuf,
    spill: Option<BufWriter<File>>,
    selector: Selector,
    entries: Vec<(String, Dtype, Vec<usize>)>,
}

impl DumpWriter {
    pub fn create(path: &Path, selector: Selector) -> Result<Self> {
        let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(format!(".{}.spill", std::process::id()));
        let spill_path = path.with_file_name(name);
        let file = File::create(&spill_path).map_err(|e| Error::io(&spill_path, e))?;
        Ok(DumpWriter {
            path: path.to_path_buf(),
            spill_path,
            spill: Some(BufWriter::with_capacity(1 << 20, file)),
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

    /// Writes the dump under its name and removes the spill file.
    pub fn finish(mut self, metadata: &BTreeMap<String, String>) -> Result<usize> {
        let spill = self.spill.take().ok_or_else(|| Error::dump(&self.path, "already finished"))?;
        spill.into_inner().map_err(|e| Error::io(&self.spill_path, e.into_error()))?;
        let mut reader =
            std::io::BufReader::new(File::open(&self.spill_path).map_err(|e| Error::io(&self.spill_path, e))?);
        let spill_path = self.spill_path.clone();
        st::write_streaming(&self.path, &self.entries, metadata, |i, w| {
            let (_, dtype, shape) = &self.entries[i];
            let len = (shape.iter().product::<usize>() * dtype.bitsize() / 8) as u64;
            std::io::copy(&mut (&mut reader).take(len), w).map_err(|e| Error::io(&spill_path, e))?;
            Ok(())
        })?;
        Ok(self.entries.len())
    }
}

impl Drop for DumpWriter {
    fn drop(&mut self) {
        self.spill.take();
        let _ = std::fs::remove_file(&self.spill_path);
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
        let spill = self.spill.as_mut().ok_or_else(|| Error::dump(&self.path, "already finished"))?;
        let (dtype, bytes): (Dtype, Vec<u8>) = match value.dtype() {
            DType::I64 => {
                (Dtype::I64, value.flatten_all()?.to_vec1::<i64>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            _ => (
                Dtype::F32,
                value
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
        };
        spill.write_all(&bytes).map_err(|e| Error::io(&self.spill_path, e))?;
        self.entries.push((name, dtype, value.dims().to_vec()));
        Ok(())
    }
}
