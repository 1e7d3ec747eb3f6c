//! The causal top-k's launchers (kernels in `indexer.cu`): which path a row length takes, and
//! the rounds of the chunked one.

use super::{emu, fits, ints, per_item, Buf, Engine, Gpu, KernelArg};
use crate::error::{Error, Result};

/// How the causal top-k ranks a row (`Gpu::topk_causal_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopK {
    /// `topk_causal`: each key counts the keys that beat it, O(T) per key.
    Ranked,
    /// `topk_sorted`: a bitonic sort of the row in shared memory, O(T log^2 T) per row.
    Sorted,
    /// `topk_chunks_of_*`: rows longer than the shared memory holds, sorted by chunks of `chunk`
    /// keys (a power of two, at least 2 (K + 1)), each keeping its best K + 1, round after round
    /// until one chunk is left: about O(T log^2 chunk) per row.
    Chunked { chunk: usize },
}

impl Gpu {
    /// How a top-k of `k` over `t` keys ranks: sorted while a row fits the shared memory, then
    /// by chunks as large as it holds, and by ranks where even a chunk of 2 (k + 1) does not fit.
    pub fn topk_path(&self, t: usize, k: usize) -> TopK {
        let fitting = |n: usize| 8 * n.next_power_of_two() <= self.shared_limit;
        if fitting(t) {
            TopK::Sorted
        } else if fitting(2 * (k + 1)) {
            let chunk = (self.shared_limit / 8 + 1).next_power_of_two() / 2; // the largest that fits
            TopK::Chunked { chunk }
        } else {
            TopK::Ranked
        }
    }

    /// Rows `row0 .. row0 + rows` of idx `[*, K]` and margin `[*]` for queries that see no more
    /// than K keys: each keeps every causal key whatever its scores, listed `0 .. K` (padding
    /// past the query), margin +inf (`Selection::every_key`).
    pub fn every_key(
        &self,
        idx: &mut Buf<i32>,
        margin: &mut Buf<f32>,
        row0: usize,
        rows: usize,
        k: usize,
    ) -> Result<()> {
        fits("every_key", &[(idx.len(), (row0 + rows) * k), (margin.len(), row0 + rows)])?;
        let ([k32], row0, rows64) = (ints("every_key", [k])?, row0 as i64, rows as i64);
        launch!(self, "every_key", per_item(rows, 256, 0), [idx, margin, &row0, &rows64, &k32])
    }

    /// scores: `[rows, T]` (rows = B*S) -> idx: `[rows, K]`; margin: `[rows]`, ranked on `path`
    /// ([`Gpu::topk_path`] picks one); dims = [rows, S, T, offset, K].
    pub fn topk_causal_by(
        &self,
        path: TopK,
        scores: &Buf<f32>,
        [rows, s, t, offset, k]: [usize; 5],
        idx: &mut Buf<i32>,
        margin: &mut Buf<f32>,
    ) -> Result<()> {
        // Unlike `Ops::topk_causal`, the rows may be a chunk of the queries (`attention::index_topk`):
        // their positions offset .. offset + s may end before the last key.
        if s == 0 || offset + s > t || !rows.is_multiple_of(s) || k == 0 || k > t {
            return Err(Error::Device(format!(
                "topk_causal: {rows} rows of {s} queries after {offset} do not fit {t} keys (k {k})"
            )));
        }
        fits("topk_causal", &[(scores.len(), rows * t), (idx.len(), rows * k), (margin.len(), rows)])?;
        let [s32, t32, o32, k32] = ints("topk_causal", [s, t, offset, k])?;
        let args = (&s32, &t32, &o32, &k32);
        match path {
            TopK::Ranked => launch!(
                self,
                "topk_causal",
                per_item(rows, 128, 0),
                [scores, args.0, args.1, args.2, args.3, idx, margin]
            ),
            TopK::Sorted => {
                let len = t.next_power_of_two();
                if 8 * len > self.shared_limit {
                    return Err(Error::Device(format!(
                        "topk_sorted: rows of {t} keys exceed the {} bytes of shared memory",
                        self.shared_limit
                    )));
                }
                // Half as many threads as slots: each compares one pair per stage.
                let block = (len / 2).clamp(32, 512) as u32;
                launch!(
                    self,
                    "topk_sorted",
                    per_item(rows, block, (8 * len) as u32),
                    [scores, args.0, args.1, args.2, args.3, idx, margin]
                )
            }
            TopK::Chunked { chunk } => self.topk_chunked(chunk, scores, [rows, s, t, offset, k], idx, margin),
        }
    }

