//! Safetensors files, read through a memory map and written atomically. Shared by checkpoint
//! loading and dumps: decoding every stored float type (F32, F64, BF16, F16, F8_E4M3, F8_E5M2)
//! to f32,
//! reading I64 index tensors, and streaming a file out tensor by tensor without holding it whole.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// One memory-mapped safetensors file.
pub struct StFile {
    pub path: PathBuf,
    /// The map's pages, named for a SIGBUS handler (`mapped`), while this file is open. (Before
    /// `mmap`: dropped first, so no later map at the same address is named after this file.)
    _named: crate::mapped::Record,
    mmap: std::sync::Arc<Mmap>,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

/// Refuses an input that is not a regular file: opening a FIFO waits for a writer forever, and a
/// device reads without end. (A missing file is left to the open, whose error says so.)
pub fn check_regular(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() && !m.is_dir() => Err(Error::Usage(format!("{}: is not a regular file", path.display()))),
        _ => Ok(()),
    }
}

/// A whole small input (a config, an index, a prompts file): a regular file, or a pipe, which
/// process substitution (`--prompts <(...)`) gives and which is read to its end; a device or
/// socket is refused.
pub fn read_input(path: &Path) -> Result<Vec<u8>> {
    #[cfg(unix)]
    let pipe = std::fs::metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
    #[cfg(not(unix))]
    let pipe = false;
    if !pipe {
        check_regular(path)?;
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

impl StFile {
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Err(Error::checkpoint(path, "is a folder, not a safetensors file"));
        }
        check_regular(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and outlives every slice borrowed from it. What the map
        // cannot hold still is the file: one cut short under us faults on its next page (the
        // binary makes that SIGBUS a one-line error naming the file, `interrupt::report_bus_errors`), and one
        // rewritten in place at the same length changes the values behind live borrows. Neither
        // is defended beyond that; no index is read from the map, checked, and read again.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let _named = crate::mapped::record(mmap.as_ptr(), mmap.len(), path);
        let (data_start, tensors, metadata) = parse(&mmap).map_err(|msg| Error::checkpoint(path, msg))?;
        let mmap = std::sync::Arc::new(mmap);
        Ok(StFile { path: path.to_path_buf(), _named, mmap, data_start, tensors, metadata })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
    pub fn len_bytes(&self) -> usize {
        self.mmap.len()
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self.info(name).ok_or_else(|| Error::checkpoint(&self.path, format!("no tensor `{name}`")))?;
        let (a, b) = info.data_offsets;
        // read_metadata validated the offsets against the file length.
        let bytes = self
            .mmap
            .get(self.data_start + a..self.data_start + b)
            .ok_or_else(|| Error::checkpoint(&self.path, format!("tensor `{name}` lies outside the file")))?;
        Ok((info, bytes))
    }

    /// A BF16 tensor of 2 or more dimensions as a `[rows, last dim]` matrix read in place.
    pub fn bf16_weight(&self, name: &str) -> Option<crate::model::gemv::Bf16Weight> {
        let info = self.info(name).filter(|i| i.dtype == Dtype::BF16 && i.shape.len() >= 2)?;
        let cols = *info.shape.last()?;
        let rows = info.shape[..info.shape.len() - 1].iter().product();
        crate::model::gemv::Bf16Weight::new(self.mmap.clone(), self.data_start + info.data_offsets.0, rows, cols)
            .map(crate::model::gemv::Bf16Weight::in_file)
    }

    /// A 2-D F8_E4M3 tensor read in place, with the scale grid and block it is quantised with.
    pub fn fp8_weight(
        &self,
        name: &str,
        scale: (Vec<f32>, &[usize]),
        block: [usize; 2],
    ) -> Option<crate::model::fp8::Fp8Weight> {
        let info = self.info(name).filter(|i| i.dtype == Dtype::F8_E4M3)?;
        let [rows, cols] = info.shape[..] else { return None };
        let offset = self.data_start + info.data_offsets.0;
        crate::model::fp8::Fp8Weight::new(self.mmap.clone(), offset, [rows, cols], scale, block)
            .map(crate::model::fp8::Fp8Weight::in_file)
    }

    /// Rows `[start, start + count)` of a float tensor (rows of its last dimension, the leading
    /// ones flattened), decoded to f32, without touching the rest of it (embedding lookups and
    /// lm_head chunks of a model larger than memory, a dump's S x S scores a slice at a time).
    pub fn f32_rows(&self, name: &str, start: usize, count: usize) -> Result<Vec<f32>> {
        let (info, bytes) = self.row_bytes(name, start, count)?;
        decode_f32(info.dtype, bytes).map_err(|msg| Error::checkpoint(&self.path, format!("tensor `{name}`: {msg}")))
    }

    /// Rows `[start, start + count)` of an integer tensor as i64, as [`StFile::f32_rows`] reads.
    pub fn i64_rows(&self, name: &str, start: usize, count: usize) -> Result<Vec<i64>> {
        let (info, bytes) = self.row_bytes(name, start, count)?;
        self.decode_i64(name, info, bytes)
    }

    /// The bytes of rows `[start, start + count)` of `name` (rows of its last dimension).
    fn row_bytes(&self, name: &str, start: usize, count: usize) -> Result<(&TensorInfo, &[u8])> {
        let (info, bytes) = self.bytes(name)?;
        let Some((&cols, lead)) = info.shape.split_last() else {
            return Err(Error::checkpoint(&self.path, format!("tensor `{name}` is a scalar")));
        };
        let rows = lead.iter().product::<usize>();
        if start.checked_add(count).is_none_or(|end| end > rows) {
            return Err(Error::checkpoint(
                &self.path,
                format!("rows {start}..{} of `{name}` (it has {rows})", start.saturating_add(count)),
            ));
        }
        let row_bytes = cols * info.dtype.bitsize() / 8;
        Ok((info, &bytes[start * row_bytes..(start + count) * row_bytes]))
    }

    /// Lets the kernel drop the pages of `name` from this process (they are re-read from the file
    /// if touched again), so a streamed layer stops counting towards resident memory.
    pub fn release(&self, name: &str) {
        let Some(info) = self.info(name) else { return };
        release_range(&self.mmap, self.data_start + info.data_offsets.0, self.data_start + info.data_offsets.1);
    }

    /// A float tensor decoded to f32, with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (info, bytes) = self.bytes(name)?;
        let data = decode_f32(info.dtype, bytes)
            .map_err(|msg| Error::checkpoint(&self.path, format!("tensor `{name}`: {msg}")))?;
        Ok((data, info.shape.clone()))
    }

    /// An integer tensor (I64, I32, U32...) as i64, with its shape.
    pub fn i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let (info, bytes) = self.bytes(name)?;
        Ok((self.decode_i64(name, info, bytes)?, info.shape.clone()))
    }

    /// `bytes` of the integer tensor `name` as i64.
    fn decode_i64(&self, name: &str, info: &TensorInfo, bytes: &[u8]) -> Result<Vec<i64>> {
        let fail = |msg: String| Error::checkpoint(&self.path, format!("tensor `{name}`: {msg}"));
        let unsupported = || fail(format!("expected an integer dtype ({}), got {:?}", listed(&INTS), info.dtype));
        if !INTS.contains(&info.dtype) {
            return Err(unsupported());
        }
        let mut data = room(bytes.len() / (info.dtype.bitsize() / 8)).map_err(fail)?;
        let chunks = |n: usize| bytes.chunks_exact(n);
        match info.dtype {
            Dtype::I64 => data.extend(chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))),
            Dtype::I32 => data.extend(chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)),
            Dtype::U32 => data.extend(chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)),
            _ => return Err(unsupported()),
        };
        Ok(data)
    }
}

