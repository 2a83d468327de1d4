//! Concurrency: terminate during a slow start, queries during a slow start, exit racing terminate.
//! Ordering is asserted with holds (the fake signals when a call is blocked), never wall-clock.

use tokio_util::sync::CancellationToken;
use uvm::testing::{Call, Fakes};
use uvm::{ControllerError, Operation, Reason, State, VmExit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_during_a_slow_start_cancels_it_and_ends_terminated() {
    let f = Fakes::created().await;
    let connect = f.script.hold(Call::Connect); // the guest never answers on its own
    let c = f.controller.clone();
    let starting = tokio::spawn(async move { c.start_vm().await });
    connect.entered().await;

    f.controller
        .terminate_vm()
        .await
        .expect("terminate wins over the slow start");
    let err = starting
        .await
        .expect("join")
        .expect_err("start was cancelled");
    assert!(matches!(err, ControllerError::StartCancelled { .. }));
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(f.controller.status().reason, Some(Reason::StartCancelled));
    assert_eq!(f.vm().successful_releases(), 1);
    assert!(
        !f.guest.is_prepared(),
        "the listener the start prepared was closed"
    );
    let calls = f.script.calls();
    assert_eq!(
        &calls[calls.len() - 3..],
        &[Call::Terminate, Call::CloseConnection, Call::Release],
        "{calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_during_a_slow_start_is_invalid_only_if_release_fails() {
    let f = Fakes::created().await;
    let _connect = f.script.hold(Call::Connect);
    f.script.fail_nth(Call::Release, 1);
    let c = f.controller.clone();
    let starting = tokio::spawn(async move { c.start_vm().await });
    _connect.entered().await;
    let err = f
        .controller
        .terminate_vm()
        .await
        .expect_err("release fails");
    assert!(matches!(err, ControllerError::ReleaseFailed { .. }));
    let _ = starting.await.expect("join");
    assert_eq!(f.controller.state(), State::Invalid);
    f.controller.terminate_vm().await.expect("retry");
    assert_eq!(f.controller.state(), State::Terminated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_stats_answer_while_a_start_is_blocked() {
    let f = Fakes::created().await;
    let start = f.script.hold(Call::Start);
    let c = f.controller.clone();
    let starting = tokio::spawn(async move { c.start_vm().await });
    start.entered().await;

    // The start is blocked inside the backend; these return without it moving.
    assert_eq!(f.controller.state(), State::Created);
    assert_eq!(f.controller.status().state, State::Created);
    let err = f.controller.stats().await.expect_err("not running yet");
    assert!(matches!(
        err,
        ControllerError::WrongState {
            operation: Operation::Stats,
            state: State::Created,
            ..
        }
    ));
    assert!(!starting.is_finished(), "the start is still in flight");

    start.release();
    starting.await.expect("join").expect("start completes");
    let stats = f.controller.stats().await.expect("running");
    assert!(stats.rss_bytes > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_answer_while_a_terminate_is_blocked_in_release() {
    let f = Fakes::running().await;
    let release = f.script.hold(Call::Release);
    let c = f.controller.clone();
    let terminating = tokio::spawn(async move { c.terminate_vm().await });
    release.entered().await;
    assert_eq!(f.controller.state(), State::Running);
    f.controller.stats().await.expect("host stats still answer");
    release.release();
    terminating.await.expect("join").expect("terminate");
    assert_eq!(f.controller.state(), State::Terminated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_exit_racing_terminate_ends_terminated_exactly_once() {
    for round in 0..50 {
        let f = Fakes::running().await;
        let vm = f.vm();
        let c = f.controller.clone();
        let crash = tokio::spawn(async move {
            vm.exit(VmExit {
                code: Some(1),
                signal: None,
                reason: Some("guest-panic".into()),
            });
        });
        let terminating = tokio::spawn(async move { c.terminate_vm().await });
        crash.await.expect("join");
        terminating
            .await
            .expect("join")
            .expect("terminate succeeds either way");
        f.controller
            .wait(&CancellationToken::new())
            .await
            .expect("wait");

        assert_eq!(f.controller.state(), State::Terminated, "round {round}");
        let to_terminated = f
            .controller
            .history()
            .iter()
            .filter(|t| t.to == State::Terminated)
            .count();
        assert_eq!(
            to_terminated,
            1,
            "round {round}: {:?}",
            f.controller.history()
        );
        assert_eq!(f.vm().successful_releases(), 1, "round {round}");
        assert!(!f.guest.is_connected());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_boot_once() {
    let f = Fakes::created().await;
    let a = f.controller.clone();
    let b = f.controller.clone();
    let (ra, rb) = tokio::join!(a.start_vm(), b.start_vm());
    ra.expect("first");
    rb.expect("second is a no-op");
    assert_eq!(f.script.count(Call::Start), 1);
    assert_eq!(f.controller.state(), State::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_exec_is_released_when_the_vm_exits() {
    let f = Fakes::running().await;
    let exec = f.script.hold(Call::Exec);
    let c = f.controller.clone();
    let running = tokio::spawn(async move {
        c.exec_into_host(uvm::seams::ExecRequest::new(["sleep", "1000"]))
            .await
    });
    exec.entered().await;
    f.vm().exit(VmExit {
        code: None,
        signal: Some(9),
        reason: None,
    });
    let err = running
        .await
        .expect("join")
        .expect_err("released by the collapse");
    assert!(matches!(
        err,
        ControllerError::Guest {
            source: uvm::GuestError::ConnectionLost,
            ..
        }
    ));
}
