//! Many-row products `x W^T` against a bf16 or block-FP8 weight on Intel's AMX tile units
//! (Sapphire Rapids and later), with f32 results as exact as `bf16_gemm`'s.
//!
//! AMX multiplies bf16 by bf16 into f32 accumulators (`tdpbf16ps`). A bf16 weight is bf16 already,
//! and an e4m3 code is exactly a bf16 value; the f32 activations are not, so each is split into
//! three bf16 values whose sum is exactly the f32 value (`split`: hi holds the top 8 significant
//! bits, mid the next 8, lo the last 8), and the product is the sum of three tile products. Each
//! bf16 x bf16 product is exact in f32 (8 + 8 significant bits), and the accumulation is f32, so
//! only the summation order differs from other f32 GEMMs (the reference's included), as for
//! `bf16_gemm`. Where we depart from plain f32: AMX treats a denormal input as zero and flushes
//! denormal results (a product below 1e-38); and a block-FP8 block's sum is scaled once, where
//! the reference scales each code ([`Tiles::from_fp8`]).
//!
//! In theory a core's tiles do 512 bf16 multiply-adds a cycle, so 170 of ours with three parts,
//! against 32 for the AVX-512 kernel's FMAs, which `bf16_gemm` already nears: the prefill is
//! arithmetic. Measured: docs/performance.md.
//!
//! Layout, packed ([`Tiles`]): the weight `[n, k]` is reordered once into groups of 16 outputs,
//! each `[k / 2][16][2]` (AMX's "VNNI" order: a tile row holds two consecutive inputs of 16
//! outputs), `k` padded with zeros to a multiple of 32 and the groups to an even count; 2 bytes a
//! weight, as the panels. The kernel holds a 32 x 32 block of outputs in four tiles (tmm0-3), and
//! per 32 inputs loads two weight tiles (tmm6-7) and, for each of hi, mid and lo, two activation
//! tiles (tmm4-5): 12 tile products. In place ([`InPlace`], a weight's first product): the
//! checkpoint's rows are the left operand (tmm4-5) as they lie, the activations are reordered
//! into VNNI order for the right one (tmm6-7), and the tiles hold the outputs' transpose.
//!
//! Linux hands out the tile registers only to a process that asks (`arch_prctl`); `available`
//! asks once. `GLIMPSE_NO_AMX=1` (or either of `model::avx512f`'s switches) keeps the AVX-512
//! kernel, which CI uses to run the golden cases through both.

// Off x86_64 there are no tiles (`available` is false), and what only feeds them goes unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use std::sync::OnceLock;

use rayon::prelude::*;

use super::bf16_gemm::Out;
use super::fp8::{codes_as_bf16, Fp8Weight};
use super::gemv::Bf16Weight;

mod probe;
pub use probe::{tile_rates, TileRates};

/// Outputs per tile (16 f32 a tile row), and per weight group.
const TN: usize = 16;
/// Token rows per tile.
const TM: usize = 16;
/// Inputs per tile product (32 bf16 a 64-byte tile row).
const TK: usize = 32;
/// Outputs and token rows per kernel call: 2 x 2 tiles.
const BLOCK: usize = 32;
/// Inputs per pass: the split activations of a pass (3 x MC x KC bf16, 768 KB) stay in L2 while
/// every weight group reads them.
const KC: usize = 1024;
/// Token rows per pass.
const MC: usize = 128;
const _: () = assert!(KC.is_multiple_of(TK) && MC.is_multiple_of(BLOCK) && BLOCK == 2 * TN && BLOCK == 2 * TM);

/// Whether this CPU has AMX-BF16, the OS lets this process use the tiles, and no switch keeps
/// the AVX-512 kernel.
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| super::avx512f() && std::env::var_os("GLIMPSE_NO_AMX").is_none() && tiles_granted())
}

/// CPUID's AMX-TILE and AMX-BF16 bits, then Linux's permission for the tile data
/// (`ARCH_REQ_XCOMP_PERM` for XFEATURE_XTILEDATA), which holds for every thread of the process.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn tiles_granted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: CPUID leaf 7 exists on every x86_64 CPU with AVX-512F (checked by the caller).
    // (Safe to call from Rust 1.94 on; the block keeps older toolchains building.)
    #[allow(unused_unsafe)]
    let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    // SAFETY: a request for a permission; it changes nothing but the process's XSAVE state size.
    amx_bf16 && amx_tile && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn tiles_granted() -> bool {
    false
}

/// A bf16 or block-FP8 weight `[n, k]` in AMX order for [`matmul`]. Only made where the tiles run.
pub struct Tiles {
    data: Vec<u16>, // [n_groups][kp / 2][16][2], n_groups even
    n: usize,
    k: usize,
    /// Block-FP8 weights: each 32 outputs' scale for each block of `bc` inputs,
    /// `[ceil(n / 32)][ceil(k / bc)]`, and `bc`.
    scale: Option<(Vec<f32>, usize)>,
}

