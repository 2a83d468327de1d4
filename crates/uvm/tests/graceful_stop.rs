//! Terminate with a grace period (the guest asked to power off first, the VM stopped by force
//! when the grace runs out), the start's progress marks, and how an exec'd process ended.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use uvm::seams::{ExecRequest, ProcessExit, VmConfig};
use uvm::testing::{Call, Fakes, GUEST_SHUTDOWN_REASON};
use uvm::{Reason, StartStep, State};

fn exit_reason(f: &Fakes) -> Option<String> {
    f.controller
        .exit_status()
        .expect("terminated")
        .exit
        .and_then(|e| e.reason)
}

#[tokio::test(start_paused = true)]
async fn a_guest_that_ignores_the_shutdown_is_stopped_by_force_when_the_grace_runs_out() {
    let f = Fakes::running().await;
    f.guest.ignore_shutdown();
    f.controller
        .terminate_vm_within(Duration::from_secs(30))
        .await
        .expect("terminate");
    assert_eq!(
        f.script.calls(),
        vec![
            Call::Shutdown,
            Call::Terminate,
            Call::CloseConnection,
            Call::Release
        ]
    );
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(exit_reason(&f).as_deref(), Some("host-qmp-quit"));
    assert_eq!(
        f.controller.exit_status().expect("terminated").reason,
        Reason::TerminateRequested
    );
}

