//! The VM's current state, changed only through the table.
//!
//! [`Machine`] owns the state and everything whose existence depends on it: the reason of an
//! Invalid VM and the exit status of a Terminated one live *inside* the state, so a Terminated
//! VM without an exit status, or an Invalid one without a reason, cannot be represented. Its
//! fields are private: the only way to change the state is [`Machine::commit`], which reads the
//! target from [`plan`] — operations report an [`Outcome`], never a state.

use std::collections::VecDeque;
use std::time::SystemTime;

use crate::state::{plan, Operation, Plan, Reason, State, VmExit};

/// One state change, kept for diagnosis (the last [`HISTORY_LEN`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
    /// What moved it.
    pub operation: Operation,
}

/// How many transitions [`crate::Controller::history`] keeps.
pub const HISTORY_LEN: usize = 32;

/// How and when a Terminated VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// When the VM process ended (or, never started, when it was terminated).
    pub stopped_at: SystemTime,
    /// Why it ended.
    pub reason: Reason,
    /// How the VM process ended, when it was ever started.
    pub exit: Option<VmExit>,
}

/// How an admitted operation ended; the table turns it into the next state.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The operation did what it set out to do and the VM lives on.
    Succeeded,
    /// The operation did what it set out to do and the VM is gone: how it ended.
    Ended(ExitStatus),
    /// The operation failed, for this reason.
    Failed(Reason),
}

/// What the table allows an operation to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Allowed; nothing to do (an idempotent repeat).
    NoOp,
    /// Allowed; run it and commit its [`Outcome`].
    Run,
}

/// A state together with what only that state has.
#[derive(Debug)]
enum Phase {
    NotCreated,
    Created,
    Running,
    Invalid(Reason),
    Terminated(ExitStatus),
}

impl Phase {
    const fn state(&self) -> State {
        match self {
            Phase::NotCreated => State::NotCreated,
            Phase::Created => State::Created,
            Phase::Running => State::Running,
            Phase::Invalid(_) => State::Invalid,
            Phase::Terminated(_) => State::Terminated,
        }
    }

    /// The phase of `target` built from `outcome`, or `None` when the outcome cannot produce that
    /// state (an Invalid VM needs a reason, a Terminated one its exit status).
    fn enter(target: State, outcome: Outcome) -> Option<Phase> {
        match (target, outcome) {
            (State::NotCreated, Outcome::Succeeded) => Some(Phase::NotCreated),
            (State::Created, Outcome::Succeeded) => Some(Phase::Created),
            (State::Running, Outcome::Succeeded) => Some(Phase::Running),
            (State::Invalid, Outcome::Failed(reason)) => Some(Phase::Invalid(reason)),
            (State::Terminated, Outcome::Ended(status)) => Some(Phase::Terminated(status)),
            (
                State::NotCreated | State::Created | State::Running,
                Outcome::Ended(_) | Outcome::Failed(_),
            )
            | (State::Invalid, Outcome::Succeeded | Outcome::Ended(_))
            | (State::Terminated, Outcome::Succeeded | Outcome::Failed(_)) => None,
        }
    }
}

/// The state of one VM and its recent history. See the module documentation.
#[derive(Debug)]
pub(crate) struct Machine {
    phase: Phase,
    history: VecDeque<Transition>,
}

impl Machine {
    /// A VM that does not exist yet.
    pub(crate) fn new() -> Machine {
        Machine {
            phase: Phase::NotCreated,
            history: VecDeque::new(),
        }
    }

    pub(crate) const fn state(&self) -> State {
        self.phase.state()
    }

    /// Why the VM is Invalid or Terminated; `None` in the other states.
    pub(crate) fn reason(&self) -> Option<&Reason> {
        phase_reason(&self.phase)
    }

    /// How the VM ended; `None` unless Terminated.
    pub(crate) fn exit_status(&self) -> Option<&ExitStatus> {
        match &self.phase {
            Phase::Terminated(status) => Some(status),
            Phase::NotCreated | Phase::Created | Phase::Running | Phase::Invalid(_) => None,
        }
    }

    pub(crate) fn history(&self) -> impl Iterator<Item = &Transition> {
        self.history.iter()
    }

    /// Asks the table whether `operation` may run in the current state; a refusal returns it.
    pub(crate) fn admit(&self, operation: Operation) -> Result<Admit, State> {
        match plan(self.state(), operation) {
            Plan::Refuse => Err(self.state()),
            Plan::NoOp => Ok(Admit::NoOp),
            Plan::Run { .. } => Ok(Admit::Run),
        }
    }

