//! How every method runs beyond its configuration: over which processes, who watches it, and
//! where it starts. One shape for all of them: [`crate::uniform_soup`], [`crate::greedy_soup`],
//! [`crate::learned_soup`] and [`crate::run_mehl`] each take a [`RunOptions`].

use crate::mehl::{Event, MehlProgress};
use crate::traits::{Collective, SingleProcess};

/// How a method is driven beyond its configuration. [`RunOptions::default`] is a fresh run in
/// one process that nobody watches.
pub struct RunOptions<'a> {
    /// Continue from this state: the `progress` of an [`Event::BatchEnd`] of an earlier MEHL run
    /// with the same store, objective and configuration. `None` starts afresh. Only MEHL and
    /// AdaMerging save and resume.
    pub progress: Option<MehlProgress>,
    /// The processes the run is shared over (spec §3.7): [`SingleProcess`] by default. Uniform
    /// and MEHL share their work; the other methods run in one process.
    pub comm: &'a dyn Collective,
    /// Sees every [`Event`] (progress display, saving progress, tests of the invariants).
    pub observer: Option<&'a mut dyn FnMut(&Event)>,
    /// θ, the projection and ∇θ's norm by candle ops on the tensors' device (the path every
    /// device but the CPU takes) even on the CPU: for tests of that path. Off by default.
    pub portable: bool,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        Self {
            progress: None,
            comm: &SingleProcess,
            observer: None,
            portable: false,
        }
    }
}

impl<'a> RunOptions<'a> {
    /// A fresh run in one process, reporting to `observer`.
    pub fn new(observer: &'a mut dyn FnMut(&Event)) -> Self {
        Self {
            observer: Some(observer),
            ..Self::default()
        }
    }

    /// The run on the device-portable path ([`Self::portable`]) when `yes`.
    pub fn portable(mut self, yes: bool) -> Self {
        self.portable = yes;
        self
    }

    /// The run continued from `progress`, when given.
    pub fn resume(mut self, progress: Option<MehlProgress>) -> Self {
        self.progress = progress;
        self
    }

    /// The run as one of `comm.world_size()` processes.
    pub fn on(mut self, comm: &'a dyn Collective) -> Self {
        self.comm = comm;
        self
    }

    /// Calls the observer, if any, with `event`.
    pub(crate) fn notify(&mut self, event: &Event) {
        if let Some(observer) = self.observer.as_mut() {
            observer(event);
        }
    }
}
