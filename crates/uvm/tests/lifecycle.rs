//! Happy paths, idempotency, API delegation, and wait/waiter behaviour.

use tokio_util::sync::CancellationToken;
use uvm::seams::{ExecRequest, SecurityPolicy, VmConfig, VmLifetime};
use uvm::testing::{Call, Capture, Fakes};
use uvm::{ControllerError, Operation, Reason, State, VmExit};

#[tokio::test]
async fn create_start_terminate_walks_the_lifecycle() {
    let f = Fakes::new();
    assert_eq!(f.controller.state(), State::NotCreated);
    f.controller
        .create_vm(VmConfig::default())
        .await
        .expect("create");
    assert_eq!(f.controller.state(), State::Created);
    f.controller.start_vm().await.expect("start");
    assert_eq!(f.controller.state(), State::Running);
    f.controller.terminate_vm().await.expect("terminate");
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(
        f.script.calls(),
        vec![
            Call::Create,
            Call::PrepareConnection,
            Call::Start,
            Call::Connect,
            Call::Terminate,
            Call::CloseConnection,
            Call::Release
        ]
    );
    assert_eq!(f.vm().successful_releases(), 1);
}

#[tokio::test]
async fn start_applies_the_configured_security_policy_after_connecting() {
    let f = Fakes::new();
    let policy = SecurityPolicy("allow-all".into());
    let config = VmConfig {
        security_policy: Some(policy.clone()),
        ..VmConfig::default()
    };
    f.controller.create_vm(config).await.expect("create");
    f.controller.start_vm().await.expect("start");
    assert_eq!(f.guest.policy(), Some(policy));
    let calls = f.script.calls();
    assert_eq!(
        &calls[calls.len() - 2..],
        &[Call::Connect, Call::SetSecurityPolicy]
    );
}

// --- Idempotency (3) ---

#[tokio::test]
async fn start_prepares_the_guest_link_at_the_vms_own_endpoint() {
    let f = Fakes::created().await;
    f.controller.start_vm().await.expect("start");
    assert_eq!(
        f.guest.prepared_endpoint(),
        Some(f.vm().guest_endpoint()),
        "the guest link listens where this VM's guest will connect"
    );
}

#[tokio::test]
async fn start_vm_on_running_is_a_noop() {
    let f = Fakes::running().await;
    f.controller
        .start_vm()
        .await
        .expect("second start is a no-op");
    assert_eq!(f.controller.state(), State::Running);
    assert!(
        f.script.calls().is_empty(),
        "no seam was called: {:?}",
        f.script.calls()
    );
}

#[tokio::test]
async fn terminate_vm_on_terminated_is_a_noop() {
    let f = Fakes::terminated().await;
    f.controller.terminate_vm().await.expect("no-op");
    assert_eq!(f.controller.state(), State::Terminated);
    assert!(f.script.calls().is_empty());
    assert_eq!(f.vm().successful_releases(), 1);
}

#[tokio::test]
async fn terminate_vm_on_not_created_is_a_noop() {
    let f = Fakes::new();
    f.controller.terminate_vm().await.expect("no-op");
    assert_eq!(f.controller.state(), State::NotCreated);
    assert!(f.script.calls().is_empty());
}

// --- API delegation (4) ---

#[tokio::test]
async fn exec_into_host_forwards_the_guest_exit_code_and_output() {
    let f = Fakes::running().await;
    f.guest.set_exec_result(b"hello\n", 42);
    let sink = Capture::default();
    let mut request = ExecRequest::new(["echo", "hello"]);
    request.stdout = Some(Box::new(sink.clone()));
    let code = f.controller.exec_into_host(request).await.expect("exec");
    assert_eq!(code, 42);
    assert_eq!(sink.bytes(), b"hello\n");
    assert_eq!(f.script.calls(), vec![Call::Exec]);
}

#[tokio::test]
async fn exec_into_host_reports_the_guest_pid_and_delivers_signals() {
    let f = Fakes::running().await;
    let (started, pid) = tokio::sync::oneshot::channel();
    let (signals, signals_rx) = tokio::sync::mpsc::channel(uvm::seams::EXEC_SIGNAL_QUEUE);
    signals.try_send(15).expect("queue");
    signals.try_send(9).expect("queue");
    let mut request = ExecRequest::new(["sleep", "1"]);
    request.started = Some(started);
    request.signals = Some(signals_rx);
    f.controller.exec_into_host(request).await.expect("exec");
    assert_eq!(pid.await.expect("started"), uvm::testing::FAKE_EXEC_PID);
    assert_eq!(f.guest.signals(), [15, 9]);
}

