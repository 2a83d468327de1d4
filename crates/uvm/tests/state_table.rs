//! The state table, walked pair by pair against [`uvm::plan`], and the exact state names.

use uvm::{plan, Operation, Plan, State};

/// The expected table, written out independently of `plan`'s match arms.
fn expected(state: State, op: Operation) -> Plan {
    use Operation as O;
    use State as S;
    let run = |on_success, on_failure| Plan::Run {
        on_success,
        on_failure,
    };
    let stay = |s| run(s, s);
    let running_only = matches!(
        op,
        O::ExecIntoHost
            | O::DumpStacks
            | O::Stats
            | O::GuestStats
            | O::UpdateCpuGroup
            | O::UpdateCpuLimits
            | O::UpdateMemory
            | O::UpdatePolicyFragment
    );
    if running_only {
        return if state == S::Running {
            stay(S::Running)
        } else {
            Plan::Refuse
        };
    }
    match (op, state) {
        (O::Create, S::NotCreated) => run(S::Created, S::NotCreated),
        (O::Create, _) => Plan::Refuse,
        (O::Start, S::Created) => run(S::Running, S::Invalid),
        (O::Start, S::Running) => Plan::NoOp,
        (O::Start, _) => Plan::Refuse,
        (O::Terminate, S::NotCreated | S::Terminated) => Plan::NoOp,
        (O::Terminate, _) => run(S::Terminated, S::Invalid),
        (O::Wait, S::NotCreated) => Plan::Refuse,
        (O::Wait, s) => stay(s),
        (O::StartTime, S::Running | S::Terminated) => stay(state),
        (O::StartTime, _) => Plan::Refuse,
        (O::ExitStatus, S::Terminated) => stay(S::Terminated),
        (O::ExitStatus, _) => Plan::Refuse,
        (O::VmExited, S::Running) => run(S::Terminated, S::Invalid),
        (O::VmExited, S::Created | S::Invalid) => stay(state),
        (O::VmExited, S::NotCreated | S::Terminated) => Plan::NoOp,
        _ => unreachable!("running-only operations handled above"),
    }
}

#[test]
fn every_state_operation_pair_matches_the_table() {
    let mut checked = 0;
    for state in State::ALL {
        for op in Operation::ALL {
            assert_eq!(plan(state, op), expected(state, op), "({state}, {op})");
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