/// Drops the whole pages of bytes `start..end` of a read-only, file-backed `map` from this
/// process (they are re-read from the file, or the page cache, if touched again). Never for an
/// anonymous map: its dropped pages would read back as zeros.
pub(crate) fn release_range(map: &Mmap, start: usize, end: usize) {
    let page = page_size();
    let (a, b) = (start.div_ceil(page) * page, (end / page * page).min(map.len()));
    if b > a {
        // SAFETY: the map is read-only and file-backed (the callers' contract): dropped pages are
        // re-read from the file on the next access, so no reference into the map sees a change.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
    }
}

/// The system's page size (4096 where it cannot be asked).
fn page_size() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads a constant of the system.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(n) = usize::try_from(n) {
            if n > 0 {
                return n;
            }
        }
    }
    4096
}

/// Parses and validates a safetensors file's header: where the data starts, the tensors and the
/// metadata. Every offset is checked against the buffer, so reading any listed tensor stays in
/// bounds. (Separate from `open` so it can be fuzzed on bytes.)
#[allow(clippy::type_complexity)]
pub fn parse(
    bytes: &[u8],
) -> std::result::Result<(usize, HashMap<String, TensorInfo>, HashMap<String, String>), String> {
    // JSON objects may repeat a key and serde keeps the last one silently: refuse instead
    // (before the offsets are validated, which a repeated name would confuse).
    let header_len = bytes.get(..8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
    let header = header_len.and_then(|n| usize::try_from(n).ok()).and_then(|n| bytes.get(8..n.checked_add(8)?));
    if let Some(dup) = header.and_then(duplicate_key) {
        return Err(format!("the header names tensor `{dup}` twice"));
    }
    let (n, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        use safetensors::SafeTensorError as E;
        // The crate's message does not say which tensor: name it where we can.
        let which = header.and_then(mismatched_tensor).map(|m| format!(" ({m})")).unwrap_or_default();
        // And some of its words need the format's rule beside them.
        let rule = match &e {
            E::MetadataIncompleteBuffer => match header.and_then(|h| data_end(h).map(|end| (h.len(), end))) {
                Some((len, end)) => {
                    let held = bytes.len().saturating_sub(8 + len);
                    let why = if held < end { "cut short" } else { "bytes past the last tensor" };
                    format!(": its tensors' data is {end} bytes, the file holds {held} after the header ({why})")
                }
                None => String::new(),
            },
            E::InvalidHeaderDeserialization(_) if which.is_empty() => {
                " (the header must be JSON: tensors, and `__metadata__` of strings)".to_string()
            }
            E::InvalidOffset(_) if which.is_empty() => ": its data does not start where the tensor before it ends \
                 (a safetensors file's tensors lie back to back from offset 0, with no gap or overlap)"
                .to_string(),
            _ => String::new(),
        };
        format!("not a valid safetensors file: {e}{rule}{which}")
    })?;
    let tensors = meta.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
    let metadata = meta.metadata().clone().unwrap_or_default();
    Ok((8 + n, tensors, metadata))
}

