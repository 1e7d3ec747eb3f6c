//! Ctrl-C during long work that can stop cleanly: the first SIGINT (or SIGTERM, which a CI's
//! cancel and `timeout` send) asks it to stop at its next checkpoint: a resumable `run --dump`
//! after the layer being computed, made durable (the command says how to `--resume`);
//! `generate` after the step in progress, keeping its tokens and dump; `audit --prompts` after
//! the prompt in progress, auditing those run (`audit --stream` after the layer in progress,
//! every prompt counted up to it). A second signal ends the process at once, as the
//! default action does (but for a repeat of the first from the same process within a second:
//! `timeout` sends its one stop twice). Elsewhere, and where the process was started ignoring
//! one (a script's background job ignores Ctrl-C), each keeps the action it had.

#[cfg(unix)]
mod imp {
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

    static REQUESTED: AtomicBool = AtomicBool::new(false);
    static SIGNAL: AtomicI32 = AtomicI32::new(libc::SIGINT);
    /// Who sent the first signal (0: the kernel, a terminal's Ctrl-C) and when (monotonic ns).
    static SENDER: AtomicI32 = AtomicI32::new(0);
    static AT: AtomicU64 = AtomicU64::new(0);
    /// Standard error is a terminal: the notice starts on a line of its own (after the `^C` the
    /// terminal echoes, or a progress line); in a log it needs no empty line before it.
    static TERMINAL: AtomicBool = AtomicBool::new(true);

    const NOTICE: &[u8] =
        b"\nglimpse: stopping after the work in progress, keeping what is done (the signal again quits now)\n";

    /// The signals that ask for a stop.
    const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

    /// A repeat from the same process within this is the same request: GNU `timeout` signals
    /// its child, then the child's process group, so one stop arrives twice at once (the second
    /// quit the run before its checkpoint, one run in four).
    const SAME_REQUEST_NS: u64 = 1_000_000_000;

    fn now_ns() -> u64 {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime(2) is async-signal-safe and writes only `t`.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    }

    extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let errno = Errno::save();
        // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO; si_pid is set for signals
        // sent by kill(2) and 0 for the terminal's.
        let sender = if info.is_null() { 0 } else { unsafe { (*info).si_pid() } };
        let now = now_ns();
        // (Another thread may be in this handler for the other copy of a signal: the first's
        // details are published before its flag, so a thread that sees the flag sees them.)
        if REQUESTED.load(Ordering::Acquire) {
            let repeat = sig == SIGNAL.load(Ordering::Relaxed)
                && sender != 0
                && sender == SENDER.load(Ordering::Relaxed)
                && now.saturating_sub(AT.load(Ordering::Relaxed)) < SAME_REQUEST_NS;
            if !repeat {
                // The signal again: its default action, now (it is delivered once this returns).
                // SAFETY: signal(2) and raise(3) are async-signal-safe.
                unsafe {
                    libc::signal(sig, libc::SIG_DFL);
                    libc::raise(sig);
                }
            }
            errno.restore();
            return;
        }
        SIGNAL.store(sig, Ordering::Relaxed);
        SENDER.store(sender, Ordering::Relaxed);
        AT.store(now, Ordering::Relaxed);
        REQUESTED.store(true, Ordering::Release);
        let notice = if TERMINAL.load(Ordering::Relaxed) { NOTICE } else { &NOTICE[1..] };
        // SAFETY: write(2) is async-signal-safe; the notice is a static buffer.
        unsafe { libc::write(2, notice.as_ptr().cast(), notice.len()) };
        errno.restore();
    }

    /// The interrupted code's errno, which the handler's calls may overwrite.
    struct Errno(libc::c_int);

    impl Errno {
        #[cfg(target_os = "linux")]
        fn save() -> Self {
            // SAFETY: __errno_location returns this thread's errno slot.
            Errno(unsafe { *libc::__errno_location() })
        }
        #[cfg(target_os = "linux")]
        fn restore(self) {
            // SAFETY: as in `save`.
            unsafe { *libc::__errno_location() = self.0 };
        }
        #[cfg(not(target_os = "linux"))]
        fn save() -> Self {
            Errno(0)
        }
        #[cfg(not(target_os = "linux"))]
        fn restore(self) {}
    }

    /// Each signal's action before [`stop_at_checkpoints`] took it, to put back; `None` for one
    /// it left alone.
    pub struct Saved([Option<libc::sigaction>; 2]);

    /// Takes SIGINT and SIGTERM, but not one the process inherited as ignored: a job a shell
    /// without job control starts in the background (`glimpse ... &` in a script) ignores the
    /// terminal's Ctrl-C, and must not stop for one.
    pub fn stop_at_checkpoints() -> Saved {
        REQUESTED.store(false, Ordering::Relaxed);
        TERMINAL.store(std::io::IsTerminal::is_terminal(&std::io::stderr()), Ordering::Relaxed);
        Saved(SIGNALS.map(|sig| {
            // SAFETY: the handler only touches atomics and makes async-signal-safe calls; both
            // sigactions are fully initialised before use (zeroed, then filled by the kernel).
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut old);
                if old.sa_sigaction == libc::SIG_IGN {
                    return None;
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
                // Both blocked while either's handler runs (on this thread).
                libc::sigemptyset(&mut action.sa_mask);
                for blocked in SIGNALS {
                    libc::sigaddset(&mut action.sa_mask, blocked);
                }
                libc::sigaction(sig, &action, std::ptr::null_mut());
                Some(old)
            }
        }))
    }

    pub fn requested() -> bool {
        REQUESTED.load(Ordering::Acquire)
    }

    pub fn exit_status() -> u8 {
        128 + SIGNAL.load(Ordering::Relaxed) as u8
    }

    pub fn signal_name() -> &'static str {
        match SIGNAL.load(Ordering::Relaxed) {
            libc::SIGTERM => "SIGTERM",
            _ => "Ctrl-C",
        }
    }

    /// "glimpse: error: PATH was cut short ...", where the file is known, else "a file being read".
    const BUS_HEAD: &[u8] = b"glimpse: error: ";
    const BUS_UNNAMED: &[u8] = b"a file being read";
    const BUS_TAIL: &[u8] =
        b" was cut short on disk while mapped (a writer that empties it first): run again once it is written\n";

    extern "C" fn on_bus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: write(2) and _exit(2) are async-signal-safe, and so is `mapped::name_at`; the
        // kernel hands a SIGBUS handler installed with SA_SIGINFO its siginfo.
        unsafe {
            let addr = if info.is_null() { 0 } else { (*info).si_addr() as usize };
            let name = crate::mapped::name_at(addr).unwrap_or(BUS_UNNAMED);
            for part in [BUS_HEAD, name, BUS_TAIL] {
                libc::write(2, part.as_ptr().cast(), part.len());
            }
            libc::_exit(2);
        }
    }

    pub fn report_bus_errors() {
        // SAFETY: the handler makes async-signal-safe calls only; the sigaction is fully
        // initialised. On the alternate stack Rust's runtime sets up, as its own handler runs.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_bus as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_ONSTACK | libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    }

    pub fn restore(saved: &Saved) {
        for (sig, old) in SIGNALS.iter().zip(&saved.0) {
            if let Some(old) = old {
                // SAFETY: an action the kernel gave for this signal.
                unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
            }
        }
    }
}

#[cfg(not(unix))]
mod imp {
    pub fn report_bus_errors() {}
    pub struct Saved;
    pub fn stop_at_checkpoints() -> Saved {
        Saved
    }
    pub fn requested() -> bool {
        false
    }
    pub fn restore(_: &Saved) {}
    pub fn exit_status() -> u8 {
        130
    }
    pub fn signal_name() -> &'static str {
        "Ctrl-C"
    }
}

/// Dumps and weights are memory-mapped: a file cut short on disk while a command reads it (a
/// writer that empties it first) faults with SIGBUS on the next page, which ended the process
/// with "Bus error" (status 135). This makes it a one-line error naming the file (`mapped`),
/// exit 2. (The terminal UI sets a handler of its own that also restores the terminal.)
pub use imp::report_bus_errors;

/// Whether a stop was asked for.
pub use imp::requested;

/// The exit status a stopped command ends with, as a shell reports a process the signal ended:
/// 130 for SIGINT, 143 for SIGTERM.
pub use imp::exit_status;

