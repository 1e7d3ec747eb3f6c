//! Progress of a forward pass on stderr, for the commands that ask for it (`run`, `verify`): on
//! a terminal, the layer in progress on one line once a run has taken two seconds; in a log (CI,
//! `nohup`), a line at most every ten seconds. A GLM-5 prefill on a CPU spends minutes a layer,
//! and said nothing between loading and its result. Quick runs (the golden cases) print nothing.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Lets forward passes in this process show their progress (the library stays quiet otherwise:
/// an audit has its own, and the TUI owns the terminal).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// After this long a terminal shows the layer in progress.
const TERMINAL_AFTER: Duration = Duration::from_secs(2);
/// A log gets a line at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One pass over a window of layers.
pub struct Layers {
    window: (usize, usize),
    start: Instant,
    last_line: Instant,
    terminal: bool,
    enabled: bool,
    shown: bool,
}

impl Layers {
    pub fn new(first: usize, last: usize) -> Layers {
        let now = Instant::now();
        Layers {
            window: (first, last),
            start: now,
            last_line: now,
            terminal: std::io::stderr().is_terminal(),
            enabled: ENABLED.load(Ordering::Relaxed),
            shown: false,
        }
    }

    /// Layer `i` starts.
    pub fn layer(&mut self, i: usize) {
        if let Some(line) = self.enabled.then(|| self.line(i, Instant::now())).flatten() {
            eprint!("{line}");
        }
    }

    /// What layer `i`'s start at `now` prints, if anything.
    fn line(&mut self, i: usize, now: Instant) -> Option<String> {
        let (first, last) = self.window;
        let elapsed = now.duration_since(self.start);
        let secs = elapsed.as_secs_f64();
        if self.terminal && elapsed >= TERMINAL_AFTER {
            self.shown = true;
            return Some(format!("\r\x1b[2Klayer {i} of {first}..={last} ({secs:.0} s)"));
        }
        if !self.terminal && now.duration_since(self.last_line) >= LOG_EVERY {
            self.last_line = now;
            return Some(format!("glimpse: layer {i} of {first}..={last} ({secs:.0} s so far)\n"));
        }
        None
    }
}

impl Drop for Layers {
    /// Clears the terminal's progress line.
    fn drop(&mut self) {
        if self.shown {
            eprint!("\r\x1b[2K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log gets a line per ten seconds at most, a terminal the layer in progress from two
    /// seconds on; a quick run nothing.
    #[test]
    fn progress_waits_then_paces_its_lines() {
        let mut log = Layers::new(0, 77);
        log.terminal = false;
        let at = |s: u64| log.start + Duration::from_secs(s);
        let (t1, t12, t15, t23) = (at(1), at(12), at(15), at(23));
        assert_eq!(log.line(0, t1), None);
        assert_eq!(log.line(1, t12).as_deref(), Some("glimpse: layer 1 of 0..=77 (12 s so far)\n"));
        assert_eq!(log.line(2, t15), None);
        assert!(log.line(3, t23).is_some());
        let mut tty = Layers::new(3, 4);
        tty.terminal = true;
        let (t1, t3) = (tty.start + Duration::from_secs(1), tty.start + Duration::from_secs(3));
        assert_eq!((tty.line(3, t1), tty.shown), (None, false));
        assert_eq!(tty.line(4, t3).as_deref(), Some("\r\x1b[2Klayer 4 of 3..=4 (3 s)"));
        assert!(tty.shown);
    }
}
