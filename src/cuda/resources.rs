//! What each kernel takes of a streaming multiprocessor (registers, static shared memory, stack)
//! and whether its largest launch fits there. A block whose threads need more registers than an
//! SM holds fails only on a GPU, at launch ("too many resources requested for launch"), and a
//! dynamic shared memory opt-in that forgets a kernel's static share is refused by the driver.
//! NVRTC's machine code says what every kernel takes ([`read_cubin`]), so CI checks each one's
//! largest block against it without a GPU; `Gpu::open` checks again with the driver's numbers
//! and sizes each kernel's opt-in from its own static share.
//!
//! On `sm_90` every kernel that touches shared memory carries the system's 1 KB reservation in
//! its static share (`.nv.shared.*`: 1024 B for a kernel with none of its own), which is why the
//! opt-in is computed per kernel and not from a guessed constant.

use std::collections::HashMap;

/// One kernel's share of an SM, as its machine code (or the driver) states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Registers a thread.
    pub registers: u32,
    /// Static shared memory a block, in bytes.
    pub static_shared: u32,
    /// Stack (local memory) a thread, in bytes: arrays the compiler could not keep in registers.
    pub stack: u32,
}

/// Each kernel's largest block, as its launcher in `gpu.rs` (and `gpu/topk.rs`) sizes it. Every
/// launch is checked against this table ([`check_launch`]), so a launcher that grows its block
/// without saying so here fails in the emulation's tests, before it can fail on a GPU.
pub const LARGEST_BLOCK: &[(&str, u32)] = &[
    ("rms_norm", 256),
    ("layer_norm", 256),
    ("row_l2_norm", 128),
    ("rope_interleaved", 128),
    ("swiglu", 256),
    ("add", 256),
    ("columns", 256),
    ("route", 128),
    ("expert_counts", 256),
    ("bias_changed", 128),
    ("index_combine", 256),
    ("every_key", 256),
    ("topk_causal", 128),
    ("topk_sorted", 512),
    ("topk_chunks_of_scores", 512),
    ("topk_chunks_of_pairs", 512),
    ("topk_emit", 256),
    ("sparse_attention", 64),
    ("masked_softmax", 256),
    ("masked_softmax_bf16", 256),
    ("selection_bits", 128),
    ("flash_attention_bf16", 128),
    ("mma_probe", 32),
    ("gather_rows", 256),
    ("gather_rows_bf16", 256),
    ("combine", 256),
    ("moe_dispatch", 256),
    ("fp8_dequant", 256),
    ("fp8_dequant_bf16", 256),
    ("bf16_widen", 256),
    ("bf16_round", 256),
    ("split_bf16", 256),
];

/// The largest block `kernel`'s launcher takes; None for a kernel not in [`LARGEST_BLOCK`].
// One bit a kernel in `Gpu`'s record of the kernels launched.
const _: () = assert!(LARGEST_BLOCK.len() <= 64);

pub fn largest_block(kernel: &str) -> Option<u32> {
    LARGEST_BLOCK.iter().find(|(k, _)| *k == kernel).map(|&(_, b)| b)
}

/// Refuses a launch whose block is larger than its kernel's entry in [`LARGEST_BLOCK`]; else the
/// entry's index (`Gpu` records each launched kernel by it, one bit each).
pub fn check_launch(kernel: &str, block: u32) -> Result<usize, String> {
    let entry = LARGEST_BLOCK.iter().position(|(k, _)| *k == kernel);
    match entry.map(|i| (i, LARGEST_BLOCK[i].1)) {
        Some((i, largest)) if block <= largest => Ok(i),
        Some((_, largest)) => Err(format!(
            "{kernel}: a block of {block} threads is larger than the {largest} its resources were checked for \
             (cuda::resources::LARGEST_BLOCK)"
        )),
        None => Err(format!("{kernel}: no largest block in cuda::resources::LARGEST_BLOCK")),
    }
}

