//! The matrix products on the device, row-major `y[:, n0 .. n0 + nt] = alpha * x w^T`, through
//! cuBLAS (column-major: rows n0.. of `y^T = w x^T`, so A = w transposed with leading dimension
//! k, B = x with leading dimension k, C = y from offset n0 with leading dimension n). Two
//! precisions ([`Precision`]):
//! - f32: SGEMM (cuBLAS's default math mode, so no TF32). A bf16 weight is widened exactly into a
//!   64 MB scratch a block of rows at a time (`bf16_widen`) before each product: 6 more bytes of
//!   traffic per weight, and no tensor cores, so this mode is for verification.
//! - bf16: GemmEx with bf16 A and B, f32 C, f32 compute (tensor cores). Weights stay bf16 as
//!   stored (f32 ones are rounded once at upload), FP8 ones dequantised straight to bf16 a block
//!   of rows at a time (`fp8_dequant_bf16`); the activation rows are rounded to bf16
//!   (`bf16_round`) into a scratch before each product.
//!
//! On the host emulation the same configuration goes to `emu::gemm`, so the layout arithmetic is
//! checked without a GPU.

use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::gpu::{Buf, Gpu};
use super::{probe, Lib};
use crate::device::{HostWeight, Precision};
use crate::error::{Error, Result};

/// The decoding scratch's size in values (64 MB of f32 in f32 mode, 32 MB of bf16 for an FP8
/// weight in bf16 mode).
pub(crate) const SCRATCH_VALUES: usize = 16 << 20;

/// A `[n, k]` weight in device memory.
pub enum DeviceWeight {
    F32(Buf<f32>),
    Bf16(Buf<u16>),
    /// Block-FP8 codes with the stored weight's scale grid; the codes are rows `row0 ..` of it.
    Fp8 {
        codes: Buf<u8>,
        scale: Buf<f32>,
        row0: usize,
        block: [usize; 2],
    },
    /// Weights stacked by rows that could not be joined as stored (FP8 ones: each has its own
    /// scale grid), with their row counts: a product runs once per part, into its columns.
    Stacked(Vec<(DeviceWeight, usize)>),
}

impl DeviceWeight {
    /// Rows of this weight as `[rows, k]`.
    pub fn rows(&self, k: usize) -> usize {
        match self {
            DeviceWeight::F32(w) => w.len() / k.max(1),
            DeviceWeight::Bf16(w) => w.len() / k.max(1),
            DeviceWeight::Fp8 { codes, .. } => codes.len() / k.max(1),
            DeviceWeight::Stacked(parts) => parts.iter().map(|(_, rows)| rows).sum(),
        }
    }
}

/// The activation rows of a product, from a row offset: f32 rows (f32 mode), or rows already
/// rounded to bf16 into a scratch (bf16 mode).
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a Buf<f32>, usize),
    Bf16(&'a Buf<u16>, usize),
}

/// cuBLAS's handle, destroyed without cudarc's `unwrap`: after a sticky device error (an illegal
/// address) `cublasDestroy` may fail too, and its panic would hide the error being returned.
struct Blas(std::mem::ManuallyDrop<CudaBlas>);

impl std::ops::Deref for Blas {
    type Target = CudaBlas;
    fn deref(&self) -> &CudaBlas {
        &self.0
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle is ours and nothing uses it after this. The CudaBlas itself is never
        // dropped (it would destroy the handle again), which keeps its reference to the stream:
        // one per `Products`, and the stream lives as long as the device anyway.
        let _ = unsafe { cudarc::cublas::result::destroy_handle(*self.0.handle()) };
    }
}

pub struct Products {
    pub precision: Precision,
    /// cuBLAS and its stream; None on the emulation.
    blas: Option<(Blas, Arc<CudaStream>)>,
    /// f32 mode: where a bf16 or FP8 weight is decoded, a block of rows at a time.
    wide: RefCell<Option<Buf<f32>>>,
    /// bf16 mode: the activation rows, rounded.
    narrow: RefCell<Option<Buf<u16>>>,
    /// bf16 mode: an FP8 weight's block of rows, dequantised to bf16.
    narrow_weight: RefCell<Option<Buf<u16>>>,
}

