//! The terminal loop: raw mode and the alternate screen (restored on exit, on panic, on
//! SIGTERM or SIGINT, and on the SIGBUS of a mapped dump cut short under it), draw, wait for a
//! key, update the state, until quit. Resizes just redraw.

use std::io::{self, IsTerminal};
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyEventKind};

use crate::app::App;
use crate::data::Source;
use crate::ui;

/// Runs the UI until `q`, or a SIGTERM or SIGINT from outside: then the signal's number, so the
/// caller can exit as a process that signal ended does (128 + it), once the terminal is restored.
pub fn run(src: &dyn Source) -> io::Result<Option<i32>> {
    if !io::stdout().is_terminal() {
        return Err(io::Error::other("needs an interactive terminal (stdout is not one)"));
    }
    bus::save_terminal();
    // (`try_init` can fail after it turned raw mode on: the terminal is restored then too.)
    let mut terminal = ratatui::try_init().inspect_err(|_| ratatui::restore())?;
    bus::install();
    let result = event_loop(&mut terminal, src);
    ratatui::restore();
    result.map(|()| stop::signal())
}

/// The path of the mapped file holding an address, where one is known (async-signal-safe).
pub type NameAt = fn(usize) -> Option<&'static [u8]>;

/// How the SIGBUS of a mapped dump cut short names the file: `name_at` (async-signal-safe)
/// gives the path of the mapped file holding an address. Without it, the message names none.
pub fn name_mapped_files(name_at: NameAt) {
    #[cfg(unix)]
    let _ = bus::NAMES.set(name_at);
    #[cfg(not(unix))]
    let _ = name_at;
}

fn event_loop(terminal: &mut ratatui::DefaultTerminal, src: &dyn Source) -> io::Result<()> {
    let mut app = App::default();
    stop::install();
    let mut unfinished = draw(terminal, &mut app, src)?;
    while !app.quit && stop::signal().is_none() {
        // Waits in slices, so a signal ends the loop within one; while the source computes in
        // the background, each slice redraws, so its results appear without a key.
        if !event::poll(Duration::from_millis(200))? {
            if unfinished {
                unfinished = draw(terminal, &mut app, src)?;
            }
            continue;
        }
        if let Event::Key(key) = event::read()? {
            if key.kind == KeyEventKind::Press {
                app.handle_key(key, src);
            }
        }
        unfinished = draw(terminal, &mut app, src)?;
    }
    Ok(())
}

/// Draws the screen, then notes how many rows of the view it holds (for paging). Says whether
/// the source was computing in the background before the draw or after it (work the draw
/// started, as the load view's chance level, or that ended while it drew): then the screen may
/// show that work unfinished, and the loop draws it again.
fn draw(terminal: &mut ratatui::DefaultTerminal, app: &mut App, src: &dyn Source) -> io::Result<bool> {
    let before = src.busy();
    let screen = terminal.draw(|f| ui::draw(f, app, src))?.area;
    app.page = crate::views::page(app, src, ui::body(screen));
    Ok(before || src.busy())
}

/// `kill` (SIGTERM) or SIGINT from outside end the loop like `q`, so the terminal is restored;
/// their default action would leave it raw, on the alternate screen. SIGHUP keeps its default
/// action: the terminal is gone, and crossterm's reader spins on a hung-up one.
#[cfg(unix)]
mod stop {
    use std::sync::atomic::{AtomicI32, Ordering};

    /// The signal that asked the loop to end; 0 for none.
    static SIGNAL: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_signal(signal: libc::c_int) {
        SIGNAL.store(signal, Ordering::Relaxed);
    }

    pub fn install() {
        for signal in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
        }
    }

    pub fn signal() -> Option<i32> {
        Some(SIGNAL.load(Ordering::Relaxed)).filter(|&s| s != 0)
    }
}

/// The dumps are memory-mapped: one truncated or rewritten in place while the UI reads it (a
/// port's writer that empties the file first) faults with SIGBUS on the next page read, whose
/// default action left the terminal raw, on the alternate screen, without a cursor. The handler
/// restores the terminal as it was before the UI and exits with a one-line error.
#[cfg(unix)]
mod bus {
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::OnceLock;

    /// The terminal's settings before raw mode, and a descriptor of it: `/dev/tty`, the terminal
    /// crossterm puts in raw mode whether or not standard input is it.
    static SAVED: OnceLock<libc::termios> = OnceLock::new();
    static TTY: AtomicI32 = AtomicI32::new(-1);
    /// What names the mapped file at an address ([`super::name_mapped_files`]).
    pub(super) static NAMES: OnceLock<super::NameAt> = OnceLock::new();

    const LEAVE: &[u8] = b"\x1b[?1049l\x1b[?25h\r\n";
    /// The message: HEAD, ": PATH" where the file is known, TAIL.
    const HEAD: &[u8] = b"glimpse: error: a file the terminal UI reads changed on disk (cut short while mapped)";
    const TAIL: &[u8] = b": open it again once it is written\n";

    pub fn save_terminal() {
        // SAFETY: open(2) of a NUL-terminated path; tcgetattr writes the termios it is given, and
        // zeroed is a valid termios to fill. The descriptor stays open for the handler.
        unsafe {
            let fd = libc::open(c"/dev/tty".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            let mut t: libc::termios = std::mem::zeroed();
            if fd >= 0 && libc::tcgetattr(fd, &mut t) == 0 && SAVED.set(t).is_ok() {
                TTY.store(fd, Ordering::Relaxed);
            } else if fd >= 0 {
                libc::close(fd);
            }
        }
    }

    extern "C" fn on_bus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: write(2), tcsetattr(3) and _exit(2) are async-signal-safe, and so is
        // `mapped::name_at`; SAVED and TTY were set before the handler was installed and are
        // only read here; the kernel hands a handler installed with SA_SIGINFO its siginfo.
        unsafe {
            libc::write(1, LEAVE.as_ptr().cast(), LEAVE.len());
            if let (Some(t), fd @ 0..) = (SAVED.get(), TTY.load(Ordering::Relaxed)) {
                libc::tcsetattr(fd, libc::TCSANOW, t);
            }
            let addr = if info.is_null() { 0 } else { (*info).si_addr() as usize };
            let parts: [&[u8]; 4] = match NAMES.get().and_then(|name_at| name_at(addr)) {
                Some(path) => [HEAD, b": ", path, TAIL],
                None => [HEAD, TAIL, b"", b""],
            };
            for part in parts {
                libc::write(2, part.as_ptr().cast(), part.len());
            }
            libc::_exit(2);
        }
    }

    pub fn install() {
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
}

#[cfg(not(unix))]
mod bus {
    pub fn save_terminal() {}
    pub fn install() {}
}

#[cfg(not(unix))]
mod stop {
    pub fn install() {}
    pub fn signal() -> Option<i32> {
        None
    }
}
