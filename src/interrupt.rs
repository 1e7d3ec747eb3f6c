//! Ctrl-C during long work that can stop cleanly: the first SIGINT (or SIGTERM, which a CI's
//! cancel and `timeout` send) asks it to stop at its next checkpoint: a resumable `run --dump`
//! after the layer being computed, made durable (the command says how to `--resume`);
//! `generate` after the step in progress, keeping its tokens and dump; `audit --prompts` after
//! the prompt in progress, auditing those run. A second signal ends the process at once, as the
//! default action does. Elsewhere both keep their default action.

#[cfg(unix)]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};

    static REQUESTED: AtomicBool = AtomicBool::new(false);
    static SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(libc::SIGINT);

    const NOTICE: &[u8] =
        b"\nglimpse: stopping after the work in progress, keeping what is done (the signal again quits now)\n";

    /// The signals that ask for a stop.
    const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

    extern "C" fn on_signal(sig: libc::c_int) {
        REQUESTED.store(true, Ordering::Relaxed);
        SIGNAL.store(sig, Ordering::Relaxed);
        // SAFETY: write(2) and signal(2) are async-signal-safe; NOTICE is a static buffer.
        unsafe {
            libc::write(2, NOTICE.as_ptr().cast(), NOTICE.len());
            for sig in SIGNALS {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }

    pub fn stop_at_checkpoints() {
        REQUESTED.store(false, Ordering::Relaxed);
        for sig in SIGNALS {
            // SAFETY: the handler only stores to an atomic and makes async-signal-safe calls.
            unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        }
    }

    pub fn requested() -> bool {
        REQUESTED.load(Ordering::Relaxed)
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

    pub fn default_again() {
        for sig in SIGNALS {
            // SAFETY: restoring the default disposition.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
}

#[cfg(not(unix))]
mod imp {
    pub fn stop_at_checkpoints() {}
    pub fn requested() -> bool {
        false
    }
    pub fn default_again() {}
    pub fn exit_status() -> u8 {
        130
    }
    pub fn signal_name() -> &'static str {
        "Ctrl-C"
    }
}

/// Whether a stop was asked for.
pub use imp::requested;

/// The exit status a stopped command ends with, as a shell reports a process the signal ended:
/// 130 for SIGINT, 143 for SIGTERM.
pub use imp::exit_status;

/// What asked for the stop, for the message that says where the work stopped: "Ctrl-C" (SIGINT)
/// or "SIGTERM".
pub use imp::signal_name;

/// While this lives, the first Ctrl-C asks for a stop at the next checkpoint (`requested`); when
/// it is dropped, however the work ended, SIGINT's default action is back.
#[must_use]
pub struct Stopping(());

/// Starts asking: a stop requested before is forgotten.
pub fn stop_at_checkpoints() -> Stopping {
    imp::stop_at_checkpoints();
    Stopping(())
}

impl Drop for Stopping {
    fn drop(&mut self) {
        imp::default_again();
    }
}