/// What asked for the stop, for the message that says where the work stopped: "Ctrl-C" (SIGINT)
/// or "SIGTERM".
pub use imp::signal_name;

/// While this lives, the first Ctrl-C or SIGTERM asks for a stop at the next checkpoint
/// (`requested`); when it is dropped, however the work ended, each signal's action before is
/// back. A signal the process inherited as ignored stays ignored throughout.
#[must_use]
pub struct Stopping(imp::Saved);

/// Starts asking: a stop requested before is forgotten.
pub fn stop_at_checkpoints() -> Stopping {
    Stopping(imp::stop_at_checkpoints())
}

impl Drop for Stopping {
    fn drop(&mut self) {
        imp::restore(&self.0);
    }
}

#[cfg(all(test, unix))]
mod tests {
    /// This process's action for `sig`.
    fn action(sig: libc::c_int) -> libc::sighandler_t {
        // SAFETY: reads the disposition only, into a zeroed sigaction.
        unsafe {
            let mut now: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut now);
            now.sa_sigaction
        }
    }

    /// An ignored SIGINT stays ignored while stops are asked for, and SIGTERM, taken meanwhile,
    /// gets back the action it had, not the default. (The only test in this crate that touches
    /// either signal's action.)
    #[test]
    fn an_ignored_signal_stays_ignored_and_the_other_gets_its_action_back() {
        extern "C" fn handler(_: libc::c_int) {}
        let other = handler as *const () as libc::sighandler_t;
        // SAFETY: setting and later restoring this process's own dispositions.
        let (int_before, term_before) =
            unsafe { (libc::signal(libc::SIGINT, libc::SIG_IGN), libc::signal(libc::SIGTERM, other)) };
        let stopping = super::stop_at_checkpoints();
        let (int_during, term_during) = (action(libc::SIGINT), action(libc::SIGTERM));
        drop(stopping);
        let (int_after, term_after) = (action(libc::SIGINT), action(libc::SIGTERM));
        // SAFETY: as above.
        unsafe {
            libc::signal(libc::SIGINT, int_before);
            libc::signal(libc::SIGTERM, term_before);
        }
        assert_eq!(int_during, libc::SIG_IGN);
        assert_ne!(term_during, other, "SIGTERM asks for a stop");
        assert_eq!((int_after, term_after), (libc::SIG_IGN, other));
    }

    /// A mapped file cut short under a read ends the process with a one-line error that names
    /// it (it said "a file being read"), exit 2. In a child: the fault ends the process.
    #[test]
    fn a_bus_error_names_the_file_cut_short() {
        use std::io::Read;
        use std::os::fd::{AsRawFd, FromRawFd};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.safetensors");
        std::fs::write(&path, vec![7u8; 3 * 65536]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // SAFETY: a map of this test's own file, read only by the child, which faults on it.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let _named = crate::mapped::record(map.as_ptr(), map.len(), &path);
        let far = map[2 * 65536..].as_ptr();
        let mut fds = [0; 2];
        // SAFETY: a pipe into the fds given, closed on exec: no process another test starts keeps
        // its write end open, which would hold the read below.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            fds.iter().for_each(|&fd| assert_eq!(libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC), 0));
        }
        // SAFETY: the child makes async-signal-safe calls only (dup2, sigaction, ftruncate, a
        // read of the map, _exit) before the fault's handler ends it.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe {
                libc::dup2(fds[1], 2);
                super::report_bus_errors();
                libc::ftruncate(file.as_raw_fd(), 0);
                std::ptr::read_volatile(far);
                libc::_exit(0);
            }
        }
        assert!(pid > 0);
        let mut said = String::new();
        // SAFETY: the pipe's ends, each closed once (the read end by the File).
        unsafe {
            libc::close(fds[1]);
            std::fs::File::from_raw_fd(fds[0]).read_to_string(&mut said).unwrap();
        }
        let mut status = 0;
        // SAFETY: waits for this test's own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 2, "status {status}: {said}");
        let want = format!("glimpse: error: {} was cut short on disk while mapped (a writer", path.display());
        assert!(said.starts_with(&want) && said.ends_with("run again once it is written\n"), "{said}");
    }
}