impl Tiles {
    /// A bf16 weight's values in AMX order, or None where the tiles do not run.
    pub fn new(w: &Bf16Weight) -> Option<Self> {
        available().then(|| Tiles::of(w))
    }

    fn of(w: &Bf16Weight) -> Self {
        Tiles { data: vnni(w.bits(), w.rows, w.cols, |b| b), n: w.rows, k: w.cols, scale: None }
    }

    /// A block-FP8 weight's codes (exactly, as bf16) in AMX order with its scales, or None where
    /// the tiles do not run or its blocks do not fit them: 32 outputs must share a block of rows
    /// (blocks of rows and the view's first row multiples of 32) and a tile step of 32 inputs a
    /// block of inputs (blocks of inputs a multiple of 32). GLM-5's blocks are 128 x 128.
    ///
    /// Each block's partial sums are scaled once (`sum_b s_b (sum_k x_k q_k)`), where the
    /// reference multiplies each code by its scale first (`sum_k x_k (q_k s_b)`): the same sum in
    /// another rounding order, not the same f32 products as the panels' path.
    pub fn from_fp8(w: &Fp8Weight) -> Option<Self> {
        available().then(|| Tiles::of_fp8(w)).flatten()
    }

    fn of_fp8(w: &Fp8Weight) -> Option<Self> {
        let ([n, k], [_, bc]) = (w.shape(), w.block());
        if !bc.is_multiple_of(TK) {
            return None;
        }
        let scale = w.scales_by_rows(BLOCK)?;
        let bf16 = codes_as_bf16();
        Some(Tiles { data: vnni(w.bytes(), n, k, |q| bf16[q as usize]), n, k, scale: Some((scale, bc)) })
    }

    /// `[n, k]`: outputs, inputs.
    pub fn shape(&self) -> [usize; 2] {
        [self.n, self.k]
    }

    /// Inputs, padded to whole tiles.
    fn kp(&self) -> usize {
        self.k.div_ceil(TK) * TK
    }

    /// Inputs per pass: KC, or for block-FP8 the most whole blocks that fit (at least one), so
    /// no block crosses a pass.
    fn pass(&self) -> usize {
        match &self.scale {
            Some((_, bc)) => (KC / bc).max(1) * bc,
            None => KC,
        }
    }
}

/// `w` `[n, k]` row-major, each value mapped by `f` to bf16 bits, in AMX order (padded with
/// zeros). A group's 16 rows are read 64 inputs at a time, so the interleaved writes stay in 2 KB.
fn vnni<T: Copy + Sync>(w: &[T], n: usize, k: usize, f: impl Fn(T) -> u16 + Sync) -> Vec<u16> {
    const RUN: usize = 64;
    let kp = k.div_ceil(TK) * TK;
    let groups = n.div_ceil(BLOCK) * 2;
    let mut data = vec![0u16; groups * kp * TN];
    data.par_chunks_mut((kp * TN).max(1)).enumerate().for_each(|(g, group)| {
        for k0 in (0..k).step_by(RUN) {
            let k1 = (k0 + RUN).min(k);
            for c in 0..TN.min(n.saturating_sub(g * TN)) {
                let row = &w[(g * TN + c) * k..(g * TN + c + 1) * k];
                for (kk, &v) in row.iter().enumerate().take(k1).skip(k0) {
                    group[(kk / 2) * 2 * TN + 2 * c + kk % 2] = f(v);
                }
            }
        }
    });
    data
}

/// `x` as three bf16 values (bit patterns) whose sum is exactly `x`: each takes the top 8
/// significant bits of what the ones before left (truncation, so none can overflow, and each
/// remainder is exact in f32). A NaN or an infinity is carried whole by `hi`.
#[inline(always)]
fn split(x: f32) -> [u16; 3] {
    let top = |v: f32| (v.to_bits() >> 16) as u16;
    let wide = |b: u16| f32::from_bits((b as u32) << 16);
    let finite = x.is_finite();
    let hi = if x.is_nan() { 0x7FC0 } else { top(x) }; // (a NaN's payload may lie in the low bits)
    let r = x - wide(hi); // the low 16 bits of x's significand: exact
    let mid = if finite { top(r) } else { 0 };
    let lo = if finite { top(r - wide(mid)) } else { 0 }; // at most 8 significant bits left: exact
    [hi, mid, lo]
}

