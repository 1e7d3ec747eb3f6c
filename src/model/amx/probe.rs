//! How fast this thread's tile unit multiplies and loads alone, nothing around it
//! (`examples/amx_peak.rs`): the ceiling under [`super::matmul`]'s rate, and how steady a
//! machine's tiles are.

use super::{available, tiles, TK, TM, TN};

/// What this thread's tile unit does alone ([`tile_rates`]).
#[derive(Debug, Clone, Copy)]
pub struct TileRates {
    /// GFLOP/s of bf16 tile products on registers alone (no memory touched): a ceiling for
    /// [`super::matmul`]'s rate.
    pub products_gflops: f64,
    /// Nanoseconds a tile load (16 rows of 64 bytes) takes from a 4 KB buffer in L1, loads only:
    /// [`super::matmul`] loads 8 tiles for each 12 products.
    pub load_ns: f64,
}

/// Times `rounds` x 4 tile products (16 x 16 x 32 each) of whatever the tiles hold, then
/// `rounds` x 4 tile loads, on this thread: a probe of how fast and how steady a machine's tiles
/// are (`examples/amx_peak.rs`). None where [`super::available`] is not.
pub fn tile_rates(rounds: usize) -> Option<TileRates> {
    if !available() {
        return None;
    }
    let buf = vec![1u16; 4 * TM * TK];
    let elapsed = |f: &dyn Fn()| {
        let t = std::time::Instant::now();
        f();
        t.elapsed().as_secs_f64().max(1e-12)
    };
    // SAFETY: `available` says the CPU has the tiles and the OS granted them; configured first,
    // released after, on this thread; `buf` holds the four tiles `load_a` and `load_b` read.
    unsafe {
        tiles::configure();
        let products = elapsed(&|| (0..rounds).for_each(|_| tiles::dot()));
        let loads = elapsed(&|| {
            (0..rounds).for_each(|_| {
                tiles::load_a(buf.as_ptr(), TK);
                tiles::load_b(buf.as_ptr().add(2 * TM * TK), buf.as_ptr().add(3 * TM * TK), TK);
            })
        });
        tiles::release();
        let flops = rounds as f64 * 4.0 * (TM * TN * TK * 2) as f64;
        Some(TileRates { products_gflops: flops / products / 1e9, load_ns: loads * 1e9 / (rounds as f64 * 4.0) })
    }
}
