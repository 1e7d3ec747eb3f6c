//! Progress of long work on stderr: the layer of a forward pass in progress, for the commands
//! that ask for it (`run`, `verify`), the prompt of an `audit` in progress (with `--stream`, the
//! layer and prompt of its sweep) and its co-activation chance draws, and `diff`'s reruns of an
//! attention (`reading::rerun`) and its reads past rounding (`diff::past`). On a terminal, one
//! line once the work has taken two seconds; in a log (CI, `nohup`), a line at most every ten
//! seconds. A GLM-5 prefill on a CPU spends minutes a layer, and said nothing between loading and
//! its result. Quick runs (the golden cases) print nothing.

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

/// What the steps are: a pass's layers, an audit's prompts, and the rest [`Unit`] lists.
#[derive(Debug, Clone, Copy)]
enum Unit {
    /// Layers `first..=last`.
    Layer(usize, usize),
    /// Prompts 1 to this.
    Prompt(usize),
    /// Reruns 1 to `.1` of layer `.0`'s attention or indexer (`.2`).
    Rerun(usize, usize, &'static str),
    /// Divergences 1 to this, read on ours's own inputs (`diff::past`).
    OwnRead(usize),
    /// How many layers' co-activation chance levels are drawn (`audit --pairs`).
    PairChance(usize),
    /// A sweep (`audit --stream`) through layers 0 to `.0` of `.1` prompts: step `layer * .1 +
    /// prompt`.
    Sweep(usize, usize),
}

/// One long piece of work in steps: a pass over a window of layers, an audit's prompts, ...
pub struct Steps {
    unit: Unit,
    start: Instant,
    last_line: Instant,
    terminal: bool,
    enabled: bool,
    shown: bool,
}

impl Steps {
    /// A pass over layers `first..=last` (shown once [`enable`] was called).
    pub fn layers(first: usize, last: usize) -> Steps {
        Steps::of(Unit::Layer(first, last), ENABLED.load(Ordering::Relaxed))
    }

    /// `audit`'s prompts, 1 to `total` (shown whether or not [`enable`] was called).
    pub fn prompts(total: usize) -> Steps {
        Steps::of(Unit::Prompt(total), true)
    }

    /// A sweep of `prompts` prompts through layers 0 to `last`, a layer at a time: step
    /// `layer * prompts + prompt` (shown whether or not [`enable`] was called: at GLM-5's size a
    /// layer of many prompts takes minutes).
    pub fn sweep(last: usize, prompts: usize) -> Steps {
        Steps::of(Unit::Sweep(last, prompts.max(1)), true)
    }

    /// `diff`'s reruns of layer `layer`'s attention or indexer, 1 to `total` (shown once
    /// [`enable`] was called: a GLM-5 layer at 2048 tokens takes seconds a rerun).
    pub fn reruns(layer: usize, part: crate::reading::Part, total: usize) -> Steps {
        Steps::of(Unit::Rerun(layer, total, part.label()), ENABLED.load(Ordering::Relaxed))
    }

    /// `diff`'s divergences 1 to `total`, read on ours's own inputs past an unread one (shown
    /// once [`enable`] was called: a GLM-5 port's every layer may be read).
    pub fn own_reads(total: usize) -> Steps {
        Steps::of(Unit::OwnRead(total), ENABLED.load(Ordering::Relaxed))
    }

    /// `audit --pairs`' chance levels, `total` layers' (shown whether or not [`enable`] was
    /// called: at GLM-5's 256 experts a layer's draws take a fraction of a second).
    pub fn pair_chances(total: usize) -> Steps {
        Steps::of(Unit::PairChance(total), true)
    }

    fn of(unit: Unit, enabled: bool) -> Steps {
        let now = Instant::now();
        Steps { unit, start: now, last_line: now, terminal: std::io::stderr().is_terminal(), enabled, shown: false }
    }

    /// Step `i` starts (a layer, a prompt, ...: the unit's).
    pub fn step(&mut self, i: usize) {
        if let Some(line) = self.enabled.then(|| self.line(i, Instant::now())).flatten() {
            eprint!("{line}");
        }
    }

    /// What step `i`'s start at `now` prints, if anything.
    fn line(&mut self, i: usize, now: Instant) -> Option<String> {
        let at = match self.unit {
            Unit::Layer(first, last) => format!("layer {i} of {first}..={last}"),
            Unit::Prompt(total) => format!("audit: prompt {i} of {total}"),
            Unit::Rerun(layer, total, part) => format!("diff: rerun {i} of {total} of layer {layer}'s {part}"),
            Unit::OwnRead(total) => format!("diff: reading divergence {i} of {total} on ours's own inputs"),
            Unit::PairChance(total) => format!("audit: co-activation chance levels, {i} of {total} layers"),
            Unit::Sweep(last, n) => format!("layer {} of 0..={last}, prompt {} of {n}", i / n, i % n + 1),
        };
        let elapsed = now.duration_since(self.start);
        let secs = elapsed.as_secs_f64();
        if self.terminal && elapsed >= TERMINAL_AFTER {
            self.shown = true;
            return Some(format!("\r\x1b[2K{at} ({secs:.0} s)"));
        }
        if !self.terminal && now.duration_since(self.last_line) >= LOG_EVERY {
            self.last_line = now;
            return Some(format!("glimpse: {at} ({secs:.0} s so far)\n"));
        }
        None
    }
}

impl Drop for Steps {
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
        let mut log = Steps::layers(0, 77);
        log.terminal = false;
        let at = |s: u64| log.start + Duration::from_secs(s);
        let (t1, t12, t15, t23) = (at(1), at(12), at(15), at(23));
        assert_eq!(log.line(0, t1), None);
        assert_eq!(log.line(1, t12).as_deref(), Some("glimpse: layer 1 of 0..=77 (12 s so far)\n"));
        assert_eq!(log.line(2, t15), None);
        assert!(log.line(3, t23).is_some());
        let mut tty = Steps::layers(3, 4);
        tty.terminal = true;
        let (t1, t3) = (tty.start + Duration::from_secs(1), tty.start + Duration::from_secs(3));
        assert_eq!((tty.line(3, t1), tty.shown), (None, false));
        assert_eq!(tty.line(4, t3).as_deref(), Some("\r\x1b[2Klayer 4 of 3..=4 (3 s)"));
        assert!(tty.shown);
        let mut audit = Steps::prompts(5000);
        audit.terminal = false;
        let t12 = audit.start + Duration::from_secs(12);
        assert_eq!(audit.line(40, t12).as_deref(), Some("glimpse: audit: prompt 40 of 5000 (12 s so far)\n"));
        let mut sweep = Steps::sweep(77, 100);
        sweep.terminal = false;
        let t12 = sweep.start + Duration::from_secs(12);
        assert_eq!(
            sweep.line(3 * 100 + 39, t12).as_deref(),
            Some("glimpse: layer 3 of 0..=77, prompt 40 of 100 (12 s so far)\n")
        );
    }
}