/// Where a header's tensors' data ends (the largest end offset), when the header is JSON.
fn data_end(header: &[u8]) -> Option<usize> {
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let ends = v.iter().filter(|(k, _)| *k != "__metadata__");
    Some(ends.filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64()).max().unwrap_or(0) as usize)
}

/// The first tensor of a header whose byte range does not hold its dtype and shape, described.
fn mismatched_tensor(header: &[u8]) -> Option<String> {
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    v.into_iter().filter(|(k, _)| k != "__metadata__").find_map(|(name, t)| {
        // The crate's own description of a tensor: dtype (with its size), shape and offsets.
        let Ok(info) = serde_json::from_value::<TensorInfo>(t) else {
            return Some(format!("tensor `{name}`: not a dtype, shape and two data_offsets"));
        };
        let (a, b) = info.data_offsets;
        let bits = info.shape.iter().try_fold(info.dtype.bitsize(), |n, &d| n.checked_mul(d));
        match bits {
            // (checked: the offsets are the file's, up to 2^64)
            Some(bits) if b >= a && (b - a).checked_mul(8) == Some(bits) => None,
            _ => Some(format!("tensor `{name}`: {:?} {:?} in bytes {a}..{b}", info.dtype, info.shape)),
        }
    })
}

/// The first top-level key that a JSON object repeats, if any.
fn duplicate_key(header: &[u8]) -> Option<String> {
    struct Keys(Option<String>);
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if !seen.insert(key.clone()) {
                    return Ok(Some(key));
                }
            }
            Ok(self.0)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(header);
    serde::Deserializer::deserialize_map(&mut de, Keys(None)).ok().flatten()
}

