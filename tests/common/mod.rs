//! Helpers shared by the integration tests that drive the `glimpse` binary.
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};

/// Runs the binary with no standard input.
pub fn glimpse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).stdin(Stdio::null()).output().expect("the binary runs")
}

/// Exit code and stdout + stderr, checking that nothing panicked.
pub fn code_and_text(args: &[&str]) -> (i32, String) {
    let o = glimpse(args);
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!text.contains("panicked"), "{args:?}: {text}");
    (o.status.code().unwrap_or(-1), text)
}