/// One row of `x` split into its three bf16 rows, `row` being `[hi | mid | lo]`, each as long as
/// the padded pass. The padding is zeroed: the weights' padding is zero, but what an earlier pass
/// left there may be an infinity, and infinity x 0 is NaN.
fn split_row(x: &[f32], row: &mut [u16]) {
    let width = row.len() / 3;
    let (hi, rest) = row.split_at_mut(width);
    let (mid, lo) = rest.split_at_mut(width);
    for (((&v, h), m), l) in x.iter().zip(&mut *hi).zip(&mut *mid).zip(&mut *lo) {
        [*h, *m, *l] = split(v);
    }
    for part in [hi, mid, lo] {
        part[x.len()..].fill(0);
    }
}

/// `x W^T`: x `[m, k]` row-major -> `[m, n]` row-major, on rayon's pool (a task per 32 outputs).
pub fn matmul(x: &[f32], m: usize, w: &Tiles) -> Vec<f32> {
    let ([n, k], kp) = (w.shape(), w.kp());
    // A pass's activations: row r is hi at r * stride, mid and lo after it. The rows past `rows`
    // are left as they are: each tile row of outputs reads only its own row of activations, and
    // those outputs are not kept.
    let lay = |parts: &mut [u16], p: Pass| {
        let stride = 3 * p.kcp();
        parts[..p.rows * stride].par_chunks_mut(stride).enumerate().for_each(|(r, row)| {
            split_row(&x[(p.m0 + r) * k + p.k0..(p.m0 + r) * k + p.k0 + p.kc], row);
        });
    };
    product(x, m, [n, k], w.pass(), lay, |j, parts, p, out| {
        let (kcp, stride) = (p.kcp(), 3 * p.kcp());
        let at = |g: usize| (g * kp + p.k0) * TN; // group g's weights from input k0
        let (b0, b1) = (&w.data[at(2 * j)..at(2 * j) + kcp * TN], &w.data[at(2 * j + 1)..at(2 * j + 1) + kcp * TN]);
        let scale = block_scales(&w.scale, j, k, p.k0);
        let mut c = [0f32; BLOCK * BLOCK]; // [token][output]
        for i0 in (0..p.rows).step_by(BLOCK) {
            let a = [0, 1, 2].map(|q| &parts[i0 * stride + q * kcp..(i0 + BLOCK) * stride]);
            // SAFETY: `product` configured the tiles; each slice holds the 32 x kcp (or kcp / 2
            // x 32) values the kernel reads, and c the 32 x 32 it writes.
            unsafe { tiles::block((a, stride), ([[b0, b1]], TK), kcp / TK, scale, &mut c) };
            store(out, [n, p.m0 + i0, j, BLOCK.min(p.rows - i0)], p.k0 == 0, |r, o| c[r * BLOCK + o]);
        }
    })
}

/// One pass of a product: token rows `m0 .. m0 + rows` (`mp` with the padding to 32) and inputs
/// `k0 .. k0 + kc`.
#[derive(Clone, Copy)]
struct Pass {
    m0: usize,
    rows: usize,
    mp: usize,
    k0: usize,
    kc: usize,
}

impl Pass {
    /// The pass's inputs padded to whole tile steps.
    fn kcp(&self) -> usize {
        self.kc.div_ceil(TK) * TK
    }
}

/// The loops [`matmul`] and [`matmul_in_place`] share, for `y = x W^T` `[m, n]`: passes of up to
/// MC token rows and `width` inputs; `lay` splits a pass's activations into the buffer in its
/// kernel's order, then a task per 32 outputs `j` runs `task(j, buffer, pass, y)` on rayon's
/// pool with the tiles configured.
fn product(
    x: &[f32],
    m: usize,
    [n, k]: [usize; 2],
    width: usize,
    lay: impl Fn(&mut [u16], Pass),
    task: impl Fn(usize, &[u16], Pass, &Out) + Sync,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "amx: x has {} values, not {m} x {k}", x.len());
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 || !available() {
        return y; // (`Tiles` and `InPlace` exist only where `available`.)
    }
    let mut parts = vec![0u16; 3 * MC * width.div_ceil(TK) * TK];
    let out = Out(y.as_mut_ptr());
    for m0 in (0..m).step_by(MC) {
        let rows = MC.min(m - m0);
        for k0 in (0..k).step_by(width) {
            let p = Pass { m0, rows, mp: rows.div_ceil(BLOCK) * BLOCK, k0, kc: width.min(k - k0) };
            lay(&mut parts, p);
            let parts = &parts;
            (0..n.div_ceil(BLOCK)).into_par_iter().for_each(|j| {
                // SAFETY: `available` (checked above) says this CPU has the tiles and the OS
                // granted them; each task configures them before use and releases them after.
                unsafe { tiles::configure() };
                task(j, parts, p, &out);
                // SAFETY: as `configure`.
                unsafe { tiles::release() };
            });
        }
    }
    y
}

