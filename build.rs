//! With the `cuda` feature: compiles every kernel file (src/cuda/*.cu) a second time, as host
//! C++ over the emulation runtime in src/cuda/emu.h, into a static library that
//! `cuda::emu` launches. That lets the kernels' own source run, and be checked against the CPU
//! references, on a machine with no GPU (`--device cuda-emu`, the tests, CI). Without the
//! feature this does nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda");
    #[cfg(feature = "cuda")]
    emu::build();
}

#[cfg(feature = "cuda")]
mod emu {
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};

    pub fn build() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cuda");
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        // The kernels, then the emulation's own test kernels (src/cuda/emu/: never given to NVRTC).
        let cu_files = |dir: &Path| {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect();
            files.sort();
            files
        };
        let files = [cu_files(&dir), cu_files(&dir.join("emu"))].concat();

        let mut src = format!("#include \"{}\"\nnamespace glimpse_emu {{\n", dir.join("emu.h").display());
        append(&mut src, &dir.join("prelude.cuh"), &mut Vec::new());
        let mut kernels = Vec::new();
        for f in &files {
            append(&mut src, f, &mut kernels);
        }
        src.push_str("} // namespace glimpse_emu\n\n");
        src.push_str(
            "// 0 when the launch ran; -1 for a kernel this library does not have, -4 an unknown order; see\n\
             // glimpse_emu::launch. `order` is a glimpse_emu::Order, `seed` the shuffle's.\n\
             extern \"C\" int glimpse_emu_launch(const char* name, unsigned grid, unsigned block, unsigned shared,\n\
             \x20                                 int order, unsigned long long seed, void** params) {\n\
             \x20   if (order < 0 || order > 3) return -4;\n\
             \x20   glimpse_emu::Schedule schedule{static_cast<glimpse_emu::Order>(order), seed};\n",
        );
        for k in &kernels {
            let _ = writeln!(
                src,
                "    if (std::strcmp(name, \"{k}\") == 0) return glimpse_emu::run(glimpse_emu::{k}, grid, block, shared, schedule, params);"
            );
        }
        src.push_str("    return -1;\n}\n");
        let path = out.join("glimpse_emu.cpp");
        std::fs::write(&path, src).expect("OUT_DIR is writable");
        // `#pragma unroll` is for NVRTC; the host compiler may ignore it.
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .opt_level(2)
            .flag_if_supported("-Wno-unknown-pragmas")
            .file(&path)
            .compile("glimpse_emu");
    }

    /// Appends one kernel file, rewritten where C++ differs from CUDA, and notes its kernels.
    fn append(src: &mut String, file: &Path, kernels: &mut Vec<String>) {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let _ = writeln!(src, "#line 1 \"{}\"", file.display());
        for line in text.lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("extern \"C\" __global__ void ") {
                // C++ linkage inside the namespace: the emulated `add` must not clash with a C symbol.
                // (A `__launch_bounds__(N)` before the name is the GPU's business.)
                let rest = match rest.strip_prefix("__launch_bounds__(") {
                    Some(bounded) => bounded.split_once(") ").map_or(bounded, |(_, name)| name),
                    None => rest,
                };
                kernels.push(rest.split('(').next().unwrap_or_default().trim().to_string());
                let _ = writeln!(src, "{}", line.replacen("extern \"C\" ", "", 1));
            } else if let Some(decl) = t.strip_prefix("extern __shared__ ").and_then(|d| d.strip_suffix("[];")) {
                // Dynamic shared memory: a pointer into the launch's buffer.
                let (ty, name) = decl.rsplit_once(' ').unwrap_or_else(|| panic!("{}: `{t}`", file.display()));
                let _ = writeln!(src, "{ty}* {name} = static_cast<{ty}*>(::glimpse_emu::dynamic_shared());");
            } else if let Some(decl) = t.strip_prefix("__shared__ ") {
                // A static array: filled afresh in each block (emu.h's fresh_shared).
                let (decl, rest) = decl.split_once(';').unwrap_or_else(|| panic!("{}: `{t}`", file.display()));
                if decl.contains(',') {
                    panic!("{}: one __shared__ array a declaration, for the emulation: `{t}`", file.display());
                }
                let name = decl.split('[').next().and_then(|d| d.rsplit(' ').next()).filter(|n| !n.is_empty());
                let name = name
                    .unwrap_or_else(|| panic!("{}: a __shared__ array build.rs cannot read: `{t}`", file.display()));
                let _ = writeln!(
                    src,
                    "static {decl}; static unsigned long long {name}_block = 0; \
                     ::glimpse_emu::fresh_shared({name}, sizeof({name}), {name}_block);{rest}"
                );
            } else if t.contains("__shared__") && !t.starts_with("//") {
                // (Left as it is, it would hold what the block before left: see above.)
                panic!("{}: a __shared__ declaration the emulation does not read: `{t}`", file.display());
            } else {
                let _ = writeln!(src, "{line}");
            }
        }
    }
}
