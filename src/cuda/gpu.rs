//! One GPU, or its host emulation: every kernel compiled for it (NVRTC for the device's
//! architecture; build.rs for the emulation) and one typed launcher per kernel over [`Buf`]s.
//! Launchers write into buffers the caller allocates, so a parity check can poison them first
//! and see any element a kernel missed. Both engines take the same launch: the grid, the block,
//! and the arguments in the kernel's order.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use super::emu::{self, Param, Schedule};
use super::resources::{self, Usage};
use super::{compile_all, probe, Lib, KERNELS};
use crate::error::{Error, Result};

pub struct Gpu {
    /// The device's name and the architecture the kernels were compiled for (`sm_90` on Hopper).
    pub name: String,
    pub arch: String,
    /// The dynamic shared memory a block of the kernels that use much of it may take, in bytes:
    /// the device's opt-in maximum less the largest of their static shares.
    pub shared_limit: usize,
    /// Each kernel's registers, static shared memory and stack, as the driver states them (none
    /// in the emulation).
    pub kernels: Vec<(&'static str, Usage)>,
    /// How buffers are allocated, as `bench` reports it: a free that synchronises the device
    /// would serialise the forward pass, so a run's timing depends on it.
    pub allocation: String,
    /// The CUDA versions of the driver and of the NVRTC the loader found (cudarc tries several
    /// library names): machine code from an NVRTC newer than the driver does not load.
    pub versions: String,
    engine: Engine,
    /// Bytes copied to the device by [`Gpu::upload`] so far: a device model's weights are all
    /// uploaded so (`memory::device_weights` estimates them before a run).
    uploaded: std::sync::atomic::AtomicU64,
    /// The emulation's buffers (none are counted on a GPU).
    tally: Arc<Tally>,
    /// The kernels launched so far, bit i for entry i of `resources::LARGEST_BLOCK` (`selftest`
    /// checks that its checks ran every one): an atomic OR a launch, beside the lookup of the
    /// block's bound it makes anyway.
    launched: std::sync::atomic::AtomicU64,
    /// The bits [`Gpu::output`] fills a new buffer with, where set ([`Gpu::poison_outputs`]).
    poison: std::sync::atomic::AtomicU64,
}

/// [`Gpu::poison`]'s value when no poison is set: each engine's default.
const ENGINE_DEFAULT: u64 = u64::MAX;

/// The kernels given the device's whole opt-in shared memory.
const LARGE_SHARED: [&str; 5] =
    ["topk_sorted", "topk_chunks_of_scores", "topk_chunks_of_pairs", "sparse_attention", "flash_attention_bf16"];

/// The largest static shared memory of the [`LARGE_SHARED`] kernels on Hopper (`sparse_attention`:
/// its reductions' 256 bytes and the 1 KB `sm_90` reserves), for the emulation's limit.
const HOPPER_STATIC_SHARED: usize = 1280;

/// cudarc allocates from the device's default memory pool (`cuMemAllocAsync`) where the device
/// has pools. Its release threshold is 0 by default: every synchronisation hands the freed memory
/// back to the driver, and the next prefill pays to map it again, inside its timing. Raised to
/// the maximum, the pool grows to one prefill's peak and stays. Without pools, cudarc frees with
/// `cuMemFree`, which synchronises the device at every drop: said, as it slows every run. Only a
/// timing depends on it, so a pool that cannot be kept is said, not refused. (A kept pool is
/// not trimmed for allocations outside it, cuBLAS's and modules': fine while a prefill's peak
/// leaves room on the card.)
fn keep_pool(ctx: &CudaContext) -> String {
    if !ctx.has_async_alloc() {
        return "cuMemAlloc (no memory pools: each free synchronises the device)".into();
    }
    use cudarc::driver::{result, sys::CUmemPool_attribute};
    let mut keep: u64 = u64::MAX;
    // SAFETY: the context's own device; the release threshold is a cuuint64_t.
    let kept = unsafe {
        result::device::get_default_mem_pool(ctx.cu_device()).and_then(|pool| {
            let attr = CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
            result::mem_pool::set_attribute(pool, attr, (&mut keep as *mut u64).cast())
        })
    };
    match kept {
        Ok(()) => "stream-ordered, from a pool kept between prefills".into(),
        Err(e) => format!("stream-ordered, from a pool released at each synchronisation (keeping it failed: {e:?})"),
    }
}

/// What the emulation allows: Hopper's 227 KB opt-in, so the same sizes take the same paths.
const EMULATED_SHARED: usize = 227 * 1024 - HOPPER_STATIC_SHARED;

enum Engine {
    Cuda {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        functions: HashMap<&'static str, CudaFunction>,
    },
    /// The kernels' source compiled for the host (`cuda::emu`), run in this order; buffers are
    /// host memory.
    Emulated(Schedule),
}

/// A buffer of `T` where the engine keeps its data.
pub enum Buf<T> {
    Device(CudaSlice<T>),
    Host(HostVec<T>),
}

impl<T> Buf<T> {
    pub fn len(&self) -> usize {
        match self {
            Buf::Device(s) => s.len(),
            Buf::Host(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One kernel argument, passed to either engine.
pub trait KernelArg<'a> {
    fn push(self, b: &mut LaunchArgs<'a>) -> Result<()>;
    fn host(self) -> Result<Param>;
}

fn host_buffer_on_gpu() -> Error {
    Error::Device("a host buffer was passed to a GPU kernel".into())
}

fn device_buffer_on_host() -> Error {
    Error::Device("a GPU buffer was passed to an emulated kernel".into())
}

impl<'a, T> KernelArg<'a> for &'a Buf<T> {
    fn push(self, b: &mut LaunchArgs<'a>) -> Result<()> {
        let Buf::Device(s) = self else { return Err(host_buffer_on_gpu()) };
        b.arg(s);
        Ok(())
    }
    fn host(self) -> Result<Param> {
        let Buf::Host(v) = self else { return Err(device_buffer_on_host()) };
        Ok(Param::Data(v.as_ptr().cast_mut().cast())) // read only: the kernel's `const T*`
    }
}

impl<'a, T> KernelArg<'a> for &'a mut Buf<T> {
    fn push(self, b: &mut LaunchArgs<'a>) -> Result<()> {
        let Buf::Device(s) = self else { return Err(host_buffer_on_gpu()) };
        b.arg(s);
        Ok(())
    }
    fn host(self) -> Result<Param> {
        let Buf::Host(v) = self else { return Err(device_buffer_on_host()) };
        Ok(Param::Data(v.as_mut_ptr().cast()))
    }
}

macro_rules! scalar_arg {
    ($($t:ty),*) => {$(
        impl<'a> KernelArg<'a> for &'a $t {
            fn push(self, b: &mut LaunchArgs<'a>) -> Result<()> {
                b.arg(self);
                Ok(())
            }
            fn host(self) -> Result<Param> {
                Ok(Param::Value((self as *const $t).cast()))
            }
        }
    )*};
}
scalar_arg!(i32, i64, f32);

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Device(format!("{what}: {e:?}"))
}

/// `n` threads in blocks of `block`, with `shared` bytes of dynamic shared memory.
/// None when there is nothing to do (the launch is skipped).
fn cfg(n: usize, block: u32, shared: u32) -> Result<Option<LaunchConfig>> {
    per_item(n.div_ceil(block as usize), block, shared)
}

/// One block of `block` threads per item; None for no items.
fn per_item(items: usize, block: u32, shared: u32) -> Result<Option<LaunchConfig>> {
    if items == 0 {
        return Ok(None);
    }
    let blocks = u32::try_from(items)
        .ok()
        .filter(|&b| b < 1 << 31)
        .ok_or_else(|| Error::Device(format!("a launch of {items} blocks is beyond the grid limit")))?;
    Ok(Some(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: shared }))
}