/// A bf16 or block-FP8 weight multiplied where it lies, for its first product
/// ([`matmul_in_place`]): the memory-mapped checkpoint's `[n, k]` rows are the left operand of a
/// tile product as they are (16 rows of 32 inputs, `k` values apart), so nothing is copied or
/// reordered, but the last `n % 32` outputs (copied, padded with zero rows, so no tile reads past
/// the weight); FP8 codes are widened to bf16 (exactly) 32 rows and one pass of inputs at a
/// time, into a task's buffer. The tiles then hold the outputs' transpose, turned as they are
/// stored, and the split activations go to the right operand in VNNI order. Measured against
/// [`Tiles`] (docs/performance.md): no packing (a one-off run's first prefill about half as
/// long, and no second copy of the weights), but slower products (0.75-1.0x
/// `examples/matmul_layouts`, least at few rows; a whole prefill 1.3x as long): a checkpoint's
/// rows are not 64-byte aligned, so a tile row straddles two lines, and 32 rows are 32 streams
/// to prefetch. So a weight multiplied again is packed (`nn::Packing`). Inputs must be whole
/// tile steps; FP8 blocks must fit the tiles as for [`Tiles::from_fp8`], and are scaled the same
/// way.
pub struct InPlace {
    src: Source,
    n: usize,
    k: usize,
    /// bf16: the last `n % 32` rows padded to 32, `[32][k]` (empty when `n` is a multiple of 32).
    tail: Vec<u16>,
    /// Block-FP8: as [`Tiles`]' scale.
    scale: Option<(Vec<f32>, usize)>,
}

enum Source {
    Bf16(Bf16Weight),
    Fp8(Fp8Weight),
}

impl InPlace {
    /// None where the tiles do not run, or the inputs are not a multiple of 32.
    pub fn new(w: &Bf16Weight) -> Option<Self> {
        (available() && w.cols.is_multiple_of(TK)).then(|| InPlace::of(w))
    }

    fn of(w: &Bf16Weight) -> Self {
        let (n, k, full) = (w.rows, w.cols, w.rows / BLOCK * BLOCK);
        let mut tail = Vec::new();
        if full < n {
            tail = vec![0u16; BLOCK * k];
            tail[..(n - full) * k].copy_from_slice(&w.bits()[full * k..]);
        }
        InPlace { src: Source::Bf16(w.clone()), n, k, tail, scale: None }
    }

    /// None where the tiles do not run, the inputs are not a multiple of 32, or the blocks do not
    /// fit the tiles ([`Tiles::from_fp8`]).
    pub fn from_fp8(w: &Fp8Weight) -> Option<Self> {
        available().then(|| InPlace::of_fp8(w)).flatten()
    }

    fn of_fp8(w: &Fp8Weight) -> Option<Self> {
        let ([n, k], [_, bc]) = (w.shape(), w.block());
        if !k.is_multiple_of(TK) || !bc.is_multiple_of(TK) {
            return None;
        }
        let scale = Some((w.scales_by_rows(BLOCK)?, bc));
        Some(InPlace { src: Source::Fp8(w.clone()), n, k, tail: Vec::new(), scale })
    }

    /// `[n, k]`: outputs, inputs.
    pub fn shape(&self) -> [usize; 2] {
        [self.n, self.k]
    }

    /// Inputs per pass, as [`Tiles`]'.
    fn pass(&self) -> usize {
        match &self.scale {
            Some((_, bc)) => (KC / bc).max(1) * bc,
            None => KC,
        }
    }

    /// Outputs `32 j .. 32 j + 32`'s rows from input `k0` as bf16 and their stride: a bf16
    /// weight's own (or the padded tail), or `kc` inputs of FP8 codes widened into `buf`.
    fn block_rows<'a>(&'a self, j: usize, k0: usize, kc: usize, buf: &'a mut Vec<u16>) -> (&'a [u16], usize) {
        let k = self.k;
        match &self.src {
            Source::Bf16(w) => match w.bits().get(j * BLOCK * k..(j + 1) * BLOCK * k) {
                Some(rows) => (&rows[k0..], k),
                None => (&self.tail[k0..], k),
            },
            Source::Fp8(w) => {
                let bf16 = codes_as_bf16();
                buf.clear();
                buf.resize(BLOCK * kc, 0); // rows past n stay zero
                let codes = &w.bytes()[j * BLOCK * k..];
                for (row, out) in codes.chunks(k).zip(buf.chunks_mut(kc)) {
                    out.iter_mut().zip(&row[k0..k0 + kc]).for_each(|(o, &q)| *o = bf16[q as usize]);
                }
                (buf, kc)
            }
        }
    }
}