#[tokio::test(start_paused = true)]
async fn a_guest_that_cannot_be_asked_to_shut_down_is_stopped_by_force_at_once() {
    let f = Fakes::running().await;
    f.script.fail_always(Call::Shutdown);
    f.controller
        .terminate_vm_within(Duration::from_secs(30))
        .await
        .expect("terminate");
    assert_eq!(
        f.script.calls(),
        vec![
            Call::Shutdown,
            Call::Terminate,
            Call::CloseConnection,
            Call::Release
        ]
    );
    assert_eq!(exit_reason(&f).as_deref(), Some("host-qmp-quit"));
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_request_that_hangs_past_the_grace_is_given_up_and_the_vm_stopped() {
    let f = Fakes::running().await;
    let _hold = f.script.hold(Call::Shutdown);
    f.controller
        .terminate_vm_within(Duration::from_secs(3))
        .await
        .expect("terminate");
    assert_eq!(
        f.script.calls(),
        vec![
            Call::Shutdown,
            Call::Terminate,
            Call::CloseConnection,
            Call::Release
        ]
    );
    assert_eq!(f.controller.state(), State::Terminated);
}

#[tokio::test]
async fn a_guest_that_powers_off_within_the_grace_is_not_stopped_by_force() {
    let f = Fakes::running().await;
    f.controller
        .terminate_vm_within(Duration::from_secs(30))
        .await
        .expect("terminate");
    assert_eq!(
        f.script.calls(),
        vec![Call::Shutdown, Call::CloseConnection, Call::Release]
    );
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(exit_reason(&f).as_deref(), Some(GUEST_SHUTDOWN_REASON));
    assert_eq!(
        f.controller.exit_status().expect("terminated").reason,
        Reason::TerminateRequested
    );
}

#[tokio::test]
async fn a_zero_grace_or_a_vm_not_running_skips_the_shutdown_request() {
    let f = Fakes::running().await;
    f.controller
        .terminate_vm_within(Duration::ZERO)
        .await
        .expect("terminate");
    f.assert_terminated_through_the_whole_chain();

    let f = Fakes::invalid().await;
    f.controller
        .terminate_vm_within(Duration::from_secs(30))
        .await
        .expect("terminate");
    assert!(!f.script.calls().contains(&Call::Shutdown));
    assert_eq!(f.controller.state(), State::Terminated);
}

#[tokio::test]
async fn start_reports_each_step_once_it_finished_in_order() {
    let f = Fakes::created().await;
    let steps = Arc::new(Mutex::new(Vec::new()));
    let seen = steps.clone();
    f.controller
        .start_vm_with_progress(&move |step| seen.lock().expect("steps").push(step))
        .await
        .expect("start");
    assert_eq!(
        *steps.lock().expect("steps"),
        [
            StartStep::PrepareGuestListener,
            StartStep::StartVm,
            StartStep::ConnectGuest
        ]
    );
    // A repeat is a no-op: nothing more is reported.
    let seen = steps.clone();
    f.controller
        .start_vm_with_progress(&move |step| seen.lock().expect("steps").push(step))
        .await
        .expect("no-op");
    assert_eq!(steps.lock().expect("steps").len(), 3);
}

#[tokio::test]
async fn a_failed_step_is_not_reported_and_a_policy_step_is_when_configured() {
    let f = Fakes::new();
    let config = VmConfig {
        security_policy: Some(uvm::seams::SecurityPolicy("p".into())),
        ..VmConfig::default()
    };
    f.controller.create_vm(config).await.expect("create");
    f.script.fail_nth(Call::Connect, 1);
    let steps = Arc::new(Mutex::new(Vec::new()));
    let seen = steps.clone();
    f.controller
        .start_vm_with_progress(&move |step| seen.lock().expect("steps").push(step))
        .await
        .expect_err("connect fails");
    assert_eq!(
        *steps.lock().expect("steps"),
        [StartStep::PrepareGuestListener, StartStep::StartVm]
    );

    let f = Fakes::new();
    let config = VmConfig {
        security_policy: Some(uvm::seams::SecurityPolicy("p".into())),
        ..VmConfig::default()
    };
    f.controller.create_vm(config).await.expect("create");
    let steps = Arc::new(Mutex::new(Vec::new()));
    let seen = steps.clone();
    f.controller
        .start_vm_with_progress(&move |step| seen.lock().expect("steps").push(step))
        .await
        .expect("start");
    assert_eq!(
        steps.lock().expect("steps").last(),
        Some(&StartStep::ApplySecurityPolicy)
    );
}

#[tokio::test]
async fn exec_tells_a_signalled_process_from_one_that_exited_with_the_same_status() {
    let f = Fakes::running().await;
    f.guest.set_exec_exit(b"", ProcessExit::signalled(9));
    let exit = f
        .controller
        .exec_into_host_exit(ExecRequest::new(["sleep", "100"]))
        .await
        .expect("exec");
    assert_eq!(
        exit,
        ProcessExit {
            code: 137,
            signal: Some(9)
        }
    );
    f.guest.set_exec_result(b"", 137);
    let exit = f
        .controller
        .exec_into_host_exit(ExecRequest::new(["sh", "-c", "exit 137"]))
        .await
        .expect("exec");
    assert_eq!(exit, ProcessExit::exited(137));
    assert_eq!(
        f.controller
            .exec_into_host(ExecRequest::new(["sh", "-c", "exit 137"]))
            .await
            .expect("exec"),
        137
    );
}

#[tokio::test]
async fn a_wait_during_a_terminate_returns_only_once_the_terminate_has_committed() {
    let f = Fakes::running().await;
    let release = f.script.hold(Call::Release);
    let terminate = {
        let c = f.controller.clone();
        tokio::spawn(async move { c.terminate_vm_within(Duration::from_secs(30)).await })
    };
    // The guest powered off (the VM process has ended); the release is under way. The exit
    // waiter, woken by the exit before the release was entered, has run by now.
    release.entered().await;
    tokio::task::yield_now().await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let wait = f.controller.wait(&cancel);
    tokio::pin!(wait);
    // Polled while the release is held: not done (the state is still Running).
    assert!(
        tokio::time::timeout(Duration::ZERO, &mut wait)
            .await
            .is_err(),
        "wait returned while the VM was {}",
        f.controller.state()
    );
    release.release();
    terminate.await.expect("join").expect("terminate");
    wait.await.expect("wait");
    assert_eq!(f.controller.state(), State::Terminated);
}

#[tokio::test]
async fn a_wait_returns_once_a_terminate_whose_release_failed_left_the_vm_invalid() {
    let f = Fakes::running().await;
    f.script.fail_nth(Call::Release, 1);
    let err = f
        .controller
        .terminate_vm_within(Duration::from_secs(30))
        .await
        .expect_err("release fails");
    assert!(
        matches!(err, uvm::ControllerError::ReleaseFailed { .. }),
        "{err:?}"
    );
    assert_eq!(f.controller.state(), State::Invalid);
    // The VM process has ended: a wait does not hang on the failed release.
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::time::timeout(Duration::from_secs(30), f.controller.wait(&cancel))
        .await
        .expect("wait returns")
        .expect("wait");
}