    /// [`TopK::Chunked`]: round after round, each row's candidates (its causal keys, then the
    /// previous round's lists) are cut to the best K + 1 of each chunk, until one chunk is left;
    /// then `topk_emit`. The lists take rows x ceil(T / chunk) x (K + 1) x 8 bytes.
    fn topk_chunked(
        &self,
        chunk: usize,
        scores: &Buf<f32>,
        [rows, s, t, offset, k]: [usize; 5],
        idx: &mut Buf<i32>,
        margin: &mut Buf<f32>,
    ) -> Result<()> {
        let keep = k + 1;
        if !chunk.is_power_of_two() || chunk < 2 * keep || 8 * chunk > self.shared_limit {
            return Err(Error::Device(format!(
                "topk_chunks: chunks of {chunk} keys must be a power of two of at least 2 (K + 1) = {} in {} bytes \
                 of shared memory",
                2 * keep,
                self.shared_limit
            )));
        }
        // Round 0 reads the scores, each later one the lists before it.
        let mut n = t;
        let mut lists: Option<(Buf<f32>, Buf<i32>)> = None;
        loop {
            let chunks = n.div_ceil(chunk);
            let len = rows * chunks * keep;
            let mut next = (self.zeros::<f32>(len)?, self.zeros::<i32>(len)?);
            self.topk_round(lists.as_ref(), scores, [rows, n, s, offset, chunk, keep], &mut next)?;
            (lists, n) = (Some(next), chunks * keep);
            if chunks == 1 {
                break;
            }
        }
        let Some((score, pos)) = &lists else { return Ok(()) };
        let [n32, s32, t32, o32, k32] = ints("topk_emit", [n, s, t, offset, k])?;
        let rows64 = rows as i64;
        launch!(
            self,
            "topk_emit",
            per_item(rows, 256, 0),
            [score, pos, &rows64, &n32, &s32, &t32, &o32, &k32, idx, margin]
        )
    }

    /// One round of [`Gpu::topk_chunked`]: the best `keep` of each chunk of each row's `n`
    /// candidates (`pairs` of the round before, or the causal keys of `scores`) into `out`.
    fn topk_round(
        &self,
        pairs: Option<&(Buf<f32>, Buf<i32>)>,
        scores: &Buf<f32>,
        [rows, n, s, offset, chunk, keep]: [usize; 6],
        (out_score, out_pos): &mut (Buf<f32>, Buf<i32>),
    ) -> Result<()> {
        let chunks = n.div_ceil(chunk);
        // The kernel computes n + chunk - 1.
        let [n32, s32, o32, c32, keep32, _] = ints("topk_chunks", [n, s, offset, chunk, keep, n + chunk])?;
        let grid = per_item(rows * chunks, (chunk / 2).clamp(32, 512) as u32, (8 * chunk) as u32);
        let out = [(out_score.len(), rows * chunks * keep), (out_pos.len(), rows * chunks * keep)];
        match pairs {
            None => {
                fits("topk_chunks_of_scores", &[(scores.len(), rows * n), out[0], out[1]])?;
                launch!(
                    self,
                    "topk_chunks_of_scores",
                    grid,
                    [scores, &n32, &s32, &o32, &c32, &keep32, out_score, out_pos]
                )
            }
            Some((score, pos)) => {
                fits("topk_chunks_of_pairs", &[(score.len(), rows * n), (pos.len(), rows * n), out[0], out[1]])?;
                launch!(self, "topk_chunks_of_pairs", grid, [score, pos, &n32, &c32, &keep32, out_score, out_pos])
            }
        }
    }
}