/// Threads for a block that reduces a row of `cols` values: the row's length rounded up to a
/// power of two, between one warp and `max`, so short rows do not leave most threads idle.
fn row_block(cols: usize, max: u32) -> u32 {
    cols.next_power_of_two().clamp(32, max as usize) as u32
}

/// Sizes as the kernels' `int` arguments, refusing any that would wrap.
fn ints<const N: usize>(kernel: &str, v: [usize; N]) -> Result<[i32; N]> {
    let mut out = [0i32; N];
    for (o, x) in out.iter_mut().zip(v) {
        *o = i32::try_from(x)
            .map_err(|_| Error::Device(format!("{kernel}: a size of {x} does not fit the kernel's int")))?;
    }
    Ok(out)
}

/// Refuses a launch whose buffers hold fewer values than its dimensions say: the kernels index
/// them unchecked. `bufs` pairs each buffer's length with what the launch reads or writes.
fn fits(kernel: &str, bufs: &[(usize, usize)]) -> Result<()> {
    match bufs.iter().enumerate().find(|(_, (have, need))| have < need) {
        Some((i, (have, need))) => {
            Err(Error::Device(format!("{kernel}: argument {i} holds {have} values, the launch needs {need}")))
        }
        None => Ok(()),
    }
}

/// Launches kernel `$name` with `$cfg` and the arguments in order (each one a reference).
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let Some(cfg) = $cfg? else { return Ok(()) };
        let entry = $crate::cuda::resources::check_launch($name, cfg.block_dim.0).map_err(Error::Device)?;
        $gpu.launched.fetch_or(1 << entry, std::sync::atomic::Ordering::Relaxed);
        match &$gpu.engine {
            Engine::Cuda { stream, functions, .. } => {
                let f = functions.get($name).ok_or_else(|| Error::Device(format!("kernel `{}` is not loaded", $name)))?;
                let mut b = stream.launch_builder(f);
                $( KernelArg::push($arg, &mut b)?; )*
                // SAFETY: each launcher passes the argument list its kernel's signature declares,
                // and has checked (`fits`) that every buffer holds what the kernel indexes by its
                // sizes; what a kernel indexes through values held in another buffer (gather_rows'
                // rows, combine's slots, moe_dispatch's places) it checks itself (moe.cu).
                unsafe { b.launch(cfg) }.map_err(|e| Error::Device(format!("launch {}: {e:?}", $name)))?;
                Ok(())
            }
            Engine::Emulated(schedule) => {
                let params = [$( KernelArg::host($arg)? ),*];
                // SAFETY: as above; the buffers are host vectors borrowed for the launch.
                unsafe { emu::launch($name, cfg, *schedule, &params) }
            }
        }
    }};
}

