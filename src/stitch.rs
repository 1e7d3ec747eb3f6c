//! Laying decode steps end to end. Each decode call reports its hooks for the few positions it
//! ran; [`Stitcher`] keeps them and joins them along the sequence, so a decode run's record has
//! the names and shapes of a prefill's (`docs/spec/dump-format.md`) and can be compared with
//! one, written as a dump, or diffed against a reference. A long generation's parts go to a file
//! beside the dump as they come ([`Stitcher::spilling`]) and are joined one hook point at a time,
//! so its memory does not grow with the generation; its disk use peaks at about twice the dump's
//! size, the parts and the dump being written from them.
//!
//! Two kinds of tensor grow with the cache, not the chunk: `dsa.topk` (K = min(index_topk, T))
//! and `dsa.scores` (T keys). Early calls are padded to the final width the way a prefill pads
//! them: `dsa.topk` rows continue with the positions after the last key (past every causal key
//! of that row, so ignored by the spec's set rule), `dsa.scores` with -inf.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::hooks::{HookPoint, LayerHook, Observer, Selector};
use crate::output::Removal;

pub struct Stitcher {
    selector: Selector,
    parts: BTreeMap<HookPoint, Vec<Part>>,
    spill: Option<Spill>,
    batch: Option<usize>,
}

/// One call's tensor for a hook point: in memory, or its bytes in the spill file.
enum Part {
    Held(Tensor),
    Spilled { dtype: DType, shape: Vec<usize>, offset: u64 },
}

/// The file the parts go to, created beside the dump and unlinked at once where the OS allows
/// (then it vanishes with the process, killed or not).
struct Spill {
    file: BufWriter<File>,
    len: u64,
    /// Declared after `file`, so dropped after it: an open file may not be removable.
    removal: Removal,
}

impl Stitcher {
    /// Parts held in memory (a few positions: each part is a tensor of its own).
    pub fn new(selector: Selector) -> Self {
        Stitcher { selector, parts: BTreeMap::new(), spill: None, batch: None }
    }

    /// Parts written to a file beside `dump` (`.NAME.PID.parts`) as they come.
    pub fn spilling(selector: Selector, dump: &Path) -> Result<Self> {
        let mut name = std::ffi::OsString::from(".");
        name.push(dump.file_name().unwrap_or_default());
        name.push(format!(".{}.parts", std::process::id()));
        let path = dump.with_file_name(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let removal = Removal { removed: std::fs::remove_file(&path).is_ok(), path };
        let spill = Spill { file: BufWriter::with_capacity(1 << 20, file), len: 0, removal };
        Ok(Stitcher { spill: Some(spill), ..Stitcher::new(selector) })
    }

    /// Hook points recorded.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Every recorded hook point joined over all calls, in [`HookPoint`]'s order (forward order
    /// but for the MTP layer).
    pub fn finish(self) -> Result<Vec<(HookPoint, Tensor)>> {
        let mut all = Vec::new();
        self.for_each(|point, t| {
            all.push((point, t));
            Ok(())
        })?;
        Ok(all)
    }

    /// Each recorded hook point joined over all calls, in [`HookPoint`]'s order, handed to `f` one
    /// at a time (a spilled point's parts are read back only then).
    pub fn for_each(mut self, mut f: impl FnMut(HookPoint, Tensor) -> Result<()>) -> Result<()> {
        let batch = self.batch.unwrap_or(1);
        let mut spill = self.spill.take();
        if let Some(s) = spill.as_mut() {
            s.file.flush().map_err(|e| Error::io(&s.removal.path, e))?;
        }
        for (point, parts) in std::mem::take(&mut self.parts) {
            let parts = parts.into_iter().map(|p| p.load(spill.as_mut())).collect::<Result<Vec<_>>>()?;
            f(point, stitch(point, parts, batch)?)?;
        }
        Ok(())
    }
}

impl Part {
    fn load(self, spill: Option<&mut Spill>) -> Result<Tensor> {
        let (dtype, shape, offset) = match self {
            Part::Held(t) => return Ok(t),
            Part::Spilled { dtype, shape, offset } => (dtype, shape, offset),
        };
        let spill = spill.ok_or_else(|| Error::Usage("a spilled part without its file".into()))?;
        let mut bytes = vec![0u8; shape.iter().product::<usize>() * dtype.size_in_bytes()];
        let file = spill.file.get_mut();
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| Error::io(&spill.removal.path, e))?;
        Ok(Tensor::from_raw_buffer(&bytes, dtype, &shape, &Device::Cpu)?)
    }
}

