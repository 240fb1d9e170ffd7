//! The sandbox lifecycle: one enum of states and one transition function
//! that every operation goes through. An illegal transition is a typed
//! [`InvalidTransition`] (the API maps it to 409), never a panic.
//!
//! ```text
//!            create                 pause
//!   (none) ---------> Creating --> Running <----> Paused
//!                        |           |  resume      |
//!                        |           | stop         | stop
//!     start              |           v              v
//!   Stopped/Crashed --> Starting  Stopping ------> Stopped
//!                                    (QEMU exits)
//!   Running/Paused/Starting --(QEMU died)--> Crashed
//!   any --destroy--> Destroying --> (record removed)
//! ```
//!
//! `Starting` is separate from `Creating` because recovery differs: a
//! sandbox that never finished creating is removed, one that failed to
//! start again keeps its disk.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// First boot in progress.
    Creating,
    /// Boot of an existing (stopped or crashed) sandbox in progress.
    Starting,
    Running,
    Paused,
    /// Shutdown requested; QEMU has not exited yet.
    Stopping,
    Stopped,
    /// QEMU exited without being asked to.
    Crashed,
    /// Teardown in progress.
    Destroying,
}

/// What happens to a sandbox: user operations and observed events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Start,
    Pause,
    Resume,
    Stop,
    Destroy,
    /// Use the guest agent (exec, files): allowed only while running; not a transition.
    Agent,
    /// Take a snapshot: allowed while running or paused, which it stays.
    Snapshot,
    /// The guest agent answered after a boot.
    Booted,
    /// A boot did not reach the agent; QEMU was killed.
    BootFailed,
    /// QEMU exited after a requested stop.
    Halted,
    /// QEMU exited unexpectedly.
    Died,
    /// Replace the sandbox's memory, devices and disk with a snapshot's:
    /// its VM (if any) is killed and it boots again from the snapshot.
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {op} a sandbox that is {from}")]
pub struct InvalidTransition {
    pub from: SandboxState,
    pub op: Operation,
}

impl SandboxState {
    /// The transition table. Returns the state after `op`, or why not.
    pub fn on(self, op: Operation) -> Result<SandboxState, InvalidTransition> {
        use Operation as O;
        use SandboxState as S;
        let next = match (self, op) {
            (S::Stopped | S::Crashed, O::Start) => S::Starting,
            (S::Running, O::Pause) => S::Paused,
            (S::Paused, O::Resume) => S::Running,
            (S::Running | S::Paused, O::Stop) => S::Stopping,
            (_, O::Destroy) => S::Destroying,
            (S::Running, O::Agent) => S::Running,
            (S::Running, O::Snapshot) => S::Running,
            (S::Paused, O::Snapshot) => S::Paused,
            (S::Running | S::Paused | S::Stopped | S::Crashed, O::Rollback) => S::Starting,
            (S::Creating | S::Starting, O::Booted) => S::Running,
            (S::Starting, O::BootFailed) => S::Stopped,
            (S::Stopping, O::Halted) => S::Stopped,
            (S::Starting | S::Running | S::Paused, O::Died) => S::Crashed,
            (S::Stopping, O::Died) => S::Stopped,
            (from, op) => return Err(InvalidTransition { from, op }),
        };
        Ok(next)
    }

    /// States in which a QEMU process is expected to exist.
    pub fn expects_process(self) -> bool {
        matches!(
            self,
            SandboxState::Creating
                | SandboxState::Starting
                | SandboxState::Running
                | SandboxState::Paused
                | SandboxState::Stopping
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopping => "stopping",
            SandboxState::Stopped => "stopped",
            SandboxState::Crashed => "crashed",
            SandboxState::Destroying => "destroying",
        }
    }

    pub const ALL: [SandboxState; 8] = [
        SandboxState::Creating,
        SandboxState::Starting,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Stopping,
        SandboxState::Stopped,
        SandboxState::Crashed,
        SandboxState::Destroying,
    ];
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown sandbox state {s:?}"))
    }
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Start => "start",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Stop => "stop",
            Operation::Destroy => "destroy",
            Operation::Agent => "use the agent of",
            Operation::Snapshot => "snapshot",
            Operation::Booted => "finish booting",
            Operation::BootFailed => "fail booting",
            Operation::Halted => "halt",
            Operation::Died => "crash",
            Operation::Rollback => "roll back",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Operation as O;
    use super::SandboxState as S;
    use super::*;

    const ALL_OPS: [Operation; 12] = [
        O::Rollback,
        O::Start,
        O::Snapshot,
        O::Pause,
        O::Resume,
        O::Stop,
        O::Destroy,
        O::Agent,
        O::Booted,
        O::BootFailed,
        O::Halted,
        O::Died,
    ];

    /// The whole table, written out: every pair not listed is illegal.
    const LEGAL: &[(SandboxState, Operation, SandboxState)] = &[
        (S::Creating, O::Booted, S::Running),
        (S::Creating, O::Destroy, S::Destroying),
        (S::Starting, O::Booted, S::Running),
        (S::Starting, O::BootFailed, S::Stopped),
        (S::Starting, O::Died, S::Crashed),
        (S::Starting, O::Destroy, S::Destroying),
        (S::Running, O::Pause, S::Paused),
        (S::Running, O::Stop, S::Stopping),
        (S::Running, O::Agent, S::Running),
        (S::Running, O::Snapshot, S::Running),
        (S::Running, O::Rollback, S::Starting),
        (S::Paused, O::Rollback, S::Starting),
        (S::Stopped, O::Rollback, S::Starting),
        (S::Crashed, O::Rollback, S::Starting),
        (S::Running, O::Died, S::Crashed),
        (S::Running, O::Destroy, S::Destroying),
        (S::Paused, O::Resume, S::Running),
        (S::Paused, O::Snapshot, S::Paused),
        (S::Paused, O::Stop, S::Stopping),
        (S::Paused, O::Died, S::Crashed),
        (S::Paused, O::Destroy, S::Destroying),
        (S::Stopping, O::Halted, S::Stopped),
        (S::Stopping, O::Died, S::Stopped),
        (S::Stopping, O::Destroy, S::Destroying),
        (S::Stopped, O::Start, S::Starting),
        (S::Stopped, O::Destroy, S::Destroying),
        (S::Crashed, O::Start, S::Starting),
        (S::Crashed, O::Destroy, S::Destroying),
        (S::Destroying, O::Destroy, S::Destroying),
    ];

    #[test]
    fn transition_table_is_exactly_the_legal_list() {
        for from in S::ALL {
            for op in ALL_OPS {
                let want = LEGAL
                    .iter()
                    .find(|(f, o, _)| *f == from && *o == op)
                    .map(|(_, _, to)| *to);
                match (from.on(op), want) {
                    (Ok(got), Some(want)) => assert_eq!(got, want, "{from} --{op:?}-->"),
                    (Err(err), None) => assert_eq!(err, InvalidTransition { from, op }),
                    (got, want) => panic!("{from} --{op:?}--> got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn errors_read_well() {
        let err = S::Stopped.on(O::Pause).unwrap_err();
        assert_eq!(err.to_string(), "cannot pause a sandbox that is stopped");
        let err = S::Paused.on(O::Agent).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot use the agent of a sandbox that is paused"
        );
    }

    #[test]
    fn states_round_trip_as_text() {
        for state in S::ALL {
            assert_eq!(state.as_str().parse::<S>().unwrap(), state);
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{state}\"")
            );
        }
        assert!("zombie".parse::<S>().is_err());
    }
}