/// Registers a block may hold (and an SM has), on every architecture since Maxwell.
const REGISTERS_PER_BLOCK: u32 = 64 * 1024;
/// An SM's register file is split among this many sub-partitions (Volta on), each holding its
/// share of a block's warps: `cuda_occupancy.h` rounds a block's warps up to a multiple of it.
const SUB_PARTITIONS: u32 = 4;
/// Registers are given to a warp in units of this many.
const REGISTER_UNIT: u32 = 256;
/// Threads a block may have, and registers a thread.
const MAX_THREADS: u32 = 1024;
const MAX_REGISTERS: u32 = 255;

/// The most threads a block of a kernel taking `registers` a thread may have (what the driver
/// reports as the function's `MAX_THREADS_PER_BLOCK`): whole warps, as many in each
/// sub-partition as its share of the registers holds.
pub fn threads_allowed(registers: u32) -> u32 {
    let per_warp = (registers.clamp(1, MAX_REGISTERS) * 32).div_ceil(REGISTER_UNIT) * REGISTER_UNIT;
    let warps_per_partition = REGISTERS_PER_BLOCK / SUB_PARTITIONS / per_warp;
    (warps_per_partition * SUB_PARTITIONS * 32).min(MAX_THREADS)
}

/// Checks that a block of `block` threads of `kernel` fits an SM's registers.
pub fn check_block(kernel: &str, usage: Usage, block: u32) -> Result<(), String> {
    let allowed = threads_allowed(usage.registers);
    if block > allowed {
        return Err(format!(
            "{kernel}: its largest block of {block} threads needs {} registers a thread x {block}, more than an \
             SM holds ({allowed} threads at most at {} registers)",
            usage.registers, usage.registers
        ));
    }
    Ok(())
}

/// A loaded kernel's [`Usage`] as the driver states it, refused where the driver allows fewer
/// threads a block than its largest launch takes (a launch past them fails with "too many
/// resources requested"). Given `large_shared`, its dynamic shared memory is opted in up to
/// `optin` less its own static share (the driver refuses more), else left at the default 48 KB
/// less it: the room, returned.
pub fn configure(
    f: &cudarc::driver::CudaFunction,
    kernel: &str,
    large_shared: bool,
    optin: usize,
) -> Result<(Usage, Option<usize>), String> {
    let what = |e: cudarc::driver::DriverError| format!("{kernel}: {e:?}");
    let count = |v: i32| u32::try_from(v).unwrap_or(0);
    let usage = Usage {
        registers: count(f.num_regs().map_err(what)?),
        static_shared: count(f.shared_size_bytes().map_err(what)?),
        stack: count(f.local_size_bytes().map_err(what)?),
    };
    let allowed = f.max_threads_per_block().map_err(what)?;
    let largest = largest_block(kernel).unwrap_or(u32::MAX);
    if i64::from(allowed) < i64::from(largest) {
        return Err(format!(
            "{kernel}: this device runs at most {allowed} threads a block of it ({} registers a thread), and its \
             launches take {largest}",
            usage.registers
        ));
    }
    if !large_shared {
        return Ok((usage, None));
    }
    let attr = cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    let room = optin.saturating_sub(usage.static_shared as usize);
    let raised = f.set_attribute(attr, i32::try_from(room).unwrap_or(i32::MAX)).is_ok();
    let room = if raised { room } else { (48 * 1024usize).saturating_sub(usage.static_shared as usize) };
    Ok((usage, Some(room)))
}

/// One line on the kernels' resources: the register range with the hungriest kernel, and the
/// kernels that use stack (local memory, slow), for a report's head.
pub fn describe(usages: &[(&str, Usage)]) -> String {
    let Some(most) = usages.iter().max_by_key(|(_, u)| u.registers) else { return "no kernels".into() };
    let least = usages.iter().map(|(_, u)| u.registers).min().unwrap_or(0);
    let mut stacked: Vec<_> = usages.iter().filter(|(_, u)| u.stack > 0).collect();
    stacked.sort_by_key(|(k, u)| (std::cmp::Reverse(u.stack), *k));
    let stack = match stacked.as_slice() {
        [] => "no kernel uses stack".to_string(),
        s => format!("stack: {}", s.iter().map(|(k, u)| format!("{k} {} B", u.stack)).collect::<Vec<_>>().join(", ")),
    };
    format!("{} kernels, {least}-{} registers a thread ({} the most); {stack}", usages.len(), most.1.registers, most.0)
}

