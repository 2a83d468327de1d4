//! Shared set-up for the controller's integration tests.
#![allow(dead_code)]

use uvm::seams::VmConfig;
use uvm::testing::Fakes;
use uvm::State;

/// A controller with a created VM.
pub async fn created() -> Fakes {
    let f = Fakes::new();
    f.controller
        .create_vm(VmConfig::default())
        .await
        .expect("create on fakes");
    assert_eq!(f.controller.state(), State::Created);
    f
}

/// A controller with a running VM; the call log is cleared.
pub async fn running() -> Fakes {
    let f = created().await;
    f.controller.start_vm().await.expect("start on fakes");
    assert_eq!(f.controller.state(), State::Running);
    f.script.clear_log();
    f
}

/// A controller with a terminated VM; the call log is cleared.
pub async fn terminated() -> Fakes {
    let f = running().await;
    f.controller
        .terminate_vm()
        .await
        .expect("terminate on fakes");
    assert_eq!(f.controller.state(), State::Terminated);
    f.script.clear_log();
    f
}

/// A controller whose start failed, so the VM is Invalid; the call log is cleared.
pub async fn invalid() -> Fakes {
    let f = created().await;
    f.script.fail_nth(uvm::testing::Call::Start, 1);
    let err = f
        .controller
        .start_vm()
        .await
        .expect_err("scripted start failure");
    assert!(matches!(err, uvm::ControllerError::StartFailed { .. }));
    assert_eq!(f.controller.state(), State::Invalid);
    f.script.clear_log();
    f
}
