//! Fault injection for the engines' failure paths: a model step that fails, an engine that
//! panics, a restart held open so that its state can be observed.
//!
//! Failures of a real runner (a CUDA error, an out-of-memory, a bug) are rare and cannot be
//! produced on demand, yet what the engine does then decides whether a server stays
//! trustworthy: a failed step must not leave unwritten K/V in the prefix cache, and a panic
//! must not leave a model that never answers again. Tests arm these faults through the
//! Rust API ([`crate::pool::ModelPool::faults`]); no HTTP route, flag or setting reaches
//! them. Unarmed, they cost two relaxed atomic loads per step.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// What an armed fault does to the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepFault {
    /// The runner reports an error without computing anything, as the runners do when
    /// their input checks fail: the step's K/V are never written.
    Fail,
    /// The engine thread panics in the middle of the step.
    Panic,
}

/// Faults armed for the engines of one pool; each armed fault fires once, at the next
/// step of whichever engine steps first.
#[derive(Debug, Default)]
pub struct FaultInjection {
    failing_steps: AtomicU32,
    panicking_steps: AtomicU32,
    hold_restarts: AtomicBool,
}

impl FaultInjection {
    /// The next `count` steps fail.
    pub fn fail_next_steps(&self, count: u32) {
        self.failing_steps.fetch_add(count, Ordering::SeqCst);
    }

    /// The next step panics.
    pub fn panic_next_step(&self) {
        self.panicking_steps.fetch_add(1, Ordering::SeqCst);
    }

    /// While held, an engine that panicked waits before reloading its model, so that its
    /// "restarting" state can be seen from outside.
    pub fn hold_restarts(&self, hold: bool) {
        self.hold_restarts.store(hold, Ordering::SeqCst);
    }

    /// Whether a step fault is armed (the next step is then run by itself, not
    /// overlapped with another).
    pub fn armed(&self) -> bool {
        self.panicking_steps.load(Ordering::Relaxed) > 0
            || self.failing_steps.load(Ordering::Relaxed) > 0
    }

    /// The fault for the step about to run, if one is armed (panics first).
    pub fn take(&self) -> Option<StepFault> {
        if take_one(&self.panicking_steps) {
            Some(StepFault::Panic)
        } else if take_one(&self.failing_steps) {
            Some(StepFault::Fail)
        } else {
            None
        }
    }

    /// Blocks while restarts are held.
    pub fn wait_while_restarts_held(&self) {
        while self.hold_restarts.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Decrements `counter` if it is above zero; true if it did.
fn take_one(counter: &AtomicU32) -> bool {
    counter.load(Ordering::Relaxed) > 0
        && counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_armed_fault_fires_once_panics_first() {
        let faults = FaultInjection::default();
        assert_eq!(faults.take(), None);
        faults.fail_next_steps(2);
        faults.panic_next_step();
        assert_eq!(faults.take(), Some(StepFault::Panic));
        assert_eq!(faults.take(), Some(StepFault::Fail));
        assert_eq!(faults.take(), Some(StepFault::Fail));
        assert_eq!(faults.take(), None);
    }
}
