//! Failure paths: state guards, the terminate cleanup chain, start failures, error propagation,
//! deadlines.

use std::time::Duration;

use uvm::seams::{CpuLimits, ExecRequest, PolicyFragment, VmConfig};
use uvm::testing::{Call, Fakes};
use uvm::{
    ControllerError, GuestError, HostError, Operation, Reason, SeamError, StartStep, State,
    Timeouts,
};

fn assert_wrong_state(err: ControllerError, op: Operation, state: State) {
    assert!(
        matches!(err, ControllerError::WrongState { operation, state: s, .. } if operation == op && s == state),
        "expected WrongState({op}, {state}), got {err:?}"
    );
}

// --- State guards (8) ---

#[tokio::test]
async fn start_vm_is_refused_in_not_created_terminated_and_invalid() {
    let f = Fakes::new();
    let err = f.controller.start_vm().await.expect_err("not created");
    assert_wrong_state(err, Operation::Start, State::NotCreated);

    let f = Fakes::terminated().await;
    let err = f.controller.start_vm().await.expect_err("terminated");
    assert_wrong_state(err, Operation::Start, State::Terminated);

    let f = Fakes::invalid().await;
    let err = f.controller.start_vm().await.expect_err("invalid");
    assert_wrong_state(err, Operation::Start, State::Invalid);
    assert!(f.script.calls().is_empty(), "refusals touch no seam");
}

#[tokio::test]
async fn exec_into_host_is_refused_when_terminated() {
    let f = Fakes::terminated().await;
    let err = f
        .controller
        .exec_into_host(ExecRequest::new(["true"]))
        .await
        .expect_err("terminated");
    assert_wrong_state(err, Operation::ExecIntoHost, State::Terminated);
    assert_eq!(f.script.count(Call::Exec), 0);
}

#[tokio::test]
async fn exec_into_host_refuses_a_terminal_with_stderr_before_looking_at_the_state() {
    // NotCreated: the precondition error wins over the state error.
    let f = Fakes::new();
    let mut request = ExecRequest::new(["sh"]);
    request.terminal = true;
    request.stderr = Some(Box::new(tokio::io::sink()));
    let err = f
        .controller
        .exec_into_host(request)
        .await
        .expect_err("precondition");
    assert!(matches!(err, ControllerError::TerminalWithStderr));
}