    /// The only place the state is written: `operation` ended with `outcome`, and the table says
    /// which state that leads to from here. Returns the state after.
    ///
    /// The controller commits only operations it admitted and whose state nobody else moved
    /// meanwhile (the operation lock and the cleanup owner see to that). A commit the table does
    /// not plan for is a controller bug: it is logged, changes nothing, and fails debug builds.
    pub(crate) fn commit(&mut self, operation: Operation, outcome: Outcome) -> State {
        let from = self.state();
        let (on_success, on_failure) = match plan(from, operation) {
            Plan::Run {
                on_success,
                on_failure,
            } => (on_success, on_failure),
            Plan::Refuse | Plan::NoOp => {
                return self.unplanned(operation, "the table has no transition here")
            }
        };
        let to = match &outcome {
            Outcome::Succeeded | Outcome::Ended(_) => on_success,
            Outcome::Failed(_) => on_failure,
        };
        if to == from {
            return from;
        }
        let Some(phase) = Phase::enter(to, outcome) else {
            return self.unplanned(operation, "the outcome cannot produce the planned state");
        };
        tracing::info!(%from, %to, %operation, reason = ?phase_reason(&phase), "state change");
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(Transition {
            from,
            to,
            operation,
        });
        self.phase = phase;
        to
    }

    fn unplanned(&self, operation: Operation, why: &str) -> State {
        let state = self.state();
        tracing::error!(%state, %operation, why, "unplanned commit ignored");
        debug_assert!(false, "unplanned commit of {operation} in {state}: {why}");
        state
    }
}

fn phase_reason(phase: &Phase) -> Option<&Reason> {
    match phase {
        Phase::Invalid(reason) => Some(reason),
        Phase::Terminated(status) => Some(&status.reason),
        Phase::NotCreated | Phase::Created | Phase::Running => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended() -> Outcome {
        Outcome::Ended(ExitStatus {
            stopped_at: SystemTime::UNIX_EPOCH,
            reason: Reason::TerminateRequested,
            exit: None,
        })
    }

    fn failed() -> Outcome {
        Outcome::Failed(Reason::ReleaseFailed {
            message: "scripted".into(),
        })
    }

    #[test]
    fn commits_take_their_target_from_the_table() {
        let mut m = Machine::new();
        assert_eq!(
            m.commit(Operation::Create, Outcome::Succeeded),
            State::Created
        );
        assert_eq!(
            m.commit(Operation::Start, Outcome::Succeeded),
            State::Running
        );
        assert_eq!(m.commit(Operation::Terminate, failed()), State::Invalid);
        assert!(matches!(m.reason(), Some(Reason::ReleaseFailed { .. })));
        assert_eq!(m.commit(Operation::Terminate, ended()), State::Terminated);
        assert_eq!(m.reason(), Some(&Reason::TerminateRequested));
        assert!(m.exit_status().is_some());
        let ops: Vec<Operation> = m.history().map(|t| t.operation).collect();
        assert_eq!(
            ops,
            [
                Operation::Create,
                Operation::Start,
                Operation::Terminate,
                Operation::Terminate
            ]
        );
    }

    #[test]
    fn a_commit_that_stays_keeps_the_first_reason() {
        let mut m = Machine::new();
        m.commit(Operation::Create, Outcome::Succeeded);
        let start_failed = Reason::StartFailed {
            step: crate::StartStep::StartVm,
            message: "scripted".into(),
        };
        m.commit(Operation::Start, Outcome::Failed(start_failed.clone()));
        assert_eq!(m.commit(Operation::Terminate, failed()), State::Invalid);
        assert_eq!(m.reason(), Some(&start_failed));
        assert_eq!(m.history().count(), 2);
    }

    #[test]
    fn the_state_diagrams_quiet_states_have_no_reason() {
        let mut m = Machine::new();
        assert_eq!(m.reason(), None);
        m.commit(Operation::Create, Outcome::Succeeded);
        assert_eq!(m.reason(), None);
        assert_eq!(m.exit_status(), None);
    }

    #[test]
    fn admit_refuses_with_the_current_state() {
        let m = Machine::new();
        assert_eq!(m.admit(Operation::Start), Err(State::NotCreated));
        assert_eq!(m.admit(Operation::Terminate), Ok(Admit::NoOp));
        assert_eq!(m.admit(Operation::Create), Ok(Admit::Run));
    }

    #[test]
    #[should_panic(expected = "unplanned commit")]
    fn an_unplanned_commit_fails_debug_builds() {
        let mut m = Machine::new();
        m.commit(Operation::Start, Outcome::Succeeded);
    }

    #[test]
    #[should_panic(expected = "cannot produce")]
    fn terminated_without_an_exit_status_cannot_be_committed() {
        let mut m = Machine::new();
        m.commit(Operation::Create, Outcome::Succeeded);
        m.commit(Operation::Terminate, Outcome::Succeeded);
    }
}