impl Observer for Stitcher {
    /// `input_ids` always, as a dump holds them whatever `--record` says (`DumpWriter`): its
    /// batch size is also what un-flattens the router's [B*C, ...] rows.
    fn wants(&self, point: HookPoint) -> bool {
        point == HookPoint::InputIds || self.selector.wants(point)
    }
    fn observe(&mut self, point: HookPoint, value: &Tensor) -> Result<()> {
        if point == HookPoint::InputIds {
            self.batch = Some(value.dims()[0]);
        }
        let part = match self.spill.as_mut() {
            None => Part::Held(value.clone()),
            Some(s) => {
                let (value, _) = crate::dump::as_recorded(value)?; // as the dump will hold it
                let offset = s.len;
                crate::dump::write_tensor(&mut s.file, &value, &s.removal.path)?;
                s.len += (value.elem_count() * value.dtype().size_in_bytes()) as u64;
                Part::Spilled { dtype: value.dtype(), shape: value.dims().to_vec(), offset }
            }
        };
        self.parts.entry(point).or_default().push(part);
        Ok(())
    }
}

/// Joins one hook point's parts along the sequence.
fn stitch(point: HookPoint, parts: Vec<Tensor>, batch: usize) -> Result<Tensor> {
    let rows = matches!(point, HookPoint::Layer(_, h) if h.token_rows());
    let mut parts = parts
        .into_iter()
        .map(|t| {
            if !rows {
                return Ok(t);
            }
            // [B*C, ...] -> [B, C, ...]
            let mut shape = vec![batch, t.dims()[0] / batch];
            shape.extend_from_slice(&t.dims()[1..]);
            Ok(t.reshape(shape)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let grows = matches!(point, HookPoint::Layer(_, LayerHook::DsaTopk | LayerHook::DsaScores));
    let width = |t: &Tensor| t.dims().last().copied().unwrap_or(0);
    let full = parts.iter().map(width).max().unwrap_or(0);
    for t in parts.iter_mut().filter(|t| grows && width(t) < full) {
        let (b, c, w) = t.dims3()?;
        let pad = match point {
            HookPoint::Layer(_, LayerHook::DsaTopk) => {
                Tensor::arange(w as i64, full as i64, &Device::Cpu)?.broadcast_as((b, c, full - w))?.contiguous()?
            }
            _ => Tensor::full(f32::NEG_INFINITY, (b, c, full - w), &Device::Cpu)?.to_dtype(t.dtype())?,
        };
        *t = Tensor::cat(&[&*t, &pad], D::Minus1)?;
    }
    let joined = Tensor::cat(&parts, 1)?;
    Ok(if rows {
        let mut shape = vec![joined.dims()[0] * joined.dims()[1]];
        shape.extend_from_slice(&joined.dims()[2..]);
        joined.reshape(shape)?
    } else {
        joined
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three calls' parts (f32, i64, and a bf16 one the dump would hold as f32), spilled to disk
    /// and read back, join into what the parts held in memory join into; the file is gone after.
    #[test]
    fn spilled_parts_join_as_held_ones() {
        let dir = tempfile::tempdir().unwrap();
        let dump = dir.path().join("gen.safetensors");
        let mut held = Stitcher::new(Selector::default());
        let mut spilled = Stitcher::spilling(Selector::default(), &dump).unwrap();
        for (c, width) in [(0, 3), (3, 1), (4, 2)] {
            let ids = Tensor::arange(c as i64, (c + width) as i64, &Device::Cpu).unwrap().reshape((1, width)).unwrap();
            let x: Vec<f32> = (0..width * 4).map(|i| (c * 4 + i) as f32 * 0.37).collect();
            let x = Tensor::from_vec(x, (1, width, 4), &Device::Cpu).unwrap();
            let logits = x.to_dtype(DType::BF16).unwrap();
            for s in [&mut held, &mut spilled] {
                s.observe(HookPoint::InputIds, &ids).unwrap();
                s.observe(HookPoint::Embeddings, &x).unwrap();
                s.observe(HookPoint::Logits, &logits).unwrap();
            }
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the parts' file is unlinked at once");
        let held = held.finish().unwrap();
        let spilled = spilled.finish().unwrap();
        assert_eq!(held.len(), 3);
        for ((p, a), (q, b)) in held.iter().zip(&spilled) {
            assert_eq!((p, a.dims()), (q, b.dims()));
            let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b, "{p:?}");
        }
        assert_eq!(spilled[2].1.dtype(), DType::F32, "bf16 is spilled as the f32 the dump holds");
    }
}