/// Rows `m0 .. m0 + rows` of `x` (`[.., k]`), inputs `k0 .. k0 + kc` (`kc` a multiple of 32),
/// split into hi, mid and lo, each in VNNI order in `parts[p]`: `[kc / 2][mp][2]` (input pair,
/// token, the pair's values). The tokens past `rows` are left as they are: each token's column
/// feeds only that token's outputs, which are not kept.
fn split_pass(x: &[f32], [k, m0, rows, k0, kc]: [usize; 5], mp: usize, parts: [&mut [u16]; 3]) {
    const PAIRS: usize = TK / 2; // a task: one tile step's pairs
    let [hi, mid, lo] = parts;
    let chunk = PAIRS * 2 * mp;
    let steps = hi.par_chunks_mut(chunk).zip(mid.par_chunks_mut(chunk)).zip(lo.par_chunks_mut(chunk));
    steps.enumerate().for_each(|(step, ((hi, mid), lo))| {
        for p in 0..hi.len() / (2 * mp) {
            let i = 2 * (step * PAIRS + p); // the pair's first input in the pass
            let at = p * 2 * mp;
            for r in 0..rows {
                let row = &x[(m0 + r) * k + k0..(m0 + r) * k + k0 + kc];
                for e in 0..2 {
                    let [h, m, l] = split(row[i + e]);
                    (hi[at + 2 * r + e], mid[at + 2 * r + e], lo[at + 2 * r + e]) = (h, m, l);
                }
            }
        }
    });
}

/// `x W^T` with `w` where it lies: as [`matmul`].
pub fn matmul_in_place(x: &[f32], m: usize, w: &InPlace) -> Vec<f32> {
    let [n, k] = w.shape();
    // A pass's activations: [hi, mid, lo][kc / 2][mp][2] (`kc` a multiple of 32, as k).
    let lay = |parts: &mut [u16], p: Pass| {
        let (hi, rest) = parts[..3 * p.kc * p.mp].split_at_mut(p.kc * p.mp);
        let (mid, lo) = rest.split_at_mut(p.kc * p.mp);
        split_pass(x, [k, p.m0, p.rows, p.k0, p.kc], p.mp, [hi, mid, lo]);
    };
    product(x, m, [n, k], w.pass(), lay, |j, parts, p, out| {
        let (kc, mp) = (p.kc, p.mp);
        let mut buf = Vec::new();
        let (a, sa) = w.block_rows(j, p.k0, kc, &mut buf);
        let scale = block_scales(&w.scale, j, k, p.k0);
        let mut c = [0f32; BLOCK * BLOCK]; // [output][token]
        for i0 in (0..p.rows).step_by(BLOCK) {
            let part = |q: usize, h: usize| &parts[q * kc * mp + 2 * (i0 + h * TM)..(q + 1) * kc * mp];
            let b = [0, 1, 2].map(|q| [part(q, 0), part(q, 1)]);
            // SAFETY: `product` configured the tiles; a holds 32 rows of sa values (kc of each
            // read), each b tile kc / 2 rows of 2 mp values (32 of each read), c the 32 x 32
            // written.
            unsafe { tiles::block(([a], sa), (b, 2 * mp), kc / TK, scale, &mut c) };
            store(out, [n, p.m0 + i0, j, BLOCK.min(p.rows - i0)], p.k0 == 0, |r, o| c[o * BLOCK + r]);
        }
    })
}

/// Block-FP8: outputs `32 j ..`'s scales from the block of input `k0` on, and the tile steps in a
/// block.
fn block_scales(scale: &Option<(Vec<f32>, usize)>, j: usize, k: usize, k0: usize) -> Option<(&[f32], usize)> {
    scale.as_ref().map(|(s, bc)| {
        let blocks = k.div_ceil(*bc);
        (&s[j * blocks + k0 / bc..(j + 1) * blocks], bc / TK)
    })
}