/// Reads every kernel's [`Usage`] from NVRTC's machine code (a CUDA ELF image): registers and
/// stack from the `.nv.info` section's per-function attributes, static shared memory from the
/// size of the kernel's `.nv.shared.<name>` section.
pub fn read_cubin(cubin: &[u8]) -> Result<HashMap<String, Usage>, String> {
    let elf = Elf::parse(cubin)?;
    let symbols = elf.symbols()?;
    let mut usages: HashMap<String, Usage> = HashMap::new();
    for (name, size) in elf.sections.iter().filter_map(|s| Some((s.name.strip_prefix(".nv.shared.")?, s.size))) {
        if name != "reserved.0" {
            let size = u32::try_from(size).map_err(|_| format!("`.nv.shared.{name}` of {size} bytes"))?;
            usages.entry(name.to_string()).or_default().static_shared = size;
        }
    }
    let info = elf.sections.iter().find(|s| s.name == ".nv.info").ok_or("no .nv.info section")?;
    for (attribute, payload) in attributes(elf.bytes(info)?)? {
        // Per-function attributes: the function's symbol index, then the value.
        let (REGISTER_COUNT | FRAME_SIZE) = attribute else { continue };
        let [symbol, value] = [0, 4].map(|o| u32_at(payload, o));
        let (Some(symbol), Some(value)) = (symbol, value) else { return Err("a short .nv.info attribute".into()) };
        let Some(name) = symbols.get(&symbol) else { continue };
        let usage = usages.entry(name.clone()).or_default();
        match attribute {
            REGISTER_COUNT if value > MAX_REGISTERS => {
                return Err(format!("`{name}` takes {value} registers a thread"))
            }
            REGISTER_COUNT => usage.registers = value,
            _ => usage.stack = value,
        }
    }
    // Only functions with a register count are kernels (the shared sections name the same).
    usages.retain(|_, u| u.registers > 0);
    Ok(usages)
}

/// `.nv.info` attribute codes (NVIDIA's EIATTR_*).
const FRAME_SIZE: u8 = 0x11;
const REGISTER_COUNT: u8 = 0x2f;

/// `.nv.info`'s records: a format byte, an attribute byte, then either a 2-byte value (formats
/// 1-3) or a 2-byte length and that many bytes (format 4).
fn attributes(mut b: &[u8]) -> Result<Vec<(u8, &[u8])>, String> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let (format, attribute) = (b[0], b[1]);
        let len = u16::from_le_bytes([b[2], b[3]]) as usize;
        match format {
            1..=3 => b = &b[4..],
            4 if b.len() >= 4 + len => {
                out.push((attribute, &b[4..4 + len]));
                b = &b[4 + len..];
            }
            _ => return Err(format!("an .nv.info record of format {format} (attribute {attribute:#x})")),
        }
    }
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

struct Section {
    name: String,
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
}

/// The little of ELF64 (little-endian) a CUDA image needs read: its sections and symbols.
struct Elf<'a> {
    image: &'a [u8],
    sections: Vec<Section>,
}

