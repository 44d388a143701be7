//! Crash points: the durable steps of soup's writers, named, so that the crash tests can end the
//! process at each one and check what a resumed run makes of the state left behind.
//!
//! - `SOUP_CRASH_TRACE=FILE` appends one line per durable step reached (`N name`) to FILE;
//! - `SOUP_CRASH_AT=N` ends the process at the N-th durable step as `kill -9` would: no
//!   destructors, no clean-up, exit status 137.
//!
//! - `SOUP_DISK_FULL=1` makes every atomic write fail as on a full disk (ENOSPC) once it has
//!   written its temporary file ([`disk_full`]).
//!
//! None is set in normal use; a durable step then costs two environment lookups.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Exit status of a process ended by [`point`] (128 + SIGKILL, as the shell reports a kill -9).
pub const CRASH_EXIT: i32 = 137;

static REACHED: AtomicUsize = AtomicUsize::new(0);

/// The error of a write to a full disk where `SOUP_DISK_FULL` is set, for the tests of what a
/// failed write leaves behind.
pub fn disk_full() -> std::io::Result<()> {
    match std::env::var_os("SOUP_DISK_FULL") {
        Some(_) => Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
        None => Ok(()),
    }
}

/// Marks a durable step: what is on disk now is a state a crash can leave behind.
pub fn point(name: &str) {
    let trace = std::env::var_os("SOUP_CRASH_TRACE");
    let at = std::env::var("SOUP_CRASH_AT").ok();
    if trace.is_none() && at.is_none() {
        return;
    }
    let n = REACHED.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(path) = trace {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{n} {name}");
        }
    }
    if at.and_then(|a| a.trim().parse::<usize>().ok()) == Some(n) {
        // SAFETY: `_exit` ends the process at once; it has no preconditions. Skipping every
        // destructor and buffered write is the point: this is what a kill leaves behind.
        unsafe { libc::_exit(CRASH_EXIT) }
    }
}