/// The scratch in `slot`, grown to at least `n` values.
pub(super) fn scratch<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Clone>(
    gpu: &Gpu,
    slot: &'a mut Option<Buf<T>>,
    n: usize,
) -> Result<&'a mut Buf<T>> {
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = None; // freed before its larger successor is made: the two are never held at once
        *slot = Some(gpu.zeros(n)?);
    }
    slot.as_mut().ok_or_else(|| Error::Device("no scratch buffer".into()))
}

/// For each block of `block_rows(n, k)` rows of an `[n, k]` weight, `decode(buf, n0, nt)` puts
/// rows `n0 .. n0 + nt` in `slot`'s scratch, then `f(buf, n0, nt)` multiplies them.
fn blocks<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Clone>(
    gpu: &Gpu,
    slot: &RefCell<Option<Buf<T>>>,
    [n, k]: [usize; 2],
    mut decode: impl FnMut(&mut Buf<T>, usize, usize) -> Result<()>,
    mut f: impl FnMut(&Buf<T>, usize, usize) -> Result<()>,
) -> Result<()> {
    let rows = block_rows(n, k);
    let mut buf = slot.borrow_mut();
    let buf = scratch(gpu, &mut buf, rows * k)?;
    for n0 in (0..n).step_by(rows) {
        let nt = rows.min(n - n0);
        decode(buf, n0, nt)?;
        f(buf, n0, nt)?;
    }
    Ok(())
}

/// How many values a strided batch of `rows x cols` column-major matrices (leading dimension
/// `ld`) spans; None for a layout cuBLAS refuses (`ld < max(1, rows)`, a negative size or stride).
fn extent(rows: i32, cols: i32, ld: i32, stride: i64, batch: i32) -> Option<usize> {
    if rows < 0 || cols < 0 || batch < 0 || stride < 0 || ld < rows.max(1) {
        return None;
    }
    if rows == 0 || cols == 0 || batch == 0 {
        return Some(0);
    }
    // (Checked: a stride near i64's range would wrap to a small extent.)
    let one = (cols as i64 - 1).checked_mul(ld as i64)?.checked_add(rows as i64)?;
    usize::try_from((batch as i64 - 1).checked_mul(stride)?.checked_add(one)?).ok()
}

/// Checks a strided batch's operands ([`check_batched`]) and says whether it has any work.
fn has_work(cfg: &StridedBatchedConfig<f32>, operands: [(usize, usize); 3]) -> Result<bool> {
    check_batched(cfg, operands)?;
    let g = &cfg.gemm;
    Ok(cfg.batch_size > 0 && g.m > 0 && g.n > 0)
}

/// Refuses a strided batch whose operands do not lie inside their buffers (`(length, offset)`
/// of A, B, C) or whose outputs overlap: cuBLAS checks neither, and the emulation, which runs the
/// batch in order, would not notice an overlap. The outputs may interleave (the attention writes
/// each head's columns side by side) as long as they do not meet.
fn check_batched(cfg: &StridedBatchedConfig<f32>, [a, b, c]: [(usize, usize); 3]) -> Result<()> {
    let g = &cfg.gemm;
    let trans = |op| op != cublasOperation_t::CUBLAS_OP_N;
    let (ar, ac) = if trans(g.transa) { (g.k, g.m) } else { (g.m, g.k) };
    let (br, bc) = if trans(g.transb) { (g.n, g.k) } else { (g.k, g.n) };
    let operands = [
        ("A", a, extent(ar, ac, g.lda, cfg.stride_a, cfg.batch_size)),
        ("B", b, extent(br, bc, g.ldb, cfg.stride_b, cfg.batch_size)),
        ("C", c, extent(g.m, g.n, g.ldc, cfg.stride_c, cfg.batch_size)),
    ];
    for (name, (have, from), need) in operands {
        if need.is_none_or(|n| from.checked_add(n).is_none_or(|end| end > have)) || from > have {
            return Err(Error::Device(format!(
                "batched GEMM: operand {name} of {have} values cannot hold {need:?} from offset {from}"
            )));
        }
    }
    let (m, ldc, stride) = (g.m as i64, g.ldc as i64, cfg.stride_c);
    let footprint = (g.n as i64 - 1).max(0) * ldc + m;
    let apart = stride >= footprint || (stride >= m && (cfg.batch_size as i64 - 1) * stride + m <= ldc);
    if cfg.batch_size > 1 && m > 0 && g.n > 0 && !apart {
        return Err(Error::Device(format!("batched GEMM: outputs {stride} apart overlap (m {m}, ldc {ldc})")));
    }
    Ok(())
}

