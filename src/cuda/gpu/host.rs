//! The emulation's buffers: host memory standing where a GPU holds device memory, each counted
//! in its engine's [`Tally`] while it lives, so what a prefill holds at once can be checked
//! against `cuda::working_set` without a GPU. And on either engine, the names of the kernels
//! launched, so `selftest` can tell a kernel no check ran.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::{Engine, Gpu};

/// The emulation's buffers' bytes: alive now, and the most alive at once since
/// [`Gpu::reset_peak`]. What the emulation holds where a GPU would hold device memory, so the
/// working set `memory::check_device` estimates is checked against it (tests/cuda_emu.rs).
#[derive(Default)]
pub struct Tally {
    pub(super) live: AtomicU64,
    pub(super) peak: AtomicU64,
}

/// An emulated buffer: host memory of a fixed length (a slice to its users, as device memory
/// is), counted in its engine's [`Tally`] while it lives.
pub struct HostVec<T> {
    v: Vec<T>,
    bytes: u64,
    tally: Arc<Tally>,
}

impl<T> HostVec<T> {
    pub(super) fn new(v: Vec<T>, tally: &Arc<Tally>) -> Self {
        let bytes = std::mem::size_of_val(&v[..]) as u64;
        let live = tally.live.fetch_add(bytes, Relaxed) + bytes;
        tally.peak.fetch_max(live, Relaxed);
        HostVec { v, bytes, tally: tally.clone() }
    }
}

impl<T> Drop for HostVec<T> {
    fn drop(&mut self) {
        self.tally.live.fetch_sub(self.bytes, Relaxed);
    }
}

impl<T> std::ops::Deref for HostVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.v
    }
}

impl<T> std::ops::DerefMut for HostVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.v
    }
}

impl Gpu {
    /// The emulation's buffers: (bytes alive now, the most alive at once since
    /// [`Gpu::reset_peak`]); None on a GPU.
    pub fn emulated_bytes(&self) -> Option<(u64, u64)> {
        match self.engine {
            Engine::Emulated(_) => Some((self.tally.live.load(Relaxed), self.tally.peak.load(Relaxed))),
            Engine::Cuda { .. } => None,
        }
    }

    /// Restarts the emulation's peak from what is alive now.
    pub fn reset_peak(&self) {
        self.tally.peak.store(self.tally.live.load(Relaxed), Relaxed);
    }

    /// The names of the kernels launched on this GPU so far.
    pub fn launched(&self) -> std::collections::BTreeSet<&'static str> {
        let bits = self.launched.load(Relaxed);
        let entries = crate::cuda::resources::LARGEST_BLOCK.iter().enumerate();
        entries.filter(|(i, _)| bits >> i & 1 == 1).map(|(_, &(name, _))| name).collect()
    }
}
