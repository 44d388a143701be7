//! Crash points: the durable steps of soup's writers, named, so that the crash tests can end the
//! process at each one and check what a resumed run makes of the state left behind.
//!
//! - `SOUP_CRASH_TRACE=FILE` appends one line per durable step reached (`N name`) to FILE;
//! - `SOUP_CRASH_AT=N` ends the process at the N-th durable step as `kill -9` would: no
//!   destructors, no clean-up, exit status 137.
//!
//! Neither variable is set in normal use; a durable step then costs two environment lookups.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Exit status of a process ended by [`point`] (128 + SIGKILL, as the shell reports a kill -9).
pub const CRASH_EXIT: i32 = 137;

static REACHED: AtomicUsize = AtomicUsize::new(0);

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