/// Where a block product reads and writes: activation rows `x_row0 .. x_row0 + m` (of width k)
/// and, in output rows `y_row0 ..` of width n, columns `n0 .. n0 + nt` (the last row ends at
/// column n0 + nt); refused unless the buffers (`[x, w, y]` lengths; w holds the nt weight rows
/// first) hold them.
fn block_ranges(
    [x, w, y]: [usize; 3],
    (x_row0, y_row0): (usize, usize),
    (n0, nt, n): (usize, usize, usize),
    [m, k]: [usize; 2],
) -> Result<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let c_len = m.saturating_sub(1) * n + nt;
    if c_len >= CUBLAS_SPAN || m * k >= CUBLAS_SPAN {
        return Err(Error::Device(format!("GEMM: {m} rows x {k} -> {nt} of {n} span 2^31 values in one call")));
    }
    if n0 + nt > n || w < nt * k || x < (x_row0 + m) * k || y < y_row0 * n + n0 + c_len {
        return Err(Error::Device(format!("GEMM: buffers too small for rows {x_row0}+{m} x {k} -> {n0}+{nt} of {n}")));
    }
    Ok((x_row0 * k..(x_row0 + m) * k, y_row0 * n + n0..y_row0 * n + n0 + c_len))
}

/// The values one product's operand may span. cuBLAS takes `int` sizes, and every dimension here
/// fits one, but a call whose output spans 2^31 values or more (the lm_head's [T, 154 880] from
/// about 13 900 tokens) has failed in a cuBLASLt 13 algorithm elsewhere (NVIDIA/raft#3097) and
/// was never run here: such products are made a block of token rows at a time.
const CUBLAS_SPAN: usize = 1 << 31;

/// The token rows of an `m`-row product into `[n, k]`, in runs whose input and output each span
/// fewer than [`CUBLAS_SPAN`] values.
fn row_runs(m: usize, n: usize, k: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = ((CUBLAS_SPAN - 1) / n.max(k).max(1)).max(1);
    (0..m).step_by(step).map(move |r| r..(r + step).min(m))
}

/// How many rows of an `[n, k]` weight are decoded for a product at a time (into a scratch of
/// at most [`SCRATCH_VALUES`]): a multiple of 128 where the scratch allows, so every block starts
/// its output columns 512-byte aligned (cuBLAS's fast kernels want 16) and on an FP8 scale
/// block's boundary.
fn block_rows(n: usize, k: usize) -> usize {
    match (SCRATCH_VALUES / k.max(1)).max(1) {
        r if r >= n => n.max(1),
        r if r >= 128 => r / 128 * 128,
        r => r,
    }
}

/// Refuses a weight whose rows are not the `n` a product says.
fn check_rows(w: &DeviceWeight, n: usize, k: usize) -> Result<()> {
    if w.rows(k) != n {
        return Err(Error::Device(format!("GEMM: a weight of {} rows of {k} used as {n}", w.rows(k))));
    }
    Ok(())
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Device(format!("GEMM: size {v} exceeds cuBLAS's int")))
}