/// Writes (`first`) or adds a block of results into `y` (`[.., n]` at `out`): `rows` token rows
/// from `row0`, outputs `32 j ..` (as many as `n` has), token `r`'s output `o` being `c(r, o)`.
fn store(out: &Out, [n, row0, j, rows]: [usize; 4], first: bool, c: impl Fn(usize, usize) -> f32) {
    let cols = BLOCK.min(n - j * BLOCK);
    for r in 0..rows {
        // SAFETY: row row0 + r < m of y and outputs 32 j .. 32 j + cols <= n, which only this
        // task writes (one task per 32 outputs; passes over k run one after another).
        let y_row = unsafe { std::slice::from_raw_parts_mut(out.0.add((row0 + r) * n + j * BLOCK), cols) };
        if first {
            y_row.iter_mut().enumerate().for_each(|(o, y)| *y = c(r, o));
        } else {
            y_row.iter_mut().enumerate().for_each(|(o, y)| *y += c(r, o));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::asm;
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

    /// Tile steps ahead that a weight group's tiles are prefetched: the first block of token rows
    /// reads each weight from memory, and the tile loads stalled on it (22% of the kernel's
    /// samples on one load). 128-token prefill, alternating: 0.75-0.78 s against 0.80-0.84 s.
    const AHEAD: usize = 8;

    use super::{BLOCK, TK, TM, TN};

    /// The tile configuration (`ldtilecfg`'s 64-byte operand): palette 1, eight tiles of 16
    /// rows x 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: Config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Loads [`CONFIG`] into this thread's tile unit.
    ///
    /// # Safety
    /// The CPU has AMX and the OS granted this process the tile data (`super::available`).
    pub unsafe fn configure() {
        asm!("ldtilecfg [{0}]", in(reg) &CONFIG, options(nostack, readonly));
    }

    /// Returns the tiles to their initial state (so a context switch does not save 8 KB of them).
    ///
    /// # Safety
    /// As [`configure`].
    pub unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// `c[32][32] = sum over steps of a . b` over the parts of one side, for the 32 rows of `a`
    /// (each part's two tiles of 16 rows `sa` bf16 apart, 32 inputs a step) and the 32 columns of
    /// `b` (each part's two tiles, of 16 columns in VNNI order, 16 input pairs a step, rows `sb`
    /// bf16 apart), `steps` of 32 inputs. One side has a part (the weight), the other three
    /// (the split activations' hi, mid and lo): the weight's tiles are loaded once a step.
    /// With `scale` (block-FP8: a scale per block of `per` steps), each block's sum times its
    /// scale.
    ///
    /// # Safety
    /// As [`configure`], after it on this thread; the slices hold what is read (checked in debug).
    pub unsafe fn block<const PA: usize, const PB: usize>(
        (a, sa): ([&[u16]; PA], usize),
        (b, sb): ([[&[u16]; 2]; PB], usize),
        steps: usize,
        scale: Option<(&[f32], usize)>,
        c: &mut [f32; BLOCK * BLOCK],
    ) {
        debug_assert!(PA == 1 || PB == 1);
        debug_assert!(steps == 0 || a.iter().all(|a| a.len() >= (BLOCK - 1) * sa + steps * TK));
        debug_assert!(steps == 0 || b.iter().flatten().all(|b| b.len() >= (steps * TK / 2 - 1) * sb + 2 * TN));
        let Some((scale, per)) = scale else {
            products((a, sa), (b, sb), 0..steps);
            return store(c);
        };
        debug_assert!(per > 0 && scale.len() >= steps.div_ceil(per));
        let mut sum = [0f32; BLOCK * BLOCK];
        for (s0, &sv) in (0..steps).step_by(per).zip(scale) {
            products((a, sa), (b, sb), s0..(s0 + per).min(steps));
            store(c);
            add_scaled(&mut sum, sv, c);
        }
        *c = sum;
    }

    /// tmm0-3 = the sum over `steps` of the 12 tile products each. The tile registers carry
    /// values from one `asm!` block to the next (`load_a`, `load_b`, `dot`), which Rust's rules
    /// for inline assembly do not promise; it holds because the compiler never allocates tile
    /// registers itself, and the tests would show the day it did. (The prefetch stays within
    /// `steps`, so a block-FP8 scale block of 4 steps prefetches nothing; prefetching across
    /// scale blocks measured no different: 0.85-0.98 s against 0.88-1.00 s a 128-token prefill.)
    #[inline(always)]
    unsafe fn products<const PA: usize, const PB: usize>(
        (a, sa): ([&[u16]; PA], usize),
        (b, sb): ([[&[u16]; 2]; PB], usize),
        steps: std::ops::Range<usize>,
    ) {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        let a_at = |a: &[u16], s: usize| a.as_ptr().add(s * TK); // a step's first tile
        let b_at = |b: &[u16], s: usize| b.as_ptr().add(s * (TK / 2) * sb);
        let end = steps.end;
        for s in steps {
            // The weight's tiles AHEAD steps on: 32 rows of 64 bytes, each of which may straddle
            // two lines (rows in place are not 64-byte aligned).
            if s + AHEAD < end {
                let rows: [*const u16; 2] = if PA == 1 {
                    [a_at(a[0], s + AHEAD), a_at(a[0], s + AHEAD).add(TM * sa)]
                } else {
                    [b_at(b[0][0], s + AHEAD), b_at(b[0][1], s + AHEAD)]
                };
                let gap = if PA == 1 { sa } else { sb };
                for tile in rows {
                    for r in 0..16 {
                        let at = tile.add(r * gap).cast::<i8>();
                        _mm_prefetch::<_MM_HINT_T0>(at);
                        _mm_prefetch::<_MM_HINT_T0>(at.add(63));
                    }
                }
            }
            if PA == 1 {
                load_a(a_at(a[0], s), sa);
                for [b0, b1] in b {
                    load_b(b_at(b0, s), b_at(b1, s), sb);
                    dot();
                }
            } else {
                load_b(b_at(b[0][0], s), b_at(b[0][1], s), sb);
                for part in a {
                    load_a(a_at(part, s), sa);
                    dot();
                }
            }
        }
    }

    /// tmm4-5 = rows 0-15 and 16-31 from `a0`, rows `sa` bf16 apart.
    #[inline(always)]
    pub unsafe fn load_a(a0: *const u16, sa: usize) {
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            a0 = in(reg) a0, a1 = in(reg) a0.add(TM * sa), sa = in(reg) sa * 2,
            options(nostack, readonly),
        );
    }

    /// tmm6-7 = the tiles at `b0` and `b1`, rows `sb` bf16 apart.
    #[inline(always)]
    pub unsafe fn load_b(b0: *const u16, b1: *const u16, sb: usize) {
        asm!(
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            b0 = in(reg) b0, b1 = in(reg) b1, sb = in(reg) sb * 2,
            options(nostack, readonly),
        );
    }

    /// tmm0-3 += the four products of tmm4-5 by tmm6-7.
    #[inline(always)]
    pub unsafe fn dot() {
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            options(nostack, nomem),
        );
    }

    /// c = tmm0-3, as 32 rows of 32.
    #[inline(always)]
    unsafe fn store(c: &mut [f32; BLOCK * BLOCK]) {
        let (c0, sc) = (c.as_mut_ptr(), BLOCK * 4); // c rows are 128 bytes apart
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            c0 = in(reg) c0, c1 = in(reg) c0.add(TN), c2 = in(reg) c0.add(16 * BLOCK), c3 = in(reg) c0.add(16 * BLOCK + TN),
            sc = in(reg) sc,
            options(nostack),
        );
    }

    /// `sum += s * c` (the loop vectorises under the feature; `super::available` implies it).
    #[target_feature(enable = "avx512f")]
    unsafe fn add_scaled(sum: &mut [f32; BLOCK * BLOCK], s: f32, c: &[f32; BLOCK * BLOCK]) {
        for (y, &v) in sum.iter_mut().zip(c) {
            *y += s * v;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod tiles {
    pub unsafe fn configure() {}
    pub unsafe fn release() {}
    pub unsafe fn dot() {}
    pub unsafe fn load_a(_: *const u16, _: usize) {}
    pub unsafe fn load_b(_: *const u16, _: *const u16, _: usize) {}
    pub unsafe fn block<const PA: usize, const PB: usize>(
        _: ([&[u16]; PA], usize),
        _: ([[&[u16]; 2]; PB], usize),
        _: usize,
        _: Option<(&[f32], usize)>,
        _: &mut [f32; super::BLOCK * super::BLOCK],
    ) {
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Block-FP8: a view starting 32 rows into the stored weight (a tile block's boundary, not a
    /// block's), blocks of 64 x 96 (3 tile steps each; passes of 10 blocks, the last pass and
    /// block partial), 70 outputs, 45 rows, against the f64 sum of the f32 dequantisation.
    /// Blocks that do not fit are refused (rows of 48, inputs of 100, a view from row 16).
    #[test]
    fn fp8_tiles_multiply_as_the_dequantised_weight() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 here (or GLIMPSE_NO_AMX / GLIMPSE_NO_AVX512 set)");
            return;
        }
        let (rows, k, block) = (128, 2000, [64, 96]);
        let codes: Vec<u8> = (0..rows * k).map(|i| ((i * 37 + 11) % 256) as u8 & 0xf7).collect(); // no NaN codes
        let scale: Vec<f32> = (0..2 * 21).map(|i| 0.25 + i as f32 * 0.125).collect();
        let stored = Fp8Weight::from_codes(&codes, [rows, k], scale, block).unwrap();
        let view = stored.rows(32, 70).unwrap();
        let tiles = Tiles::of_fp8(&view).unwrap();
        assert_eq!(tiles.pass(), 960);
        let m = 45;
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.6180).sin() * 1.001).collect();
        assert_matches_sum(&matmul(&x, m, &tiles), &x, &view.to_f32(), (m, 70, k));
        assert!(InPlace::of_fp8(&view).is_none(), "2000 inputs are not whole tile steps");
        // In place, the same view's rows: two passes of 10 blocks; a partial last block; blocks
        // wider than a pass.
        for (k, block) in [(1920usize, [64, 96]), (1952, [64, 96]), (2560, [64, 1280])] {
            let scale = (0..2 * k.div_ceil(block[1])).map(|i| 0.5 + i as f32 * 0.25).collect();
            let stored =
                Fp8Weight::from_codes(&codes[..rows * k.min(2000)].repeat(2)[..rows * k], [rows, k], scale, block);
            let view = stored.unwrap().rows(32, 70).unwrap();
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.6180).sin() * 1.001).collect();
            let y = matmul_in_place(&x, m, &InPlace::of_fp8(&view).unwrap());
            assert_matches_sum(&y, &x, &view.to_f32(), (m, 70, k));
        }
        for (block, row0) in [([48, 128], 0), ([64, 100], 0), ([64, 128], 16)] {
            let scales = rows.div_ceil(block[0]) * k.div_ceil(block[1]);
            let w = Fp8Weight::from_codes(&codes, [rows, k], vec![1.0; scales], block).unwrap();
            assert!(Tiles::of_fp8(&w.rows(row0, 32).unwrap()).is_none(), "{block:?} from row {row0}");
        }
    }

    /// hi + mid + lo is x, for values across the exponent range, both signs, and the
    /// non-finite ones.
    #[test]
    fn split_is_exact() {
        let wide = |b: u16| f32::from_bits((b as u32) << 16);
        let mut state = 0x9E37_79B9u32;
        for i in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let x = f32::from_bits(state);
            if !x.is_finite() || x.abs() < 1e-30 {
                continue; // (below that, lo would be an f32 denormal)
            }
            let [hi, mid, lo] = split(x);
            // In the order the tiles add them (hi first); exact, so any order gives x.
            assert_eq!(wide(hi) + wide(mid) + wide(lo), x, "value {i}: {x:e}");
        }
        assert!(wide(split(f32::NAN)[0]).is_nan());
        assert_eq!(split(f32::NEG_INFINITY), [0xFF80, 0, 0]);
        assert_eq!(split(f32::MAX).map(wide).iter().sum::<f32>(), f32::MAX);
    }

    /// Sizes off every block (32 x 32 blocks, 16-row tiles, the 32-input step, the KC pass and
    /// MC's rows), activations that need all 24 bits, against an f64 sum, within 3e-7 of the sum
    /// of the terms' sizes: f32 accumulation measured 7e-8 at most here, and dropping `lo` (2^-16
    /// of each product) 1.2e-6.
    #[test]
    fn tiles_multiply_as_the_plain_sum() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 here (or GLIMPSE_NO_AMX / GLIMPSE_NO_AVX512 set)");
            return;
        }
        let cases = [
            (13, 45, 77),
            (1, 32, 600),
            (33, 1, 1030),
            (32, 64, 512),
            (300, 49, 2100),
            (7, 7, 9),
            (5, 7, 0),
            (130, 45, 64),
            (40, 70, 1088),
        ];
        for (m, n, k) in cases {
            // Rows 2 bytes past a 64-byte line, as a checkpoint's may be (`test_matrix`).
            let w = Bf16Weight::test_matrix(n, k);
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.6180).sin() * 1.001).collect();
            let wide: Vec<f32> = w.bits().iter().map(|&b| super::super::gemv::widen(b)).collect();
            assert_matches_sum(&matmul(&x, m, &Tiles::of(&w)), &x, &wide, (m, n, k));
            if k % TK == 0 {
                assert_matches_sum(&matmul_in_place(&x, m, &InPlace::of(&w)), &x, &wide, (m, n, k));
            }
        }
        // An infinity in row 0 of the first pass lies where the second pass (6 inputs, padded to
        // 32) keeps row 5's padding: row 0 is not finite, and row 5 must still be.
        let (m, n, k) = (8, 4, 1030);
        let mut x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.6180).sin()).collect();
        x[5 * 3 * 32 + 10] = f32::INFINITY;
        let y = matmul(&x, m, &Tiles::of(&Bf16Weight::test_matrix(n, k)));
        assert!(!y[..n].iter().all(|v| v.is_finite()) && y[5 * n..6 * n].iter().all(|v| v.is_finite()), "{y:?}");
        // In place, token 0's infinity reaches its own outputs only (tokens are the tiles'
        // columns there).
        let (m, n, k) = (3, 40, 64);
        let mut x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.6180).sin()).collect();
        x[7] = f32::INFINITY;
        let y = matmul_in_place(&x, m, &InPlace::of(&Bf16Weight::test_matrix(n, k)));
        assert!(!y[..n].iter().all(|v| v.is_finite()) && y[n..].iter().all(|v| v.is_finite()), "{y:?}");
    }

    /// y [m, n] against the f64 sum of x [m, k] times w [n, k]^T, within 3e-7 of the sum of the
    /// terms' sizes.
    fn assert_matches_sum(y: &[f32], x: &[f32], w: &[f32], (m, n, k): (usize, usize, usize)) {
        assert_eq!(y.len(), m * n);
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|c| w[j * k + c] as f64 * x[i * k + c] as f64);
                let (want, size): (f64, f64) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                let got = y[i * n + j] as f64;
                assert!(
                    (got - want).abs() <= 3e-7 * size + 1e-30,
                    "[{m}, {n}, {k}] at ({i}, {j}): {got} vs {want} (sum of |terms| {size})"
                );
            }
        }
    }
}
