//! Property test: random operation sequences against the fakes with random failure injection.
//! After every step: the state is one the table allows from the previous one; Terminated is
//! terminal; every refusal names the state it was refused in; after a successful terminate the VM
//! was released exactly once and no guest connection is open.

use proptest::prelude::*;
use tokio_util::sync::CancellationToken;
use uvm::seams::{CpuLimits, ExecRequest, PolicyFragment, VmConfig};
use uvm::testing::{Call, Fakes};
use uvm::{plan, ControllerError, Operation, Plan, State, VmExit};

/// A valid limit: half of the VM's CPUs.
const HALF_A_CPU: CpuLimits = CpuLimits {
    limit: Some(5_000),
    weight: None,
};

#[derive(Debug, Clone)]
enum Step {
    Create,
    Start,
    Terminate,
    Exec,
    DumpStacks,
    Stats,
    UpdateMemory(u64),
    UpdateCpuLimits,
    UpdatePolicy,
    StartTime,
    ExitStatus,
    WaitCancelled,
    /// The VM process dies by itself.
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Create),
        3 => Just(Step::Start),
        3 => Just(Step::Terminate),
        1 => Just(Step::Exec),
        1 => Just(Step::DumpStacks),
        1 => Just(Step::Stats),
        1 => (0u64..(8 << 20)).prop_map(Step::UpdateMemory),
        1 => Just(Step::UpdateCpuLimits),
        1 => Just(Step::UpdatePolicy),
        1 => Just(Step::StartTime),
        1 => Just(Step::ExitStatus),
        1 => Just(Step::WaitCancelled),
        1 => Just(Step::Crash),
    ]
}

const FAILABLE: [Call; 12] = [
    Call::Create,
    Call::Start,
    Call::Terminate,
    Call::Release,
    Call::PrepareConnection,
    Call::Connect,
    Call::CloseConnection,
    Call::Exec,
    Call::DumpStacks,
    Call::HostStats,
    Call::UpdateMemory,
    Call::InjectPolicyFragment,
];

fn operation(step: &Step) -> Operation {
    match step {
        Step::Create => Operation::Create,
        Step::Start => Operation::Start,
        Step::Terminate => Operation::Terminate,
        Step::Exec => Operation::ExecIntoHost,
        Step::DumpStacks => Operation::DumpStacks,
        Step::Stats => Operation::Stats,
        Step::UpdateMemory(_) => Operation::UpdateMemory,
        Step::UpdateCpuLimits => Operation::UpdateCpuLimits,
        Step::UpdatePolicy => Operation::UpdatePolicyFragment,
        Step::StartTime => Operation::StartTime,
        Step::ExitStatus => Operation::ExitStatus,
        Step::WaitCancelled => Operation::Wait,
        Step::Crash => Operation::VmExited,
    }
}

/// States the table allows after `op` from `from` (success or failure).
fn allowed_after(from: State, op: Operation) -> Vec<State> {
    match plan(from, op) {
        Plan::Refuse | Plan::NoOp => vec![from],
        Plan::Run {
            on_success,
            on_failure,
        } => vec![from, on_success, on_failure],
    }
}

async fn run(steps: Vec<Step>, failures: Vec<(usize, usize)>) -> Result<(), TestCaseError> {
    let f = Fakes::new();
    for (call, nth) in failures {
        f.script.fail_nth(FAILABLE[call % FAILABLE.len()], nth);
    }
    let c = &f.controller;
    for step in steps {
        let before = c.state();
        let op = operation(&step);
        let result: Result<(), ControllerError> = match &step {
            Step::Create => c.create_vm(VmConfig::default()).await,
            Step::Start => c.start_vm().await,
            Step::Terminate => c.terminate_vm().await,
            Step::Exec => c.exec_into_host(ExecRequest::new(["true"])).await.map(drop),
            Step::DumpStacks => c.dump_stacks().await.map(drop),
            Step::Stats => c.stats().await.map(drop),
            Step::UpdateMemory(b) => c.update_memory(*b).await.map(drop),
            Step::UpdateCpuLimits => c.update_cpu_limits(HALF_A_CPU).await,
            Step::UpdatePolicy => c.update_policy_fragment(&PolicyFragment("f".into())).await,
            Step::StartTime => c.start_time().map(drop),
            Step::ExitStatus => c.exit_status().map(drop),
            Step::WaitCancelled => {
                let token = CancellationToken::new();
                token.cancel();
                match c.wait(&token).await {
                    Err(ControllerError::Cancelled { .. }) | Ok(()) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Step::Crash => {
                if let Some(vm) = f.backend.last_vm() {
                    if before == State::Running {
                        vm.exit(VmExit {
                            code: Some(1),
                            signal: None,
                            reason: None,
                        });
                        // Let the waiter finish its cleanup (it signals `wait`).
                        let _ = c.wait(&CancellationToken::new()).await;
                    }
                }
                Ok(())
            }
        };
        let after = c.state();

        if let Err(ControllerError::WrongState {
            state, operation, ..
        }) = &result
        {
            prop_assert_eq!(
                *state,
                before,
                "a refusal names the state it was refused in"
            );
            prop_assert_eq!(*operation, op);
            prop_assert_eq!(plan(before, op), Plan::Refuse);
        }
        if let Err(e) = &result {
            prop_assert!(e.refused_in().is_none() || e.refused_in() == Some(before));
        }
        prop_assert!(
            allowed_after(before, op).contains(&after),
            "{:?}: {} -> {} not allowed ({:?})",
            step,
            before,
            after,
            result
        );
        if before == State::Terminated {
            prop_assert_eq!(after, State::Terminated, "Terminated is terminal");
        }
        if after == State::Terminated {
            let vm = f.backend.last_vm().expect("a terminated VM was created");
            prop_assert_eq!(vm.successful_releases(), 1, "released exactly once");
            prop_assert!(!f.guest.is_connected(), "no guest connection stays open");
            prop_assert!(!f.guest.is_prepared(), "no guest listener stays open");
        }
        if matches!(step, Step::Terminate) && result.is_ok() {
            prop_assert!(matches!(after, State::Terminated | State::NotCreated));
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_operation_sequences_keep_the_state_machine_sound(
        steps in prop::collection::vec(step(), 1..24),
        failures in prop::collection::vec((0usize..FAILABLE.len(), 1usize..4), 0..4),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run(steps, failures))?;
    }
}