#[tokio::test]
async fn exec_into_host_refuses_a_terminal_size_without_a_terminal_before_looking_at_the_state() {
    let f = Fakes::new();
    let mut request = ExecRequest::new(["sh"]);
    let (_tx, rx) = tokio::sync::watch::channel(uvm::seams::TerminalSize { rows: 24, cols: 80 });
    request.terminal_size = Some(rx);
    let err = f
        .controller
        .exec_into_host(request)
        .await
        .expect_err("precondition");
    assert!(
        matches!(
            err,
            ControllerError::InvalidArgument {
                what: "terminal size",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn update_operations_are_refused_when_not_running() {
    for f in [Fakes::created().await, Fakes::terminated().await] {
        let state = f.controller.state();
        let c = &f.controller;
        assert_wrong_state(
            c.update_cpu_group("g1").await.expect_err("refused"),
            Operation::UpdateCpuGroup,
            state,
        );
        assert_wrong_state(
            c.update_cpu_limits(HALF_A_CPU).await.expect_err("refused"),
            Operation::UpdateCpuLimits,
            state,
        );
        assert_wrong_state(
            c.update_memory(1 << 30).await.expect_err("refused"),
            Operation::UpdateMemory,
            state,
        );
        assert_wrong_state(
            c.update_cpus(2).await.expect_err("refused"),
            Operation::UpdateCpus,
            state,
        );
        assert_wrong_state(
            c.update_policy_fragment(&PolicyFragment("p".into()))
                .await
                .expect_err("refused"),
            Operation::UpdatePolicyFragment,
            state,
        );
        assert_eq!(f.script.count(Call::UpdateMemory), 0);
    }
}

#[tokio::test]
async fn stats_is_refused_when_terminated() {
    let f = Fakes::terminated().await;
    let err = f.controller.stats().await.expect_err("terminated");
    assert_wrong_state(err, Operation::Stats, State::Terminated);
}

#[tokio::test]
async fn wait_is_refused_when_not_created() {
    let f = Fakes::new();
    let err = f
        .controller
        .wait(&tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("not created");
    assert_wrong_state(err, Operation::Wait, State::NotCreated);
}

#[tokio::test]
async fn dump_stacks_is_refused_when_terminated() {
    let f = Fakes::terminated().await;
    let err = f.controller.dump_stacks().await.expect_err("terminated");
    assert_wrong_state(err, Operation::DumpStacks, State::Terminated);
}

#[tokio::test]
async fn update_cpu_group_rejects_an_empty_id_even_when_running() {
    let f = Fakes::running().await;
    let err = f
        .controller
        .update_cpu_group("")
        .await
        .expect_err("empty id");
    assert!(matches!(
        err,
        ControllerError::InvalidArgument {
            what: "cpu group id",
            ..
        }
    ));
    assert_eq!(f.script.count(Call::SetCpuGroup), 0);
}

#[tokio::test]
async fn create_vm_twice_is_refused_and_keeps_the_first_vm() {
    let f = Fakes::created().await;
    let err = f
        .controller
        .create_vm(VmConfig::default())
        .await
        .expect_err("duplicate");
    assert_wrong_state(err, Operation::Create, State::Created);
    assert_eq!(f.script.count(Call::Create), 1);
}

#[tokio::test]
async fn create_vm_failure_leaves_not_created() {
    let f = Fakes::new();
    f.script.fail_nth(Call::Create, 1);
    let err = f
        .controller
        .create_vm(VmConfig::default())
        .await
        .expect_err("scripted");
    assert!(matches!(
        err,
        ControllerError::CreateFailed {
            source: HostError::Failed { .. },
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::NotCreated);
    f.controller
        .create_vm(VmConfig::default())
        .await
        .expect("a retry can create");
}

// --- TerminateVM cleanup chain (6) ---

#[tokio::test]
async fn terminate_runs_terminate_then_close_connection_then_release() {
    let f = Fakes::running().await;
    f.controller.terminate_vm().await.expect("terminate");
    f.assert_terminated_through_the_whole_chain();
    assert_eq!(
        f.controller.status().reason,
        Some(Reason::TerminateRequested)
    );
}

#[tokio::test]
async fn terminate_swallows_a_close_connection_failure_and_still_releases() {
    let f = Fakes::running().await;
    f.script.fail_always(Call::CloseConnection);
    f.controller
        .terminate_vm()
        .await
        .expect("close failure is swallowed");
    f.assert_terminated_through_the_whole_chain();
}

#[tokio::test]
async fn terminate_swallows_a_vm_terminate_failure_and_still_closes_and_releases() {
    let f = Fakes::running().await;
    f.script.fail_always(Call::Terminate);
    f.controller
        .terminate_vm()
        .await
        .expect("terminate failure is swallowed");
    f.assert_terminated_through_the_whole_chain();
}

#[tokio::test]
async fn terminate_leaves_the_vm_invalid_when_release_fails() {
    let f = Fakes::running().await;
    f.script.fail_always(Call::Release);
    let err = f
        .controller
        .terminate_vm()
        .await
        .expect_err("release fails");
    assert!(matches!(
        err,
        ControllerError::ReleaseFailed {
            source: HostError::Failed { .. },
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::Invalid);
    assert!(matches!(
        f.controller.status().reason,
        Some(Reason::ReleaseFailed { .. })
    ));
}

#[tokio::test]
async fn terminate_from_invalid_recovers_to_terminated() {
    let f = Fakes::running().await;
    f.script.fail_nth(Call::Release, 1);
    let _ = f
        .controller
        .terminate_vm()
        .await
        .expect_err("first release fails");
    f.script.clear_log();
    f.controller.terminate_vm().await.expect("retry succeeds");
    f.assert_terminated_through_the_whole_chain();
    assert_eq!(f.vm().successful_releases(), 1);
}

#[tokio::test]
async fn terminate_retry_that_fails_again_stays_invalid() {
    let f = Fakes::running().await;
    f.script.fail_always(Call::Release);
    let _ = f.controller.terminate_vm().await.expect_err("first");
    let err = f.controller.terminate_vm().await.expect_err("second");
    assert!(matches!(err, ControllerError::ReleaseFailed { .. }));
    assert_eq!(f.controller.state(), State::Invalid);
    assert_eq!(f.script.count(Call::Release), 2);
}

#[tokio::test]
async fn terminate_of_a_never_started_vm_skips_the_terminate_step() {
    let f = Fakes::created().await;
    f.script.clear_log();
    f.controller.terminate_vm().await.expect("terminate");
    assert_eq!(f.script.calls(), vec![Call::CloseConnection, Call::Release]);
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(f.controller.start_time().expect("terminated"), None);
}

// --- StartVM failure paths ---

#[tokio::test]
async fn start_failure_of_the_vm_leaves_invalid_and_names_the_step() {
    let f = Fakes::created().await;
    f.script.fail_nth(Call::Start, 1);
    let err = f.controller.start_vm().await.expect_err("scripted");
    assert!(matches!(
        err,
        ControllerError::StartFailed {
            step: StartStep::StartVm,
            source: SeamError::Host(HostError::Failed { .. }),
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::Invalid);
    assert!(matches!(
        f.controller.status().reason,
        Some(Reason::StartFailed {
            step: StartStep::StartVm,
            ..
        })
    ));
    // A half-started VM is cleaned up by terminate, including the terminate step.
    f.script.clear_log();
    f.controller.terminate_vm().await.expect("cleanup");
    f.assert_terminated_through_the_whole_chain();
}

#[tokio::test]
async fn start_failure_to_prepare_the_listener_leaves_invalid_before_the_vm_starts() {
    let f = Fakes::created().await;
    f.script.fail_nth(Call::PrepareConnection, 1);
    let err = f.controller.start_vm().await.expect_err("scripted");
    assert!(matches!(
        err,
        ControllerError::StartFailed {
            step: StartStep::PrepareGuestListener,
            ..
        }
    ));
    assert_eq!(f.script.count(Call::Start), 0, "the VM was never started");
    assert_eq!(f.controller.state(), State::Invalid);
    f.script.clear_log();
    f.controller.terminate_vm().await.expect("cleanup");
    assert_eq!(f.script.calls(), vec![Call::CloseConnection, Call::Release]);
}

#[tokio::test]
async fn start_failure_to_connect_the_guest_leaves_invalid() {
    let f = Fakes::created().await;
    f.script.fail_nth(Call::Connect, 1);
    let err = f.controller.start_vm().await.expect_err("scripted");
    assert!(matches!(
        err,
        ControllerError::StartFailed {
            step: StartStep::ConnectGuest,
            source: SeamError::Guest(GuestError::Rejected { .. }),
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::Invalid);
}

#[tokio::test]
async fn start_failure_to_apply_the_policy_leaves_invalid() {
    let f = Fakes::new();
    let config = VmConfig {
        security_policy: Some(uvm::seams::SecurityPolicy("deny".into())),
        ..VmConfig::default()
    };
    f.controller.create_vm(config).await.expect("create");
    f.script.fail_nth(Call::SetSecurityPolicy, 1);
    let err = f.controller.start_vm().await.expect_err("scripted");
    assert!(matches!(
        err,
        ControllerError::StartFailed {
            step: StartStep::ApplySecurityPolicy,
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::Invalid);
}

#[tokio::test(start_paused = true)]
async fn start_fails_at_the_guest_connect_deadline_when_the_guest_never_answers() {
    let timeouts = Timeouts {
        guest_connect: Duration::from_secs(5),
        ..Timeouts::default()
    };
    let f = Fakes::with_timeouts(timeouts);
    f.controller
        .create_vm(VmConfig::default())
        .await
        .expect("create");
    let _never = f.script.hold(Call::Connect);
    let err = f.controller.start_vm().await.expect_err("deadline");
    assert!(matches!(
        err,
        ControllerError::StartFailed {
            step: StartStep::ConnectGuest,
            source: SeamError::Guest(GuestError::Timeout { after, .. }),
            ..
        } if after == Duration::from_secs(5)
    ));
    assert_eq!(f.controller.state(), State::Invalid);
    f.controller.terminate_vm().await.expect("cleanup");
    assert_eq!(f.controller.state(), State::Terminated);
}

#[tokio::test]
async fn start_fails_when_the_vm_exits_before_the_guest_connects() {
    let f = Fakes::created().await;
    let connect = f.script.hold(Call::Connect);
    let c = f.controller.clone();
    let starting = tokio::spawn(async move { c.start_vm().await });
    connect.entered().await;
    f.vm().exit(VmExit::clean_crash());
    let err = starting
        .await
        .expect("join")
        .expect_err("VM died during boot");
    assert!(matches!(
        err,
        ControllerError::StartFailed {
            step: StartStep::ConnectGuest,
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::Invalid);
}

trait Crash {
    fn clean_crash() -> Self;
}
impl Crash for uvm::VmExit {
    fn clean_crash() -> Self {
        uvm::VmExit {
            code: Some(1),
            signal: None,
            reason: Some("guest-panic".into()),
        }
    }
}
use uvm::VmExit;

/// A valid limit: half of the VM's CPUs.
const HALF_A_CPU: CpuLimits = CpuLimits {
    limit: Some(5_000),
    weight: None,
};

// --- Error propagation (4) ---

#[tokio::test]
async fn exec_into_host_propagates_a_guest_error() {
    let f = Fakes::running().await;
    f.script.fail_nth(Call::Exec, 1);
    let err = f
        .controller
        .exec_into_host(ExecRequest::new(["false"]))
        .await
        .expect_err("scripted");
    assert!(matches!(
        err,
        ControllerError::Guest {
            operation: Operation::ExecIntoHost,
            source: GuestError::Rejected { .. },
            ..
        }
    ));
    assert_eq!(
        f.controller.state(),
        State::Running,
        "a guest error does not change the state"
    );
}

#[tokio::test]
async fn dump_stacks_propagates_a_guest_error() {
    let f = Fakes::running().await;
    f.script.fail_nth(Call::DumpStacks, 1);
    let err = f.controller.dump_stacks().await.expect_err("scripted");
    assert!(matches!(
        err,
        ControllerError::Guest {
            operation: Operation::DumpStacks,
            ..
        }
    ));
}

#[tokio::test]
async fn update_policy_fragment_propagates_a_guest_error_and_records_nothing() {
    let f = Fakes::running_with(with_policy()).await;
    f.script.fail_nth(Call::InjectPolicyFragment, 1);
    let err = f
        .controller
        .update_policy_fragment(&PolicyFragment("frag".into()))
        .await
        .expect_err("scripted");
    assert!(matches!(
        err,
        ControllerError::Guest {
            operation: Operation::UpdatePolicyFragment,
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::Running);
    assert!(f.controller.policy_fragments().is_empty());
}

fn with_policy() -> VmConfig {
    VmConfig {
        security_policy: Some(uvm::seams::SecurityPolicy("package uvmctl.policy".into())),
        ..VmConfig::default()
    }
}

#[tokio::test]
async fn a_policy_fragment_for_a_vm_without_a_policy_is_refused_before_the_guest_is_asked() {
    let f = Fakes::running().await;
    let err = f
        .controller
        .update_policy_fragment(&PolicyFragment("package fragment.x".into()))
        .await
        .expect_err("no policy");
    assert!(
        matches!(
            &err,
            ControllerError::InvalidArgument {
                what: "policy fragment",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("without a security policy"),
        "{err}"
    );
    assert!(f.script.calls().is_empty(), "{:?}", f.script.calls());
    assert_eq!(f.controller.state(), State::Running);
}

#[tokio::test]
async fn the_fragments_the_guest_took_are_listed_once_each_in_order() {
    let f = Fakes::running_with(with_policy()).await;
    for text in [
        "package fragment.a",
        "package fragment.b",
        "package fragment.a",
    ] {
        f.controller
            .update_policy_fragment(&PolicyFragment(text.into()))
            .await
            .expect("fragment");
    }
    assert_eq!(
        f.controller.policy_fragments(),
        [
            PolicyFragment("package fragment.a".into()),
            PolicyFragment("package fragment.b".into())
        ]
    );
}

#[tokio::test]
async fn exit_status_is_refused_before_terminated() {
    let f = Fakes::running().await;
    let err = f.controller.exit_status().expect_err("running");
    assert_wrong_state(err, Operation::ExitStatus, State::Running);
    let err = Fakes::created()
        .await
        .controller
        .start_time()
        .expect_err("created");
    assert_wrong_state(err, Operation::StartTime, State::Created);
}

// --- Deadlines and normalization ---

#[tokio::test(start_paused = true)]
async fn a_guest_call_that_never_answers_fails_at_its_deadline() {
    let timeouts = Timeouts {
        guest_call: Duration::from_secs(3),
        ..Timeouts::default()
    };
    let f = Fakes::with_timeouts(timeouts);
    f.controller
        .create_vm(VmConfig::default())
        .await
        .expect("create");
    f.controller.start_vm().await.expect("start");
    let _never = f.script.hold(Call::DumpStacks);
    let err = f.controller.dump_stacks().await.expect_err("deadline");
    assert!(matches!(
        err,
        ControllerError::Guest { source: GuestError::Timeout { after, .. }, .. } if after == Duration::from_secs(3)
    ));
    assert_eq!(f.controller.state(), State::Running);
}

#[tokio::test]
async fn update_memory_rounds_up_to_the_backend_granularity() {
    let f = Fakes::running().await;
    let g = uvm::testing::FAKE_MEMORY_GRANULARITY;
    let got = f.controller.update_memory(g + 1).await.expect("update");
    assert_eq!(got, 2 * g);
    assert_eq!(f.vm().memory(), Some(2 * g));
    let got = f
        .controller
        .update_memory(4 * g)
        .await
        .expect("exact multiple");
    assert_eq!(got, 4 * g);
    let err = f.controller.update_memory(0).await.expect_err("zero");
    assert!(matches!(
        err,
        ControllerError::InvalidArgument {
            what: "memory size",
            ..
        }
    ));
    let err = f
        .controller
        .update_memory(u64::MAX)
        .await
        .expect_err("overflow");
    assert!(matches!(
        err,
        ControllerError::InvalidArgument {
            what: "memory size",
            ..
        }
    ));
}

#[tokio::test]
async fn cpu_limits_out_of_range_are_refused_before_the_host_is_asked() {
    let f = Fakes::running().await;
    for (limits, what) in [
        (CpuLimits::default(), "cpu limits"),
        (
            CpuLimits {
                limit: Some(0),
                weight: None,
            },
            "cpu limit",
        ),
        (
            CpuLimits {
                limit: Some(10_001),
                weight: Some(100),
            },
            "cpu limit",
        ),
        (
            CpuLimits {
                limit: None,
                weight: Some(0),
            },
            "cpu weight",
        ),
    ] {
        let err = f
            .controller
            .update_cpu_limits(limits)
            .await
            .expect_err("refused");
        assert!(
            matches!(err, ControllerError::InvalidArgument { what: w, .. } if w == what),
            "{limits:?}: {err:?}"
        );
    }
    assert_eq!(f.script.count(Call::UpdateCpuLimits), 0);
    assert_eq!(f.controller.state(), State::Running);
}

#[tokio::test]
async fn zero_cpus_are_refused_before_the_host_is_asked_and_a_host_failure_keeps_running() {
    let f = Fakes::running().await;
    assert!(matches!(
        f.controller.update_cpus(0).await,
        Err(ControllerError::InvalidArgument {
            what: "cpu count",
            ..
        })
    ));
    assert_eq!(f.script.count(Call::UpdateCpus), 0);
    f.script.fail_nth(Call::UpdateCpus, 1);
    assert!(matches!(
        f.controller.update_cpus(2).await,
        Err(ControllerError::Host {
            operation: Operation::UpdateCpus,
            ..
        })
    ));
    assert_eq!(f.controller.state(), State::Running);
    f.controller.update_cpus(2).await.expect("the retry");
    assert_eq!(f.script.count(Call::UpdateCpus), 2);
}

#[tokio::test]
async fn a_host_update_error_propagates_and_keeps_running() {
    let f = Fakes::running().await;
    f.script.fail_nth(Call::UpdateCpuLimits, 1);
    let err = f
        .controller
        .update_cpu_limits(HALF_A_CPU)
        .await
        .expect_err("scripted");
    assert!(matches!(
        err,
        ControllerError::Host {
            operation: Operation::UpdateCpuLimits,
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::Running);
}

#[tokio::test]
async fn the_resource_settings_follow_successful_updates_and_not_failed_ones() {
    let f = Fakes::running().await;
    let config = VmConfig::default();
    let boot = f.controller.resources().expect("created");
    assert_eq!(boot.memory_bytes, config.memory_mib << 20);
    assert_eq!((boot.cpus, boot.cpu_group.as_deref()), (config.cpus, None));
    assert_eq!(boot.cpu_limits, CpuLimits::default());

    let g = uvm::testing::FAKE_MEMORY_GRANULARITY;
    f.controller.update_memory(g + 1).await.expect("memory");
    f.controller.update_cpus(3).await.expect("cpus");
    f.controller
        .update_cpu_limits(CpuLimits {
            limit: Some(5_000),
            weight: None,
        })
        .await
        .expect("limit");
    // A weight alone keeps the limit set before.
    f.controller
        .update_cpu_limits(CpuLimits {
            limit: None,
            weight: Some(300),
        })
        .await
        .expect("weight");
    f.controller.update_cpu_group("batch").await.expect("group");
    // The second call of each fails.
    f.script.fail_nth(Call::UpdateCpus, 2);
    f.controller.update_cpus(4).await.expect_err("scripted");
    f.script.fail_nth(Call::UpdateMemory, 2);
    f.controller
        .update_memory(8 * g)
        .await
        .expect_err("scripted");

    let now = f.controller.resources().expect("running");
    assert_eq!(now.memory_bytes, 2 * g);
    assert_eq!(now.cpus, 3);
    assert_eq!(
        now.cpu_limits,
        CpuLimits {
            limit: Some(5_000),
            weight: Some(300)
        }
    );
    assert_eq!(now.cpu_group.as_deref(), Some("batch"));
}