mod convert;
mod elementwise;
mod flash;
mod host;
mod split;
mod topk;
pub use flash::{FlashChunk, FLASH_MAX_VD, FLASH_STEP_KEYS};
pub use host::{HostVec, Tally};
pub use split::Split;
pub use topk::TopK;

impl Gpu {
    /// Opens device `ordinal` and compiles every kernel for it.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        probe(&[Lib::Driver, Lib::Nvrtc])?;
        let ctx = CudaContext::new(ordinal).map_err(driver("open the device"))?;
        // Kernels, cuBLAS and copies all go to the one stream below, whose order alone keeps
        // every buffer's uses apart; cudarc's tracking would still create two events for every
        // allocation (each op allocates its output), host time spent on nothing with one stream.
        // SAFETY: no second stream is ever made (cudarc's events only order work across streams).
        unsafe { ctx.disable_event_tracking() };
        let allocation = keep_pool(&ctx);
        let (major, minor) = ctx.compute_capability().map_err(driver("read the compute capability"))?;
        let name = ctx.name().map_err(driver("read the device name"))?;
        let arch = format!("sm_{major}{minor}");
        let optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(driver("read the shared memory limit"))?;
        let optin = usize::try_from(optin).unwrap_or(0);
        let versions = versions();
        let (mut functions, mut kernels, mut shared_limit) = (HashMap::new(), Vec::new(), optin);
        for (file, compiled) in compile_all(&arch)? {
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin)).map_err(|e| {
                Error::Device(format!("{file}.cu: cannot load its machine code for {arch} ({versions}): {e:?}"))
            })?;
            let names = KERNELS.iter().find(|(f, _, _)| *f == file).map(|(_, _, n)| *n).unwrap_or(&[]);
            for &kernel in names {
                let f =
                    module.load_function(kernel).map_err(|e| Error::Device(format!("{file}.cu: {kernel}: {e:?}")))?;
                let (usage, room) = resources::configure(&f, kernel, LARGE_SHARED.contains(&kernel), optin)
                    .map_err(|e| Error::Device(format!("{file}.cu: {e}")))?;
                shared_limit = shared_limit.min(room.unwrap_or(usize::MAX));
                kernels.push((kernel, usage));
                functions.insert(kernel, f);
            }
        }
        let engine = Engine::Cuda { stream: ctx.default_stream(), ctx, functions };
        let (uploaded, tally, launched) = Default::default();
        let poison = ENGINE_DEFAULT.into();
        Ok(Gpu { name, arch, shared_limit, kernels, allocation, versions, engine, uploaded, tally, launched, poison })
    }

    /// The device, its architecture, the shared memory a block may take and how memory is
    /// allocated: what `selftest` and `bench` say first, since each changes paths or timings (a
    /// device that refused the opt-in keeps 48 KB, and long rows' top-k take slower paths).
    pub fn summary(&self) -> String {
        let kb = self.shared_limit / 1024;
        // GLM-5's top-2048 over a long prompt needs chunks of 2 x 2049 keys: without the opt-in
        // to more shared memory (48 KB) each row is ranked key by key, minutes at 16k tokens.
        let slow = match self.topk_path(1 << 20, 2048) {
            TopK::Ranked => {
                "; too little for the top-k by chunks: a top-2048 over more keys than fit ranks them one by one (slow)"
            }
            _ => "",
        };
        format!(
            "{} ({}; {kb} KB of dynamic shared memory a block{slow}; memory: {}; {})",
            self.name, self.arch, self.allocation, self.versions
        )
    }

    /// The host emulation (`cuda::emu`): needs no driver, NVRTC or GPU.
    pub fn emulated() -> Gpu {
        Gpu::emulated_in(Schedule::Lockstep)
    }

    /// (free, total) bytes of GPU `ordinal`'s memory, without compiling the kernels (the check
    /// before a run uploads its weights).
    pub fn free_memory(ordinal: usize) -> Result<(usize, usize)> {
        probe(&[Lib::Driver])?;
        let ctx = CudaContext::new(ordinal).map_err(driver("open the device"))?;
        ctx.mem_get_info().map_err(driver("read the memory use"))
    }

    /// The host emulation, running blocks and threads in `schedule`'s order.
    pub fn emulated_in(schedule: Schedule) -> Gpu {
        Gpu {
            name: match schedule {
                Schedule::Lockstep => "host emulation of the CUDA kernels".into(),
                other => format!("host emulation of the CUDA kernels, schedule {other:?}"),
            },
            arch: "host".into(),
            shared_limit: EMULATED_SHARED,
            kernels: Vec::new(),
            allocation: "host vectors".into(),
            versions: "no driver or NVRTC".into(),
            engine: Engine::Emulated(schedule),
            uploaded: Default::default(),
            tally: Default::default(),
            launched: Default::default(),
            poison: ENGINE_DEFAULT.into(),
        }
    }

    /// The GPU's stream (None for the emulation).
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.engine {
            Engine::Cuda { stream, .. } => Some(stream),
            Engine::Emulated(_) => None,
        }
    }

    pub fn upload<T: DeviceRepr + Clone>(&self, v: &[T]) -> Result<Buf<T>> {
        let bytes = std::mem::size_of_val(v) as u64;
        self.uploaded.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        match &self.engine {
            Engine::Cuda { stream, .. } => Ok(Buf::Device(stream.clone_htod(v).map_err(driver("copy to the device"))?)),
            Engine::Emulated(_) => Ok(Buf::Host(HostVec::new(v.to_vec(), &self.tally))),
        }
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, v: &Buf<T>) -> Result<Vec<T>> {
        match (&self.engine, v) {
            (Engine::Cuda { stream, .. }, Buf::Device(s)) => {
                // cudarc copies into a Vec with `cuMemcpyDtoHAsync` and does not wait: to pageable
                // memory the driver returns once the copy is done, by its documentation's "may be
                // synchronous"; the wait makes it certain (the values are read next).
                let v = stream.clone_dtoh(s).map_err(driver("copy from the device"))?;
                stream.synchronize().map_err(driver("copy from the device"))?;
                Ok(v)
            }
            (Engine::Emulated(_), Buf::Host(h)) => Ok(h.to_vec()),
            (Engine::Cuda { .. }, Buf::Host(_)) => Err(host_buffer_on_gpu()),
            (Engine::Emulated(_), Buf::Device(_)) => Err(device_buffer_on_host()),
        }
    }

    /// A buffer of `n` copies of `value` (NaN to poison an output).
    pub fn filled<T: DeviceRepr + Clone>(&self, n: usize, value: T) -> Result<Buf<T>> {
        self.upload(&vec![value; n])
    }

    /// A buffer of `n` floats that the op it is made for writes whole: left uninitialised on the
    /// GPU (zeroing it first would be one more write of every output), NaN in the emulation so
    /// that an element an op leaves unwritten shows in every parity check and golden case; or
    /// filled with the value [`Gpu::poison_outputs`] set, on either engine.
    pub fn output(&self, n: usize) -> Result<Buf<f32>> {
        let poison = self.poisoned();
        let failed = |e| Error::Device(format!("allocate {n} values: {e:?}"));
        match &self.engine {
            Engine::Cuda { stream, .. } => {
                // SAFETY: every caller hands the buffer to an op that writes each of its values
                // before anything reads it (checked on the emulation, where it starts as NaN, and
                // by `selftest` on a GPU, which poisons it).
                let mut buf = unsafe { stream.alloc::<f32>(n.max(1)) }.map_err(failed)?;
                if let Some(value) = poison {
                    use cudarc::driver::DevicePtrMut;
                    let (ptr, _record) = buf.device_ptr_mut(stream);
                    // SAFETY: `ptr` holds n.max(1) 32-bit values, on this stream.
                    unsafe {
                        cudarc::driver::sys::cuMemsetD32Async(ptr, value.to_bits(), n.max(1), stream.cu_stream())
                    }
                    .result()
                    .map_err(failed)?;
                }
                Ok(Buf::Device(buf))
            }
            Engine::Emulated(_) => Ok(Buf::Host(HostVec::new(vec![poison.unwrap_or(f32::NAN); n.max(1)], &self.tally))),
        }
    }

    /// What [`Gpu::poison_outputs`] set last.
    pub fn poisoned(&self) -> Option<f32> {
        match self.poison.load(std::sync::atomic::Ordering::Relaxed) {
            ENGINE_DEFAULT => None,
            bits => Some(f32::from_bits(bits as u32)),
        }
    }

    /// Makes [`Gpu::output`] fill each new buffer with `value` (`None`: the engine's default,
    /// nothing on a GPU). `selftest` poisons outputs with NaN on a GPU too: freed buffers return
    /// to a kept pool, so an op that left part of its output unwritten could otherwise pass a
    /// check on the values a previous path wrote into the same memory.
    pub fn poison_outputs(&self, value: Option<f32>) {
        let bits = value.map_or(ENGINE_DEFAULT, |v| v.to_bits() as u64);
        self.poison.store(bits, std::sync::atomic::Ordering::Relaxed);
    }

    /// A zeroed buffer of `n` values (at least one: the driver refuses empty allocations).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits + Default + Clone>(&self, n: usize) -> Result<Buf<T>> {
        match &self.engine {
            Engine::Cuda { stream, .. } => stream
                .alloc_zeros(n.max(1))
                .map(Buf::Device)
                .map_err(|e| Error::Device(format!("allocate {n} values: {e:?}"))),
            Engine::Emulated(_) => Ok(Buf::Host(HostVec::new(vec![T::default(); n.max(1)], &self.tally))),
        }
    }

    /// x, y: `[rows, cols]`; w: `[cols]`.
    pub fn rms_norm(
        &self,
        x: &Buf<f32>,
        w: &Buf<f32>,
        y: &mut Buf<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        fits("rms_norm", &[(x.len(), rows * cols), (w.len(), cols), (y.len(), rows * cols)])?;
        let [c] = ints("rms_norm", [cols])?;
        launch!(self, "rms_norm", per_item(rows, row_block(cols, 256), 0), [x, w, y, &c, &eps])
    }

    /// x, y: `[rows, cols]`; w, bias: `[cols]`.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        x: &Buf<f32>,
        w: &Buf<f32>,
        bias: &Buf<f32>,
        y: &mut Buf<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        fits("layer_norm", &[(x.len(), rows * cols), (w.len(), cols), (bias.len(), cols), (y.len(), rows * cols)])?;
        let [c] = ints("layer_norm", [cols])?;
        launch!(self, "layer_norm", per_item(rows, row_block(cols, 256), 0), [x, w, bias, y, &c, &eps])
    }

    /// x: `[rows, cols]` -> out: `[rows]`.
    pub fn row_l2_norm(&self, x: &Buf<f32>, out: &mut Buf<f32>, rows: usize, cols: usize) -> Result<()> {
        fits("row_l2_norm", &[(x.len(), rows * cols), (out.len(), rows)])?;
        let [c] = ints("row_l2_norm", [cols])?;
        launch!(self, "row_l2_norm", per_item(rows, row_block(cols, 128), 0), [x, out, &c])
    }

    /// x: [rows, heads, width] in place; cos, sin: [seq, half].
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut Buf<f32>,
        cos: &Buf<f32>,
        sin: &Buf<f32>,
        rows: usize,
        seq: usize,
        heads: usize,
        width: usize,
        start: usize,
        half: usize,
    ) -> Result<()> {
        if half > 64 || start + 2 * half > width {
            return Err(Error::Device(format!("rope: 2 x {half} values from {start} do not fit a head of {width}")));
        }
        fits("rope", &[(x.len(), rows * heads * width), (cos.len(), seq * half), (sin.len(), seq * half)])?;
        let [r, s, h, w, st, hf] = ints("rope", [rows, seq, heads, width, start, half])?;
        launch!(
            self,
            "rope_interleaved",
            // A warp per (row, head): 4 a block of 128.
            per_item((rows * heads).div_ceil(128 / 32), 128, 0),
            [x, cos, sin, &r, &s, &h, &w, &st, &hf]
        )
    }

    /// logits: `[n, e]`; bias: `[e]` -> ids, weights: `[n, k]`; margin: `[n]`.
    #[allow(clippy::too_many_arguments)]
    pub fn route(
        &self,
        logits: &Buf<f32>,
        bias: &Buf<f32>,
        n: usize,
        e: usize,
        rc: &crate::model::moe::RouterConfig,
        ids: &mut Buf<i32>,
        weights: &mut Buf<f32>,
        margin: &mut Buf<f32>,
    ) -> Result<()> {
        // (`Target::supports` refuses such a config before a run loads anything.)
        if !crate::device::route_fits(e, rc.top_k, rc.n_group) {
            return Err(Error::Device(format!(
                "route: {e} experts, top-{} in {} groups is beyond the kernel",
                rc.top_k, rc.n_group
            )));
        }
        let kn = n * rc.top_k;
        fits(
            "route",
            &[(logits.len(), n * e), (bias.len(), e), (ids.len(), kn), (weights.len(), kn), (margin.len(), n)],
        )?;
        let [n32, e32, k, groups, kept, norm] =
            ints("route", [n, e, rc.top_k, rc.n_group, rc.topk_group, usize::from(rc.norm_topk_prob)])?;
        let scaling = rc.routed_scaling_factor;
        launch!(
            self,
            "route",
            cfg(n * 32, 128, 0), // a warp per token
            [logits, bias, &n32, &e32, &k, &groups, &kept, &norm, &scaling, ids, weights, margin]
        )
    }

    /// ids, plain: `[n, k]` expert ids -> changed: `[n]`, 1 where the two rows differ as sets.
    pub fn bias_changed(
        &self,
        ids: &Buf<i32>,
        plain: &Buf<i32>,
        changed: &mut Buf<i32>,
        n: usize,
        k: usize,
    ) -> Result<()> {
        fits("bias_changed", &[(ids.len(), n * k), (plain.len(), n * k), (changed.len(), n)])?;
        let [n32, k32] = ints("bias_changed", [n, k])?;
        launch!(self, "bias_changed", cfg(n, 128, 0), [ids, plain, &n32, &k32, changed])
    }

    /// ids: `[n]` expert ids -> counts: `[e]` (added to).
    pub fn expert_counts(&self, ids: &Buf<i32>, n: usize, e: usize, counts: &mut Buf<i32>) -> Result<()> {
        fits("expert_counts", &[(ids.len(), n), (counts.len(), e)])?;
        let (n64, [e32]) = (n as i64, ints("expert_counts", [e])?);
        launch!(self, "expert_counts", cfg(n, 256, 0), [ids, &n64, &e32, counts])
    }

    /// The indexer's scores for `qc` queries from the products g = q . k * scale ([qc * n, t_eff]):
    /// rows `out_row0 ..` of scores [*, t] (the first at position `first`), from rows `w_row0 ..`
    /// of the weights w [*, n].
    #[allow(clippy::too_many_arguments)]
    pub fn index_combine(
        &self,
        g: &Buf<f32>,
        w: &Buf<f32>,
        scores: &mut Buf<f32>,
        [qc, n, t_eff, t]: [usize; 4],
        (w_row0, out_row0): (usize, usize),
        first: usize,
    ) -> Result<()> {
        fits(
            "index_combine",
            &[(g.len(), qc * n * t_eff), (w.len(), (w_row0 + qc) * n), (scores.len(), (out_row0 + qc) * t)],
        )?;
        let [q32, n32, te32, t32, f32_] = ints("index_combine", [qc, n, t_eff, t, first])?;
        let (w_row0, out_row0) = (w_row0 as i64, out_row0 as i64);
        launch!(
            self,
            "index_combine",
            per_item(qc * t.div_ceil(256), 256, 0),
            [g, w, scores, &q32, &n32, &te32, &t32, &w_row0, &out_row0, &f32_]
        )
    }

    /// Copies the first `n` values of `src` into `dst` from `start` on (on the device).
    pub fn copy_into<T: DeviceRepr + Clone>(
        &self,
        src: &Buf<T>,
        n: usize,
        dst: &mut Buf<T>,
        start: usize,
    ) -> Result<()> {
        fits("copy", &[(src.len(), n), (dst.len(), start + n)])?;
        match (&self.engine, src, dst) {
            (Engine::Cuda { stream, .. }, Buf::Device(a), Buf::Device(b)) => stream
                .memcpy_dtod(&a.slice(..n), &mut b.slice_mut(start..start + n))
                .map_err(driver("copy on the device")),
            (Engine::Emulated(_), Buf::Host(a), Buf::Host(b)) => {
                b[start..start + n].clone_from_slice(&a[..n]);
                Ok(())
            }
            (Engine::Cuda { .. }, ..) => Err(host_buffer_on_gpu()),
            (Engine::Emulated(_), ..) => Err(device_buffer_on_host()),
        }
    }

    /// q: [B, S, nh, nope + rd]; kv: [B, T, nh, nope + vd]; k_rope: [B, T, rd]; idx: [B, S, K]
    /// -> out: [B, S, nh, vd]. dims = [B, S, T, nh, nope, rd, vd, K, offset].
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_attention(
        &self,
        q: &Buf<f32>,
        kv: &Buf<f32>,
        k_rope: &Buf<f32>,
        idx: &Buf<i32>,
        out: &mut Buf<f32>,
        dims: [usize; 9],
        scale: f32,
    ) -> Result<()> {
        let [batch, s, t, nh, nope, rd, vd, k, _] = dims;
        fits(
            "sparse_attention",
            &[
                (q.len(), batch * s * nh * (nope + rd)),
                (kv.len(), batch * t * nh * (nope + vd)),
                (k_rope.len(), batch * t * rd),
                (idx.len(), batch * s * k),
                (out.len(), batch * s * nh * vd),
            ],
        )?;
        // The selection's scores sit in shared memory: 4 bytes a key.
        if 4 * k > self.shared_limit {
            return Err(Error::Device(format!(
                "sparse_attention: {k} selected keys exceed the {} bytes of shared memory",
                self.shared_limit
            )));
        }
        let [_, s32, t32, nh32, nope, rd, vd, k32, o32] = ints("sparse_attention", dims)?;
        let cfg = per_item(batch * s * nh, 64, (4 * k) as u32);
        launch!(
            self,
            "sparse_attention",
            cfg,
            [q, kv, k_rope, idx, out, &s32, &t32, &nh32, &nope, &rd, &vd, &k32, &o32, &scale]
        )
    }

    /// bits [qc, ceil(t_eff / 32)]: which keys the selection rows `idx0 / kk ..` of idx [*, kk]
    /// keep for queries at positions `first ..` (`selection_bits`: bit `j % 32` of word `j / 32`
    /// for key j, set where kept); what the masked softmaxes and the fused kernel read.
    pub fn selection_bits(
        &self,
        idx: &Buf<i32>,
        idx0: usize,
        bits: &mut Buf<u32>,
        [qc, kk, t_eff]: [usize; 3],
        first: usize,
    ) -> Result<()> {
        let kernel = "selection_bits";
        fits(kernel, &[(idx.len(), idx0 + qc * kk), (bits.len(), qc * t_eff.div_ceil(32))])?;
        let [k32, te32, f32_] = ints(kernel, [kk, t_eff, first])?;
        let idx0 = idx0 as i64;
        launch!(self, kernel, per_item(qc, row_block(kk, 128), 0), [idx, &idx0, bits, &k32, &te32, &f32_])
    }

    /// scores [rows, t_eff] (rows = heads * qc) -> the softmax of each row over the keys
    /// bits [qc, ceil(t_eff / 32)] keep ([`Gpu::selection_bits`]), in place.
    pub fn masked_softmax(
        &self,
        scores: &mut Buf<f32>,
        bits: &Buf<u32>,
        rows: usize,
        qc: usize,
        t_eff: usize,
    ) -> Result<()> {
        fits("masked_softmax", &[(scores.len(), rows * t_eff), (bits.len(), qc * t_eff.div_ceil(32))])?;
        if qc == 0 || !rows.is_multiple_of(qc) {
            return Err(Error::Device(format!("masked_softmax: {rows} rows are not heads of {qc} queries")));
        }
        let [r32, q32, te32] = ints("masked_softmax", [rows, qc, t_eff])?;
        // A warp a row, 8 rows a block.
        launch!(self, "masked_softmax", per_item(rows.div_ceil(8), 256, 0), [scores, bits, &r32, &q32, &te32])
    }

    /// The pairs' expert ids `[n]` (pair p = token p / k's choice p % k) grouped by expert, from
    /// the groups' offsets `[e]` (prefix sums of `expert_counts`) -> slot `[n]` (each pair's packed
    /// row), rows `[n]` (each packed row's token).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_dispatch(
        &self,
        ids: &Buf<i32>,
        offsets: &Buf<i32>,
        slot: &mut Buf<i32>,
        rows: &mut Buf<i32>,
        n: usize,
        k: usize,
        e: usize,
    ) -> Result<()> {
        fits("moe_dispatch", &[(ids.len(), n), (offsets.len(), e), (slot.len(), n), (rows.len(), n)])?;
        let [n32, k32] = ints("moe_dispatch", [n, k.max(1)])?;
        const THREADS: u32 = 256;
        launch!(self, "moe_dispatch", per_item(e, THREADS, THREADS * 4), [ids, &n32, &k32, offsets, slot, rows])
    }

    /// x: `[*, cols]`; rows: `[n]` -> out: `[n, cols]`.
    pub fn gather_rows(&self, x: &Buf<f32>, rows: &Buf<i32>, out: &mut Buf<f32>, n: usize, cols: usize) -> Result<()> {
        fits("gather_rows", &[(rows.len(), n), (out.len(), n * cols)])?;
        let [n32, c32] = ints("gather_rows", [n, cols])?;
        let x_rows = (x.len() / cols.max(1)) as i64;
        launch!(self, "gather_rows", per_item(n, 256, 0), [x, &x_rows, rows, out, &n32, &c32])
    }

    /// Packed rows `row0 .. row0 + n` of [`Gpu::gather_rows`], rounded to bf16: out [n, cols].
    pub fn gather_rows_bf16(
        &self,
        x: &Buf<f32>,
        rows: &Buf<i32>,
        row0: usize,
        out: &mut Buf<u16>,
        [n, cols]: [usize; 2],
    ) -> Result<()> {
        fits("gather_rows_bf16", &[(rows.len(), row0.saturating_add(n)), (out.len(), n * cols)])?;
        let ([n32, c32], row0) = (ints("gather_rows_bf16", [n, cols])?, row0 as i64);
        let x_rows = (x.len() / cols.max(1)) as i64;
        launch!(self, "gather_rows_bf16", per_item(n, 256, 0), [x, &x_rows, rows, &row0, out, &n32, &c32])
    }

    /// y: packed expert outputs [*, cols]; ids, slot, w: [n, k]; shared, out: [n, cols].
    #[allow(clippy::too_many_arguments)]
    pub fn combine(
        &self,
        y: &Buf<f32>,
        ids: &Buf<i32>,
        slot: &Buf<i32>,
        w: &Buf<f32>,
        shared: &Buf<f32>,
        out: &mut Buf<f32>,
        n: usize,
        k: usize,
        cols: usize,
    ) -> Result<()> {
        if k > 16 {
            return Err(Error::Device(format!("combine: {k} choices per token, the kernel takes at most 16")));
        }
        fits(
            "combine",
            &[
                // (At least a row of y where a token chooses: an out-of-range slot reads row 0.)
                (y.len(), cols.min(n * k * cols)),
                (ids.len(), n * k),
                (slot.len(), n * k),
                (w.len(), n * k),
                (shared.len(), n * cols),
                (out.len(), n * cols),
            ],
        )?;
        let [n32, k32, c32] = ints("combine", [n, k, cols])?;
        let y_rows = (y.len() / cols.max(1)) as i64;
        let grid = per_item(n, row_block(cols, 256), 0);
        launch!(self, "combine", grid, [y, &y_rows, ids, slot, w, shared, out, &n32, &k32, &c32])
    }

    /// Bytes copied to the device by [`Gpu::upload`] so far.
    pub fn uploaded(&self) -> u64 {
        self.uploaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// (free, total) bytes of device memory; None for the emulation.
    pub fn memory(&self) -> Result<Option<(usize, usize)>> {
        match &self.engine {
            Engine::Cuda { ctx, .. } => ctx.mem_get_info().map(Some).map_err(driver("read the memory use")),
            Engine::Emulated(_) => Ok(None),
        }
    }

    pub fn synchronize(&self) -> Result<()> {
        match &self.engine {
            Engine::Cuda { stream, .. } => stream.synchronize().map_err(driver("synchronize")),
            Engine::Emulated(_) => Ok(()),
        }
    }
}

/// `driver CUDA 12.8, NVRTC 13.0`: what the loaded libraries say of themselves.
fn versions() -> String {
    let (mut driver, mut major, mut minor) = (0, 0, 0);
    // SAFETY: each call writes only the integers it is given, which outlive it; `probe` found
    // both libraries before this runs.
    let driver_ok =
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) } == cudarc::driver::sys::CUresult::CUDA_SUCCESS;
    let nvrtc_ok = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS;
    let driver = if driver_ok { format!("{}.{}", driver / 1000, driver % 1000 / 10) } else { "?".into() };
    let nvrtc = if nvrtc_ok { format!("{major}.{minor}") } else { "?".into() };
    format!("driver CUDA {driver}, NVRTC {nvrtc}")
}