#[tokio::test]
async fn a_refused_exec_never_reports_a_start() {
    let f = Fakes::terminated().await;
    let (started, pid) = tokio::sync::oneshot::channel();
    let mut request = ExecRequest::new(["true"]);
    request.started = Some(started);
    let err = f
        .controller
        .exec_into_host(request)
        .await
        .expect_err("refused");
    assert!(
        matches!(
            err,
            ControllerError::WrongState {
                state: State::Terminated,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(pid.await.is_err(), "a refused exec reported a start");
}

#[tokio::test]
async fn dump_stacks_returns_the_guest_text_when_capable() {
    let f = Fakes::running().await;
    let text = f.controller.dump_stacks().await.expect("dump");
    assert!(text.contains("fake agent"));
    assert_eq!(f.script.calls(), vec![Call::DumpStacks]);
}

#[tokio::test]
async fn dump_stacks_is_empty_without_the_guest_capability() {
    let f = Fakes::new();
    f.guest.set_capabilities(&["exec"]);
    f.controller
        .create_vm(VmConfig::default())
        .await
        .expect("create");
    f.controller.start_vm().await.expect("start");
    f.script.clear_log();
    let text = f.controller.dump_stacks().await.expect("dump");
    assert_eq!(text, "");
    assert_eq!(
        f.script.count(Call::DumpStacks),
        0,
        "the guest was not asked"
    );
}

#[tokio::test]
async fn exit_status_reports_how_and_when_the_vm_ended() {
    let f = Fakes::running().await;
    let started = f.controller.start_time().expect("running has a start time");
    assert!(started.is_some());
    f.vm().exit(VmExit {
        code: Some(0),
        signal: None,
        reason: Some("guest-shutdown".into()),
    });
    f.controller
        .wait(&CancellationToken::new())
        .await
        .expect("wait");
    let status = f.controller.exit_status().expect("terminated");
    let exit = status.exit.expect("an exit was recorded");
    assert_eq!(exit.reason.as_deref(), Some("guest-shutdown"));
    assert!(matches!(status.reason, Reason::Exited(_)));
    assert!(status.stopped_at >= started.expect("checked above"));
    assert_eq!(f.controller.start_time().expect("terminated"), started);
}

// --- Wait and the background waiter (5) ---

#[tokio::test]
async fn wait_from_terminated_drains_the_guest_log() {
    let f = Fakes::terminated().await;
    let drain = f.script.hold(Call::LogDrain);
    let c = f.controller.clone();
    let waiting = tokio::spawn(async move { c.wait(&CancellationToken::new()).await });
    drain.entered().await;
    assert!(
        !waiting.is_finished(),
        "wait must not return before the log drained"
    );
    drain.release();
    waiting
        .await
        .expect("join")
        .expect("wait returns once drained");
}

#[tokio::test]
async fn wait_honours_cancellation_during_log_drain() {
    let f = Fakes::terminated().await;
    let drain = f.script.hold(Call::LogDrain);
    let cancel = CancellationToken::new();
    let c = f.controller.clone();
    let token = cancel.clone();
    let waiting = tokio::spawn(async move { c.wait(&token).await });
    drain.entered().await;
    cancel.cancel();
    let err = waiting.await.expect("join").expect_err("cancelled");
    assert!(matches!(
        err,
        ControllerError::Cancelled {
            operation: Operation::Wait,
            ..
        }
    ));
}

#[tokio::test]
async fn wait_on_running_returns_after_the_vm_exits() {
    let f = Fakes::running().await;
    let c = f.controller.clone();
    let waiting = tokio::spawn(async move { c.wait(&CancellationToken::new()).await });
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    f.vm().exit(VmExit::clean());
    waiting.await.expect("join").expect("wait returns");
    assert_eq!(f.controller.state(), State::Terminated);
}

#[tokio::test]
async fn waiter_moves_running_to_terminated_and_collapses_the_guest_link() {
    let f = Fakes::running().await;
    f.vm().exit(VmExit {
        code: None,
        signal: Some(9),
        reason: None,
    });
    f.controller
        .wait(&CancellationToken::new())
        .await
        .expect("wait");
    assert_eq!(f.controller.state(), State::Terminated);
    assert!(matches!(
        f.controller.status().reason,
        Some(Reason::Exited(VmExit {
            signal: Some(9),
            ..
        }))
    ));
    assert!(
        !f.guest.is_connected(),
        "the guest connection was collapsed"
    );
    assert_eq!(f.script.calls(), vec![Call::CloseConnection, Call::Release]);
    assert_eq!(f.vm().successful_releases(), 1, "Terminated means released");
    f.script.clear_log();
    f.controller
        .terminate_vm()
        .await
        .expect("no-op after the waiter cleaned up");
    assert!(f.script.calls().is_empty());
}

/// Pinned decision (hcsshim overwrites Invalid with Terminated here): an Invalid VM whose process
/// exits stays **Invalid**, because the release that failed still holds resources; the exit is
/// recorded and a later terminate_vm reaches Terminated.
#[tokio::test]
async fn waiter_keeps_an_invalid_vm_invalid_until_terminate_releases_it() {
    let f = Fakes::running().await;
    f.script.fail_nth(Call::Release, 1);
    let err = f
        .controller
        .terminate_vm()
        .await
        .expect_err("release fails");
    assert!(matches!(err, ControllerError::ReleaseFailed { .. }));
    assert_eq!(f.controller.state(), State::Invalid);
    // terminate already made the fake VM exit; the waiter has run.
    f.controller
        .wait(&CancellationToken::new())
        .await
        .expect("wait returns on exit");
    assert_eq!(f.controller.state(), State::Invalid);
    f.controller.terminate_vm().await.expect("retry releases");
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(f.vm().successful_releases(), 1);
}
