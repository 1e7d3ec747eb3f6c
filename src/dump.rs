//! Activation dumps in the `glm5-dump/1` format (`../shared/spec/dump-format.md`): one safetensors
//! file of named F32 activations and I64 selections. Reading goes through a memory map, so a large
//! reference dump is paged in tensor by tensor; writing is atomic (temporary file, then rename).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use safetensors::tensor::Dtype;

use crate::error::{Error, Result};
use crate::hooks::HookPoint;
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