impl<'a> Elf<'a> {
    fn parse(image: &'a [u8]) -> Result<Elf<'a>, String> {
        if !image.starts_with(b"\x7fELF\x02\x01") {
            return Err("not a 64-bit little-endian ELF image".into());
        }
        let short = || "a truncated ELF header".to_string();
        let half = |at: usize| image.get(at..at + 2).map(|h| u16::from_le_bytes([h[0], h[1]]) as usize);
        let table = u64_at(image, 0x28).ok_or_else(short)? as usize;
        let (entry, count, names) =
            (half(0x3a).ok_or_else(short)?, half(0x3c).ok_or_else(short)?, half(0x3e).ok_or_else(short)?);
        // (offset of the name, section) for each header; the names are read once all are.
        let mut headers = Vec::with_capacity(count);
        for i in 0..count {
            let at = table.checked_add(i * entry);
            let truncated = || format!("section header {i} is truncated");
            let word = |o: usize| at.and_then(|a| u32_at(image, a.checked_add(o)?)).ok_or_else(truncated);
            let wide = |o: usize| at.and_then(|a| u64_at(image, a.checked_add(o)?)).ok_or_else(truncated);
            let section = Section {
                name: String::new(),
                kind: word(4)?,
                offset: wide(0x18)?,
                size: wide(0x20)?,
                link: word(0x28)?,
            };
            headers.push((word(0)? as usize, section));
        }
        let mut elf = Elf { image, sections: Vec::new() };
        let strings = match headers.get(names) {
            Some((_, s)) => elf.bytes(s)?,
            None => return Err("no section names".into()),
        };
        for (at, mut s) in headers {
            s.name = c_string(strings, at).ok_or("a section name outside the names")?;
            elf.sections.push(s);
        }
        Ok(elf)
    }

    fn bytes(&self, s: &Section) -> Result<&'a [u8], String> {
        let (start, len) = (s.offset as usize, s.size as usize);
        self.image.get(start..start.saturating_add(len)).ok_or_else(|| format!("section {} is truncated", s.name))
    }

    /// The symbol table's names by symbol index.
    fn symbols(&self) -> Result<HashMap<u32, String>, String> {
        const SYMBOL_TABLE: u32 = 2;
        let table = self.sections.iter().find(|s| s.kind == SYMBOL_TABLE).ok_or("no symbol table")?;
        let names = self.sections.get(table.link as usize).ok_or("no symbol names")?;
        let (table, names) = (self.bytes(table)?, self.bytes(names)?);
        let mut out = HashMap::new();
        for (i, symbol) in table.chunks_exact(24).enumerate() {
            let at = u32_at(symbol, 0).unwrap_or(0) as usize;
            if let Some(name) = c_string(names, at).filter(|n| !n.is_empty()) {
                out.insert(i as u32, name);
            }
        }
        Ok(out)
    }
}

/// The NUL-terminated string at `at` in `b`.
fn c_string(b: &[u8], at: usize) -> Option<String> {
    let rest = b.get(at..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_bound_the_block_by_warps_of_256_register_units() {
        // 128 registers: 16 warps of 4096 fill 64 K exactly; one more rounds a warp to 4352, of
        // which each sub-partition's 16 K holds 3: 12 warps (cuda_occupancy.h's rule).
        assert_eq!(threads_allowed(128), 512);
        assert_eq!(threads_allowed(129), 384);
        assert_eq!(threads_allowed(u32::MAX), 256, "past 255 is no count a kernel has: no overflow");
        assert_eq!(threads_allowed(255), 256);
        assert_eq!(threads_allowed(32), 1024);
        let usage = |registers| Usage { registers, ..Usage::default() };
        assert!(check_block("k", usage(128), 512).is_ok());
        let err = check_block("k", usage(129), 512).unwrap_err();
        assert!(err.contains("k: its largest block of 512 threads") && err.contains("384 threads at most"), "{err}");
    }

    #[test]
    fn a_launch_larger_than_its_table_entry_is_refused() {
        assert!(check_launch("topk_sorted", 512).is_ok());
        assert!(check_launch("topk_sorted", 1024).unwrap_err().contains("larger than the 512"));
        assert!(check_launch("no_such_kernel", 32).unwrap_err().contains("no largest block"));
    }

    #[test]
    fn every_kernel_has_a_largest_block() {
        for (file, _, kernels) in super::super::KERNELS {
            for k in *kernels {
                assert!(largest_block(k).is_some(), "{file}.cu: {k} is not in LARGEST_BLOCK");
            }
        }
        let listed: usize = super::super::KERNELS.iter().map(|(_, _, k)| k.len()).sum();
        assert_eq!(LARGEST_BLOCK.len(), listed, "LARGEST_BLOCK names a kernel no file defines");
    }

    #[test]
    fn a_malformed_image_is_an_error_not_a_panic() {
        for bad in [&b""[..], b"\x7fELF", b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0", &[0x7f; 100]] {
            assert!(read_cubin(bad).is_err());
        }
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        header[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes()); // section table past the end
        header[0x3c] = 3;
        assert!(read_cubin(&header).is_err());
    }
}