/// The float dtypes [`decode_f32`] reads, and the integer ones [`StFile::i64`] reads.
pub const FLOATS: [Dtype; 6] = [Dtype::F32, Dtype::F64, Dtype::BF16, Dtype::F16, Dtype::F8_E4M3, Dtype::F8_E5M2];
pub const INTS: [Dtype; 3] = [Dtype::I64, Dtype::I32, Dtype::U32];

/// A dtype list as the errors name it: `F32, F64, ...`.
pub fn listed(dtypes: &[Dtype]) -> String {
    dtypes.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>().join(", ")
}

/// Decodes a stored float tensor to f32.
pub fn decode_f32(dtype: Dtype, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let unsupported = || format!("dtype {dtype:?} is not a supported float type ({})", listed(&FLOATS));
    if !FLOATS.contains(&dtype) {
        return Err(unsupported());
    }
    let mut out = room(bytes.len() / (dtype.bitsize() / 8))?;
    let chunks = |n: usize| bytes.chunks_exact(n);
    match dtype {
        Dtype::F32 => out.extend(chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        Dtype::F64 => {
            // Narrowed to f32, the precision everything is computed and compared in; a finite
            // value past its range would become an infinity (1e40 and 3e40 would then match).
            for (i, c) in chunks(8).enumerate() {
                let x = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                // (f64's lowest is torch's mask in F64, `finfo(float64).min`: f32's is -inf.)
                if x.is_finite() && (x as f32).is_infinite() && x != f64::MIN {
                    return Err(format!("F64 value {x:e} (element {i}) is beyond f32's range"));
                }
                out.push(x as f32);
            }
        }
        Dtype::BF16 => out.extend(chunks(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())),
        Dtype::F16 => out.extend(chunks(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())),
        Dtype::F8_E4M3 => {
            let lut = e4m3_table();
            out.extend(bytes.iter().map(|b| lut[*b as usize]))
        }
        // E5M2 is f16's top byte (its sign, exponent and two mantissa bits).
        Dtype::F8_E5M2 => out.extend(bytes.iter().map(|&b| half::f16::from_bits(u16::from(b) << 8).to_f32())),
        _ => return Err(unsupported()),
    }
    Ok(out)
}

/// An empty vector with room for `n` values, or a one-line error when memory has none: a file
/// can declare a tensor larger than memory (a sparse one holds it in a few KB of disk), and
/// collecting it would abort the process.
pub fn room<T>(n: usize) -> std::result::Result<Vec<T>, String> {
    let mut v = Vec::new();
    match v.try_reserve_exact(n) {
        Ok(()) => Ok(v),
        Err(_) => Err(format!(
            "its {n} values ({}) do not fit in memory",
            crate::memory::gb(n.saturating_mul(std::mem::size_of::<T>()) as u64)
        )),
    }
}

/// FP8 E4M3 "fn" (OCP): bias 7, no infinities, S.1111.111 is NaN, max 448.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0xF) as i32;
    let man = (b & 7) as f32;
    let v = match (exp, b & 7) {
        (0xF, 7) => f32::NAN,
        (0, _) => man / 8.0 * 2f32.powi(-6),
        _ => (1.0 + man / 8.0) * 2f32.powi(exp - 7),
    };
    sign * v
}

/// Every E4M3 code's value, by code.
pub fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = e4m3_to_f32(i as u8);
    }
    t
}