impl Products {
    pub fn new(gpu: &Gpu, precision: Precision) -> Result<Self> {
        let blas = match gpu.stream() {
            Some(stream) => {
                probe(&[Lib::Cublas])?;
                let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Device(format!("cuBLAS: {e:?}")))?;
                Some((Blas(std::mem::ManuallyDrop::new(blas)), stream.clone()))
            }
            None => None,
        };
        let (wide, narrow, narrow_weight) = (RefCell::new(None), RefCell::new(None), RefCell::new(None));
        Ok(Products { precision, blas, wide, narrow, narrow_weight })
    }

    /// A `[n, k]` weight as this precision multiplies it: bf16 mode rounds f32 weights to bf16
    /// once, here. Stacked weights are joined into one when their parts can be (all f32, all
    /// bf16, or in bf16 mode any mix of the two), so one product covers them all.
    pub fn upload_weight(&self, gpu: &Gpu, w: HostWeight, k: usize) -> Result<DeviceWeight> {
        Ok(match (w, self.precision) {
            (HostWeight::Stacked(parts), precision) => {
                let all = |f: fn(&HostWeight) -> bool| parts.iter().all(f);
                let f32_ = |p: &HostWeight| matches!(p, HostWeight::F32(_));
                let bf16 = |p: &HostWeight| matches!(p, HostWeight::Bf16(_));
                let either = |p: &HostWeight| matches!(p, HostWeight::F32(_) | HostWeight::Bf16(_));
                if all(f32_) && precision == Precision::F32 {
                    DeviceWeight::F32(gpu.upload(&w.to_f32())?)
                } else if all(bf16) || (all(either) && precision == Precision::Bf16) {
                    let bits: Vec<u16> = parts
                        .iter()
                        .flat_map(|p| match p {
                            HostWeight::Bf16(bits) => bits.to_vec(),
                            other => other.to_f32().iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect(),
                        })
                        .collect();
                    DeviceWeight::Bf16(gpu.upload(&bits)?)
                } else {
                    let rows =
                        |p: &HostWeight| p.rows(k).ok_or_else(|| Error::Device(format!("a part is not rows of {k}")));
                    let each = |p: &HostWeight| Ok((self.upload_weight(gpu, *p, k)?, rows(p)?));
                    DeviceWeight::Stacked(parts.iter().map(each).collect::<Result<_>>()?)
                }
            }
            (HostWeight::F32(v), Precision::F32) => DeviceWeight::F32(gpu.upload(v)?),
            (HostWeight::F32(v), Precision::Bf16) => {
                let bits: Vec<u16> = v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
                DeviceWeight::Bf16(gpu.upload(&bits)?)
            }
            (HostWeight::Bf16(bits), _) => DeviceWeight::Bf16(gpu.upload(bits)?),
            (HostWeight::Fp8(w), _) => DeviceWeight::Fp8 {
                codes: gpu.upload(w.bytes())?,
                scale: gpu.upload(w.scale())?,
                row0: w.row0(),
                block: w.block(),
            },
        })
    }

    /// `y[y_row0 .., :n] = alpha * x[x_row0 .., :k] w^T` over m rows.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_rows(
        &self,
        gpu: &Gpu,
        x: &Buf<f32>,
        x_row0: usize,
        w: &DeviceWeight,
        y: &mut Buf<f32>,
        y_row0: usize,
        [m, n, k]: [usize; 3],
        alpha: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        if x.len() < (x_row0 + m) * k || y.len() < (y_row0 + m) * n {
            return Err(Error::Device(format!("GEMM: buffers too small for rows {x_row0}+{m} x {k} -> {n}")));
        }
        check_rows(w, n, k)?;
        for rows in row_runs(m, n, k) {
            let (x_row0, y_row0, m) = (x_row0 + rows.start, y_row0 + rows.start, rows.len());
            match self.precision {
                Precision::F32 => self.part(gpu, Rows::F32(x, x_row0), w, (y, y_row0), (0, n, n), [m, k], alpha)?,
                Precision::Bf16 => {
                    let mut narrow = self.narrow.borrow_mut();
                    let xb = scratch(gpu, &mut narrow, m * k)?;
                    gpu.bf16_round(x, x_row0 * k, xb, m * k)?;
                    self.part(gpu, Rows::Bf16(xb, 0), w, (y, y_row0), (0, n, n), [m, k], alpha)?
                }
            }
        }
        Ok(())
    }

    /// The expert GEMMs (`Ops::gemm_groups`): each group's rows of `x` (packed row `i` being
    /// `x[gather[i]]` when `gather` is given) times its weight into the same rows of `y`. In bf16
    /// mode the rows the groups span are gathered and rounded once, not per group, into a scratch
    /// that grows to them (tokens x top-k x hidden bf16: 200 MB for 2048 tokens of GLM-5) and is
    /// kept; f32 mode packs gathered rows into a buffer of their own first.
    pub fn gemm_groups(
        &self,
        gpu: &Gpu,
        (x, gather): (&Buf<f32>, Option<&Buf<i32>>),
        groups: &[(&DeviceWeight, usize, usize)],
        y: &mut Buf<f32>,
        [n, k]: [usize; 2],
    ) -> Result<()> {
        let spans = groups.iter().filter(|g| g.2 > 0);
        let (Some(r0), Some(r1)) = (spans.clone().map(|g| g.1).min(), spans.clone().map(|g| g.1 + g.2).max()) else {
            return Ok(());
        };
        if n == 0 {
            return Ok(());
        }
        if self.precision == Precision::F32 {
            let packed = match gather {
                Some(rows) => {
                    let mut p = gpu.output(r1 * k)?;
                    gpu.gather_rows(x, rows, &mut p, r1, k)?;
                    Some(p)
                }
                None => None,
            };
            let x = packed.as_ref().unwrap_or(x);
            for &(w, start, count) in groups {
                self.gemm_rows(gpu, x, start, w, y, start, [count, n, k], 1.0)?;
            }
            return Ok(());
        }
        if (gather.is_none() && x.len() < r1 * k) || y.len() < r1 * n {
            return Err(Error::Device(format!("grouped GEMM: buffers too small for rows {r0}..{r1} x {k} -> {n}")));
        }
        let mut narrow = self.narrow.borrow_mut();
        let xb = scratch(gpu, &mut narrow, (r1 - r0) * k)?;
        match gather {
            Some(rows) => gpu.gather_rows_bf16(x, rows, r0, xb, [r1 - r0, k])?,
            None => gpu.bf16_round(x, r0 * k, xb, (r1 - r0) * k)?,
        }
        for (w, start, count) in spans {
            check_rows(w, n, k)?;
            self.part(gpu, Rows::Bf16(xb, start - r0), w, (&mut *y, *start), (0, n, n), [*count, k], 1.0)?;
        }
        Ok(())
    }

    /// The product of weight `w` (`nw` rows) into columns `c0 .. c0 + nw` of y's `n`, from the
    /// activation rows as this precision multiplies them.
    #[allow(clippy::too_many_arguments)]
    fn part(
        &self,
        gpu: &Gpu,
        x: Rows,
        w: &DeviceWeight,
        (y, y_row0): (&mut Buf<f32>, usize),
        (c0, nw, n): (usize, usize, usize),
        [m, k]: [usize; 2],
        alpha: f32,
    ) -> Result<()> {
        match (x, w) {
            (x, DeviceWeight::Stacked(parts)) => {
                let mut c = c0;
                for (part, rows) in parts {
                    self.part(gpu, x, part, (&mut *y, y_row0), (c, *rows, n), [m, k], alpha)?;
                    c += rows;
                }
                Ok(())
            }
            (Rows::F32(x, x_row0), DeviceWeight::F32(w)) => {
                self.sgemm(x, x_row0, w, y, y_row0, (c0, nw, n), [m, k], alpha)
            }
            (Rows::F32(x, x_row0), w) => self.by_blocks(gpu, w, [nw, k], |wide, n0, nt| {
                self.sgemm(x, x_row0, wide, y, y_row0, (c0 + n0, nt, n), [m, k], alpha)
            }),
            (Rows::Bf16(xb, x_row0), DeviceWeight::Bf16(bits)) => {
                self.gemm_bf16((xb, x_row0), bits, y, y_row0, (c0, nw, n), [m, k], alpha)
            }
            (Rows::Bf16(..), DeviceWeight::F32(_)) => {
                Err(Error::Device("an f32 weight in a bf16 product (weights are rounded at upload)".into()))
            }
            // A block of rows dequantised straight to bf16, multiplied.
            (Rows::Bf16(xb, x_row0), DeviceWeight::Fp8 { codes, scale, row0, block }) => blocks(
                gpu,
                &self.narrow_weight,
                [nw, k],
                |wb, n0, nt| gpu.fp8_dequant((codes, scale), wb, [n0, nt, k], *row0, *block),
                |wb, n0, nt| self.gemm_bf16((xb, x_row0), wb, y, y_row0, (c0 + n0, nt, n), [m, k], alpha),
            ),
        }
    }

    /// Calls `f(wide, n0, nt)` with rows `n0 .. n0 + nt` of a bf16 or FP8 weight decoded to f32
    /// in the scratch, a block of rows at a time ([`block_rows`]), so the scratch stays small
    /// whatever the weight (GLM-5's lm_head alone would be 3.8 GB in f32).
    fn by_blocks(
        &self,
        gpu: &Gpu,
        w: &DeviceWeight,
        [n, k]: [usize; 2],
        f: impl FnMut(&Buf<f32>, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let decode = |wide: &mut Buf<f32>, n0: usize, nt: usize| match w {
            DeviceWeight::Bf16(bits) => gpu.bf16_widen(bits, n0 * k, wide, nt * k),
            DeviceWeight::Fp8 { codes, scale, row0, block } => {
                gpu.fp8_dequant((codes, scale), wide, [n0, nt, k], *row0, *block)
            }
            DeviceWeight::F32(_) | DeviceWeight::Stacked(_) => {
                Err(Error::Device("only a bf16 or FP8 weight is decoded by blocks".into()))
            }
        };
        blocks(gpu, &self.wide, [n, k], decode, f)
    }

    /// `C_i = alpha op(A_i) op(B_i) + beta C_i` for each matrix i of a strided batch of f32
    /// operands (the attention's and the indexer's products, `cuda::attention`), on cuBLAS's
    /// column-major contract: SGEMM (f32 mode; bf16 mode splits the operands and takes
    /// [`Products::batched_bf16`]). Each operand is a buffer and the offset of its first matrix;
    /// every matrix of the batch must lie inside its buffer (cuBLAS would not check).
    pub fn batched(
        &self,
        cfg: StridedBatchedConfig<f32>,
        (a, a0): (&Buf<f32>, usize),
        (b, b0): (&Buf<f32>, usize),
        (c, c0): (&mut Buf<f32>, usize),
    ) -> Result<()> {
        if !has_work(&cfg, [(a.len(), a0), (b.len(), b0), (c.len(), c0)])? {
            return Ok(());
        }
        match (&self.blas, a, b, c) {
            (Some((blas, _)), Buf::Device(a), Buf::Device(b), Buf::Device(c)) => {
                let (av, bv, mut cv) = (a.slice(a0..), b.slice(b0..), c.slice_mut(c0..));
                // SAFETY: every matrix of the batch lies inside its view (checked above).
                unsafe { blas.gemm_strided_batched(cfg, &av, &bv, &mut cv) }
                    .map_err(|e| Error::Device(format!("cuBLAS SGEMM (strided batched): {e:?}")))
            }
            (None, Buf::Host(a), Buf::Host(b), Buf::Host(c)) => {
                super::emu::gemm_batched(&cfg, &a[a0..], &b[b0..], &mut c[c0..])
            }
            _ => Err(Error::Device("batched GEMM: buffers from another device".into())),
        }
    }

    /// As [`Products::batched`] with bf16 A and B (f32 C, f32 accumulation, on tensor cores):
    /// the split-bf16 products of the attention in bf16 mode (`cuda::attention`).
    pub fn batched_bf16(
        &self,
        cfg: StridedBatchedConfig<f32>,
        (a, a0): (&Buf<u16>, usize),
        (b, b0): (&Buf<u16>, usize),
        (c, c0): (&mut Buf<f32>, usize),
    ) -> Result<()> {
        if !has_work(&cfg, [(a.len(), a0), (b.len(), b0), (c.len(), c0)])? {
            return Ok(());
        }
        match (&self.blas, a, b, c) {
            (Some((blas, stream)), Buf::Device(a), Buf::Device(b), Buf::Device(c)) => {
                let g = &cfg.gemm;
                let (av, bv, mut cv) = (a.slice(a0..), b.slice(b0..), c.slice_mut(c0..));
                let (ap, _ra) = av.device_ptr(stream);
                let (bp, _rb) = bv.device_ptr(stream);
                let (cp, _rc) = cv.device_ptr_mut(stream);
                // SAFETY: every matrix of the batch lies inside its view (checked above); A and B
                // are bf16, C f32, and alpha and beta f32, as CUBLAS_COMPUTE_32F takes them.
                unsafe {
                    cudarc::cublas::result::gemm_strided_batched_ex(
                        *blas.handle(),
                        g.transa,
                        g.transb,
                        g.m,
                        g.n,
                        g.k,
                        (&g.alpha as *const f32).cast(),
                        ap as *const c_void,
                        cudaDataType::CUDA_R_16BF,
                        g.lda,
                        cfg.stride_a,
                        bp as *const c_void,
                        cudaDataType::CUDA_R_16BF,
                        g.ldb,
                        cfg.stride_b,
                        (&g.beta as *const f32).cast(),
                        cp as *mut c_void,
                        cudaDataType::CUDA_R_32F,
                        g.ldc,
                        cfg.stride_c,
                        cfg.batch_size,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(|e| Error::Device(format!("cuBLAS GemmStridedBatchedEx (bf16): {e:?}")))
            }
            (None, Buf::Host(a), Buf::Host(b), Buf::Host(c)) => {
                let widen = |v: &[u16]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_bits(x).to_f32()).collect() };
                super::emu::gemm_batched(&cfg, &widen(&a[a0..]), &widen(&b[b0..]), &mut c[c0..])
            }
            _ => Err(Error::Device("batched bf16 GEMM: buffers from another device".into())),
        }
    }

    /// The column-major configuration of a row-major block product (see the module doc).
    fn config(nt: usize, [m, n, k]: [usize; 3], alpha: f32) -> Result<GemmConfig<f32>> {
        Ok(GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int(nt)?,
            n: int(m)?,
            k: int(k)?,
            alpha,
            lda: int(k)?,
            ldb: int(k)?,
            beta: 0.0,
            ldc: int(n)?,
        })
    }

    /// f32 block product over weight rows n0 .. n0 + nt (of n); `w` holds those rows first and
    /// may be longer (the scratch).
    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        &self,
        x: &Buf<f32>,
        x_row0: usize,
        w: &Buf<f32>,
        y: &mut Buf<f32>,
        y_row0: usize,
        (n0, nt, n): (usize, usize, usize),
        [m, k]: [usize; 2],
        alpha: f32,
    ) -> Result<()> {
        let (xs, ys) = block_ranges([x.len(), w.len(), y.len()], (x_row0, y_row0), (n0, nt, n), [m, k])?;
        let cfg = Self::config(nt, [m, n, k], alpha)?;
        match (&self.blas, x, w, y) {
            (Some((blas, _)), Buf::Device(x), Buf::Device(w), Buf::Device(y)) => {
                let (wv, xv, mut yv) = (w.slice(..nt * k), x.slice(xs), y.slice_mut(ys));
                // SAFETY: the views hold the nt x k, m x k and (strided) m x nt values the config
                // reads and writes.
                unsafe { blas.gemm(cfg, &wv, &xv, &mut yv) }.map_err(|e| Error::Device(format!("cuBLAS SGEMM: {e:?}")))
            }
            (None, Buf::Host(x), Buf::Host(w), Buf::Host(y)) => {
                super::emu::gemm(&cfg, &w[..nt * k], &x[xs], &mut y[ys])
            }
            _ => Err(Error::Device("SGEMM: buffers from another device".into())),
        }
    }

    /// bf16 block product of the rounded activations `xb` (m x k, from row x_row0) and weight
    /// rows n0 .. n0 + nt (of n; `w` holds those rows first and may be longer).
    #[allow(clippy::too_many_arguments)]
    fn gemm_bf16(
        &self,
        (xb, x_row0): (&Buf<u16>, usize),
        w: &Buf<u16>,
        y: &mut Buf<f32>,
        y_row0: usize,
        (n0, nt, n): (usize, usize, usize),
        [m, k]: [usize; 2],
        alpha: f32,
    ) -> Result<()> {
        let (xs, ys) = block_ranges([xb.len(), w.len(), y.len()], (x_row0, y_row0), (n0, nt, n), [m, k])?;
        let cfg = Self::config(nt, [m, n, k], alpha)?;
        match (&self.blas, xb, w, y) {
            (Some((blas, stream)), Buf::Device(xb), Buf::Device(w), Buf::Device(y)) => {
                let (wv, xv, mut yv) = (w.slice(..nt * k), xb.slice(xs), y.slice_mut(ys));
                let (a, _ra) = wv.device_ptr(stream);
                let (b, _rb) = xv.device_ptr(stream);
                let (c, _rc) = yv.device_ptr_mut(stream);
                let beta = 0.0f32;
                // SAFETY: A is nt x k bf16, B m x k bf16, C m x nt f32 at ldc n: the views hold
                // exactly that; alpha and beta are f32, as CUBLAS_COMPUTE_32F takes them.
                unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *blas.handle(),
                        cfg.transa,
                        cfg.transb,
                        cfg.m,
                        cfg.n,
                        cfg.k,
                        (&cfg.alpha as *const f32).cast(),
                        a as *const c_void,
                        cudaDataType::CUDA_R_16BF,
                        cfg.lda,
                        b as *const c_void,
                        cudaDataType::CUDA_R_16BF,
                        cfg.ldb,
                        (&beta as *const f32).cast(),
                        c as *mut c_void,
                        cudaDataType::CUDA_R_32F,
                        cfg.ldc,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(|e| Error::Device(format!("cuBLAS GemmEx (bf16): {e:?}")))
            }
            (None, Buf::Host(xb), Buf::Host(w), Buf::Host(y)) => {
                let widen = |v: &[u16]| -> Vec<f32> { v.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect() };
                super::emu::gemm(&cfg, &widen(&w[..nt * k]), &widen(&xb[xs]), &mut y[ys])
            }
            _ => Err(Error::Device("bf16 GEMM: buffers from another device".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(
        m: i32,
        n: i32,
        k: i32,
        [lda, ldb, ldc]: [i32; 3],
        strides: [i64; 3],
        batch: i32,
    ) -> StridedBatchedConfig<f32> {
        let op = cublasOperation_t::CUBLAS_OP_N;
        let gemm = GemmConfig { transa: op, transb: op, m, n, k, alpha: 1.0, lda, ldb, beta: 0.0, ldc };
        StridedBatchedConfig {
            gemm,
            batch_size: batch,
            stride_a: strides[0],
            stride_b: strides[1],
            stride_c: strides[2],
        }
    }

    /// The lm_head's product at 16 384 tokens spans 2.5 G output values: two runs, each under
    /// 2^31, covering every row once; a block that would span 2^31 is refused.
    #[test]
    fn long_products_run_in_blocks_of_rows_under_two_to_the_31() {
        let (m, n, k) = (16_384, 154_880, 6144);
        let runs: Vec<_> = row_runs(m, n, k).collect();
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].start, runs.last().map(|r| r.end)), (0, Some(m)));
        assert!(runs.windows(2).all(|w| w[0].end == w[1].start));
        assert!(runs.iter().all(|r| r.len() * n < CUBLAS_SPAN));
        assert_eq!(row_runs(2048, n, k).count(), 1, "a 2048-token prompt is one call");
        let lens = [m * k, n * k, m * n];
        let whole = block_ranges(lens, (0, 0), (0, n, n), [m, k]).unwrap_err().to_string();
        assert!(whole.contains("span 2^31"), "{whole}");
        let r = &runs[0];
        assert!(block_ranges(lens, (r.start, r.start), (0, n, n), [r.len(), k]).is_ok());
    }

    /// The attention's P.V layout: 3 heads' [4 x 5] outputs interleaved column by column.
    #[test]
    fn interleaved_outputs_that_do_not_meet_pass_and_exact_fits_pass() {
        let c = cfg(4, 5, 6, [12, 6, 12], [4, 30, 4], 3);
        // A: 3 x [4 x 6] at ld 12, stride 4: ends at 2*4 + 5*12 + 4 = 72.
        assert!(check_batched(&c, [(72, 0), (90, 0), (60, 0)]).is_ok());
        let short = check_batched(&c, [(71, 0), (90, 0), (60, 0)]).unwrap_err().to_string();
        assert!(short.contains("operand A of 71 values"), "{short}");
        assert!(check_batched(&c, [(80, 9), (90, 0), (60, 0)]).is_err(), "offset past the fit");
    }

    #[test]
    fn overlapping_outputs_bad_leading_dimensions_and_offsets_past_the_end_are_refused() {
        let same_c = cfg(4, 5, 6, [4, 6, 4], [24, 30, 0], 2);
        assert!(check_batched(&same_c, [(100, 0), (100, 0), (100, 0)]).unwrap_err().to_string().contains("overlap"));
        let half_c = cfg(4, 5, 6, [4, 6, 4], [24, 30, 10], 2);
        assert!(check_batched(&half_c, [(100, 0), (100, 0), (100, 0)]).is_err());
        let lda0 = cfg(4, 5, 0, [0, 1, 4], [0, 0, 20], 1);
        assert!(check_batched(&lda0, [(0, 0), (0, 0), (20, 0)]).is_err(), "lda 0 < max(1, m)");
        let k0 = cfg(4, 5, 0, [4, 1, 4], [0, 0, 20], 1);
        assert!(check_batched(&k0, [(0, 0), (0, 0), (20, 0)]).is_ok());
        assert!(check_batched(&k0, [(0, 1), (0, 0), (20, 0)]).is_err(), "an offset past an empty buffer");
    }
}
