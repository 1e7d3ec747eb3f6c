//! The README's promise, kept by a test: every command in its code blocks runs as written.
//!
//! Each `cargo run --release -- ...` line (and the shell lines between them, such as the
//! `printf` that writes a prompts file) runs in README order, from the repository root, with the
//! built binary in place of `cargo run --release --` and a temporary folder in place of `/tmp/`,
//! so later lines read what earlier ones wrote, as they do for a reader. A command must exit 0, or
//! 1 where it compares a port's dump (the README's porting examples show their differences), and
//! nothing may panic. Two kinds of line are run elsewhere, and only checked here to be run there:
//! `tui` lines (interactive; `tests/tui_live.rs` runs each in tmux) and the GLM-5-sized `synth`
//! (it writes 2.4 GB).

use std::path::Path;
use std::process::{Command, Stdio};

const CARGO_RUN: &str = "cargo run --release --";

/// The lines of the README's fenced code blocks that a reader would type: `cargo run --release
/// --` commands and the shell lines among them (not output, not `cargo test`), in order.
fn commands(readme: &str) -> Vec<String> {
    let mut in_block = false;
    let mut lines = Vec::new();
    for line in readme.lines().map(str::trim) {
        if line.starts_with("```") {
            in_block = !in_block;
        } else if in_block && (line.starts_with(CARGO_RUN) || line.starts_with("printf ")) {
            lines.push(line.to_string());
        }
    }
    lines
}

/// The words of a `cargo run` line after `cargo run --release --`, its comment dropped.
fn glimpse_args(line: &str) -> &str {
    let rest = line.strip_prefix(CARGO_RUN).unwrap_or(line);
    rest.split(" #").next().unwrap_or(rest).trim()
}

#[test]
fn every_readme_command_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lines = commands(&readme);
    // The two commands, the examples, the porting steps and the TUI: a parse that found few of
    // them would make this test pass on nothing.
    assert!(lines.len() >= 15, "only {} commands found in README.md: {lines:#?}", lines.len());
    assert!(lines.iter().any(|l| glimpse_args(l) == "verify"), "the README's first command is gone: {lines:#?}");

    let tui_live = std::fs::read_to_string(root.join("tests/tui_live.rs")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_glimpse");
    let mut ran = 0;
    for line in &lines {
        let args = glimpse_args(line);
        if args.starts_with("tui") {
            let run_there = format!("{{bin}} {args}\"");
            assert!(
                tui_live.contains(&run_there),
                "README runs `{args}`, which tests/tui_live.rs does not run in tmux"
            );
            continue;
        }
        if args.starts_with("synth --preset glm5") {
            continue;
        }
        // (`/tmp/` first: the binary itself may sit under /tmp, a CARGO_TARGET_DIR there.)
        let shell = line.replace("/tmp/", &format!("{}/", tmp.path().display())).replacen(CARGO_RUN, bin, 1);
        let out = Command::new("sh").arg("-c").arg(&shell).current_dir(root).stdin(Stdio::null()).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let code = out.status.code();
        // A port's dump (`bf16-port`, `port-no-mscale`) differs from its reference: exit 1.
        let port = args.split_whitespace().any(|a| a.ends_with(".safetensors") && a.contains("port"));
        let allowed: &[i32] = if port { &[1] } else { &[0] };
        assert!(
            code.is_some_and(|c| allowed.contains(&c)) && !text.contains("panicked"),
            "README line `{line}` exited {code:?} (allowed {allowed:?}):\n{text}"
        );
        println!("exit {} `{line}`", code.unwrap_or(-1));
        ran += 1;
    }
    assert!(ran >= 12, "only {ran} README commands ran");
}
