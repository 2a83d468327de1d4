//! The state table, walked pair by pair against [`uvm::plan`], and the exact state names.

use uvm::{plan, Operation, Plan, State};

/// The column of each state in [`expected`]'s rows. Exhaustive: a new state does not compile
/// until it has a column (and every row a cell for it).
fn column(state: State) -> usize {
    match state {
        State::NotCreated => 0,
        State::Created => 1,
        State::Running => 2,
        State::Terminated => 3,
        State::Invalid => 4,
    }
}

/// The expected table, written out independently of `plan`'s match arms: one row per operation
/// (exhaustive, no wildcard), one cell per state in [`column`] order.
fn expected(op: Operation) -> [Plan; 5] {
    use Operation as O;
    use State as S;
    const R: Plan = Plan::Refuse;
    const N: Plan = Plan::NoOp;
    let run = |on_success, on_failure| Plan::Run {
        on_success,
        on_failure,
    };
    let stay = |s| run(s, s);
    let running_only = [R, R, stay(S::Running), R, R];
    match op {
        // Cells: [NotCreated, Created, Running, Terminated, Invalid].
        O::Create => [run(S::Created, S::NotCreated), R, R, R, R],
        O::Start => [R, run(S::Running, S::Invalid), N, R, R],
        O::Terminate => [
            N,
            run(S::Terminated, S::Invalid),
            run(S::Terminated, S::Invalid),
            N,
            run(S::Terminated, S::Invalid),
        ],
        O::Wait => [
            R,
            stay(S::Created),
            stay(S::Running),
            stay(S::Terminated),
            stay(S::Invalid),
        ],
        O::ExecIntoHost
        | O::DumpStacks
        | O::Stats
        | O::GuestStats
        | O::UpdateCpuGroup
        | O::UpdateCpuLimits
        | O::UpdateMemory
        | O::UpdateCpus
        | O::UpdatePolicyFragment
        | O::CopyIn
        | O::CopyOut
        | O::AddDisk
        | O::RemoveDisk
        | O::AddShare
        | O::RemoveShare
        | O::AddNic
        | O::RemoveNic
        | O::AddPciDevice
        | O::RemovePciDevice => running_only,
        O::StartTime => [R, R, stay(S::Running), stay(S::Terminated), R],
        O::ExitStatus => [R, R, R, stay(S::Terminated), R],
        O::VmExited => [N, N, run(S::Terminated, S::Invalid), N, N],
    }
}

#[test]
fn every_state_operation_pair_matches_the_table() {
    let mut checked = 0;
    for state in State::ALL {
        for op in Operation::ALL {
            assert_eq!(
                plan(state, op),
                expected(op)[column(state)],
                "({state}, {op})"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, State::ALL.len() * Operation::ALL.len());
}

#[test]
fn terminated_is_terminal() {
    for op in Operation::ALL {
        match plan(State::Terminated, op) {
            Plan::Refuse | Plan::NoOp => {}
            Plan::Run {
                on_success,
                on_failure,
            } => {
                assert_eq!(
                    (on_success, on_failure),
                    (State::Terminated, State::Terminated),
                    "{op}"
                );
            }
        }
    }
}

#[test]
fn only_terminate_leaves_invalid() {
    for op in Operation::ALL {
        if let Plan::Run { on_success, .. } = plan(State::Invalid, op) {
            if on_success != State::Invalid {
                assert_eq!(op, Operation::Terminate);
            }
        }
    }
}

#[test]
fn only_failed_starts_and_failed_releases_lead_to_invalid() {
    for state in State::ALL {
        for op in Operation::ALL {
            if let Plan::Run {
                on_failure: State::Invalid,
                ..
            } = plan(state, op)
            {
                assert!(
                    matches!(
                        op,
                        Operation::Start | Operation::Terminate | Operation::VmExited
                    ) || state == State::Invalid,
                    "({state}, {op})"
                );
            }
        }
    }
}

#[test]
fn states_display_as_their_names() {
    let names: Vec<String> = State::ALL.iter().map(ToString::to_string).collect();
    assert_eq!(
        names,
        ["NotCreated", "Created", "Running", "Terminated", "Invalid"]
    );
}