/// A tensor to write: dtype, shape and its little-endian bytes.
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Entry {
    pub fn f32(shape: Vec<usize>, data: &[f32]) -> Self {
        Entry { dtype: Dtype::F32, shape, data: le_bytes_f32(data) }
    }
    pub fn i64(shape: Vec<usize>, data: &[i64]) -> Self {
        Entry { dtype: Dtype::I64, shape, data: le_bytes_i64(data) }
    }
}

/// Little-endian bytes of f32 values, in one allocation (the hot path of dump writing).
pub fn le_bytes_f32(v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * 4];
    for (o, x) in out.chunks_exact_mut(4).zip(v) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    out
}

pub fn le_bytes_i64(v: &[i64]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * 8];
    for (o, x) in out.chunks_exact_mut(8).zip(v) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// Writes a safetensors file whose tensors are produced one at a time, so a multi-GB file never
/// sits in memory: the header is computed from shapes first, then `fill` is asked for each
/// tensor's bytes in order. Written to a temporary sibling (`output::tmp_sibling`) and renamed, so
/// the target name only ever holds a complete file.
pub fn write_streaming(
    path: &Path,
    layout: &[(String, Dtype, Vec<usize>)],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<()> {
    let path = &crate::output::landing(path);
    let (header, sizes) = header_bytes(path, layout, metadata)?;
    let tmp = crate::output::tmp_sibling(path);
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(header.len() as u64).to_le_bytes()).map_err(|e| Error::io(&tmp, e))?;
        w.write_all(&header).map_err(|e| Error::io(&tmp, e))?;
        for (i, size) in sizes.iter().enumerate() {
            let mut counter = CountingWriter { inner: &mut w, written: 0 };
            fill(i, &mut counter)?;
            if counter.written != *size {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor `{}`: wrote {} bytes, expected {size}", layout[i].0, counter.written),
                ));
            }
        }
        let file = w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The JSON header for `layout` (tensors stored back to back in order), padded with spaces to a
/// multiple of 8 so the data section is aligned; and each tensor's byte size.
pub fn header_bytes(
    path: &Path,
    layout: &[(String, Dtype, Vec<usize>)],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta = serde_json::to_value(metadata).map_err(|e| Error::checkpoint(path, e.to_string()))?;
        header.insert("__metadata__".into(), meta);
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(layout.len());
    for (name, dtype, shape) in layout {
        let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        // (A map keeps one entry of a name, whose offsets would not cover the data written.)
        if header.contains_key(name) {
            return Err(Error::checkpoint(path, format!("tensor `{name}` is written twice")));
        }
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes] }),
        );
        sizes.push(bytes);
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    Ok((header, sizes))
}

/// Writes a whole in-memory set of tensors (a dump), atomically.
pub fn write(path: &Path, tensors: &[(String, Entry)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let layout: Vec<_> = tensors.iter().map(|(n, e)| (n.clone(), e.dtype, e.shape.clone())).collect();
    write_streaming(path, &layout, metadata, |i, w| w.write_all(&tensors[i].1.data).map_err(|e| Error::io(path, e)))
}

struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    written: usize,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    /// A tensor whose byte range does not hold its dtype and shape is named in the error.
    #[test]
    fn a_mismatched_tensor_is_named() {
        let header = br#"{"ok":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[2],"data_offsets":[4,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 8]);
        let err = super::parse(&bytes).err().unwrap_or_default();
        assert!(err.contains("tensor `x`: F32 [2] in bytes 4..8"), "{err}");
    }

    /// F8_E5M2 codes decode to the OCP FP8 spec's values: 1.0, -2.0, the largest normal 57344,
    /// the smallest subnormal 2^-16, and the infinity and NaNs of the top exponent.
    #[test]
    fn e5m2_codes_decode_to_the_specs_values() {
        let v = super::decode_f32(safetensors::Dtype::F8_E5M2, &[0x3c, 0xc0, 0x7b, 0x01, 0x7c, 0xfc, 0x7d]).unwrap();
        assert_eq!(v[..6], [1.0, -2.0, 57344.0, 2f32.powi(-16), f32::INFINITY, f32::NEG_INFINITY]);
        assert!(v[6].is_nan());
    }
}
