//! The supervisor's two lifecycles: its own role, and each worker slot's
//! process. Each is an enum that carries its data and changes through one
//! function that checks the step.
//!
//! The supervisor's role:
//!
//! ```text
//! start ----------------------> Serving --SIGUSR2--> HandingOff(new binary)
//!                                 ^  |      <--given up--'   '--Took--> exit
//!                                 |  |--SIGTERM--> Stopping --all exited--> exit
//!                                 |  '--SIGTERM, withdraw_delay--> Withdrawing
//!                                 |       --the delay, or a second signal--> Stopping
//! start --upgrade-fd--> TakingOver --Handed--> Serving
//!                         '--it fails--> GaveUp --> Stopping (its workers killed)
//! ```
//!
//! A worker slot's process:
//!
//! ```text
//! Exited { restart_at } --spawn--> Live { ready: false } --Ready--> Live { ready: true }
//!   ^                                    |                                 |
//!   '---------------- reaped (restart_at: after a backoff, or never) ------'
//! ```

use std::process::Child;
use std::time::Instant;

use udpshard_shared::control::ControlChannel;

use super::upgrade::{Inbound, Outbound};

/// What this supervisor is doing with the slots.
pub(super) enum Role {
    /// A binary upgrade's new generation, standing by to take the slots
    /// over: the stats file and the slots are still the old one's.
    TakingOver(Box<Inbound>),
    /// Serving the slots. `announced_ready`: READY=1 was sent (once every
    /// worker first served).
    Serving { announced_ready: bool },
    /// Serving, while a new generation starts and takes the slots over.
    HandingOff(Box<Outbound>),
    /// SIGTERM with `withdraw_delay`: serving as before, new flows
    /// included, but not ready, until `until`; then it drains.
    Withdrawing { until: Instant },
    /// The new side gave up its upgrade: it never served, and exits.
    GaveUp,
    /// SIGTERM: the workers drain until `deadline`, and are killed after.
    /// `served`: this process held the slots (it writes the stop time).
    Stopping { deadline: Instant, served: bool },
}

impl Role {
    /// Whether `self -> next` is a step of the lifecycle.
    pub(super) fn may_become(&self, next: &Role) -> bool {
        use Role::*;
        matches!(
            (self, next),
            (TakingOver(_), Serving { .. } | GaveUp)
                | (Serving { .. }, HandingOff(_))
                | (HandingOff(_), Serving { .. })
                | (Serving { .. }, Withdrawing { .. })
                | (
                    Serving { .. } | Withdrawing { .. } | GaveUp | Stopping { .. },
                    Stopping { .. }
                )
        )
    }

    /// Whether this process writes the slots and the stats file's header.
    pub(super) fn serves(&self) -> bool {
        match self {
            Role::Serving { .. } | Role::HandingOff(_) | Role::Withdrawing { .. } => true,
            Role::Stopping { served, .. } => *served,
            Role::TakingOver(_) | Role::GaveUp => false,
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Role::TakingOver(_) => "taking over",
            Role::Serving { .. } => "serving",
            Role::HandingOff(_) => "handing off",
            Role::Withdrawing { .. } => "withdrawing",
            Role::GaveUp => "gave up",
            Role::Stopping { .. } => "stopping",
        }
    }
}

/// A worker slot: its CPU and its process, which the supervisor restarts
/// when it dies.
pub(super) struct WorkerSlot {
    pub(super) id: usize,
    pub(super) cpu: usize,
    pub(super) process: Process,
    pub(super) backoff: std::time::Duration,
    /// Crashes in a row, each within HEALTHY_RUN of its start.
    pub(super) crashes: u32,
    /// The group shrank past it: stopped, not restarted, removed on exit.
    pub(super) retiring: bool,
    /// The generation an abandoned upgrade's successor of this slot had:
    /// spent, its leases cool once this slot's process is reaped.
    pub(super) spent: Option<u64>,
}

/// A slot's process.
pub(super) enum Process {
    Live(Live),
    /// Dead or never started; started again at `restart_at` (`None`: not
    /// to be restarted by the loop: stopping, retiring, or an upgrade's).
    Exited {
        restart_at: Option<Instant>,
    },
}

/// A running worker process.
pub(super) struct Live {
    pub(super) child: Child,
    pub(super) control: ControlChannel,
    /// It said `Ready` (standing by, in an upgrade's new generation).
    pub(super) ready: bool,
    pub(super) started_at: Instant,
    /// The config generation it was given.
    pub(super) config_gen: u64,
}

impl WorkerSlot {
    pub(super) fn new(id: usize, cpu: usize) -> WorkerSlot {
        WorkerSlot {
            id,
            cpu,
            process: Process::Exited { restart_at: None },
            backoff: std::time::Duration::ZERO,
            crashes: 0,
            retiring: false,
            spent: None,
        }
    }

    pub(super) fn live(&self) -> Option<&Live> {
        match &self.process {
            Process::Live(l) => Some(l),
            Process::Exited { .. } => None,
        }
    }

    pub(super) fn live_mut(&mut self) -> Option<&mut Live> {
        match &mut self.process {
            Process::Live(l) => Some(l),
            Process::Exited { .. } => None,
        }
    }

    pub(super) fn control(&mut self) -> Option<&mut ControlChannel> {
        self.live_mut().map(|l| &mut l.control)
    }

    pub(super) fn child_mut(&mut self) -> Option<&mut Child> {
        self.live_mut().map(|l| &mut l.child)
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.live().map(|l| l.child.id())
    }

    pub(super) fn is_live(&self) -> bool {
        self.live().is_some()
    }

    /// It runs and has said it is ready.
    pub(super) fn is_ready(&self) -> bool {
        self.live().is_some_and(|l| l.ready)
    }

    pub(super) fn restart_at(&self) -> Option<Instant> {
        match self.process {
            Process::Exited { restart_at } => restart_at,
            Process::Live(_) => None,
        }
    }

    /// When to start it again, if it is not running.
    pub(super) fn set_restart(&mut self, at: Option<Instant>) {
        if let Process::Exited { restart_at } = &mut self.process {
            *restart_at = at;
        }
    }

    /// Its process runs.
    pub(super) fn started(&mut self, live: Live) {
        debug_assert!(!self.is_live(), "worker {} started twice", self.id);
        self.process = Process::Live(live);
    }

    /// Its process was reaped: what it was, if it ran.
    pub(super) fn exited(&mut self, restart_at: Option<Instant>) -> Option<Live> {
        match std::mem::replace(&mut self.process, Process::Exited { restart_at }) {
            Process::Live(l) => Some(l),
            Process::Exited { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roles_steps() {
        let serving = || Role::Serving {
            announced_ready: true,
        };
        let stopping = || Role::Stopping {
            deadline: Instant::now(),
            served: true,
        };
        let withdrawing = || Role::Withdrawing {
            until: Instant::now(),
        };
        assert!(serving().may_become(&stopping()));
        assert!(serving().may_become(&withdrawing()));
        assert!(
            withdrawing().may_become(&stopping()),
            "the delay, or a second signal"
        );
        assert!(!withdrawing().may_become(&serving()));
        assert!(withdrawing().serves());
        assert!(stopping().may_become(&stopping()), "a second signal");
        assert!(Role::GaveUp.may_become(&stopping()));
        assert!(!stopping().may_become(&serving()));
        assert!(!Role::GaveUp.may_become(&serving()));
        assert!(!serving().may_become(&Role::GaveUp));
        assert!(serving().serves() && stopping().serves());
        assert!(!Role::GaveUp.serves());
    }
}
