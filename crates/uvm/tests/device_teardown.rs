//! Terminate with disks and shares in every state, on the fakes: devices are torn down guest
//! first, host second, tolerating either side being gone, and a device operation racing a
//! terminate ends with the VM Terminated and nothing attached.

use std::sync::Arc;

use uvm::devices::scsi::DiskState;
use uvm::seams::{DiskConfig, DiskMount, DiskSpec, ShareConfig, ShareMount, ShareSpec, VmConfig};
use uvm::testing::{Call, Fakes};
use uvm::{ControllerError, Operation, Rejection, State};

fn disk(n: usize) -> DiskConfig {
    DiskConfig::raw(format!("/images/disk-{n}.img"))
}

fn share(path: &str, read_only: bool) -> ShareConfig {
    ShareConfig {
        host_path: path.into(),
        read_only,
    }
}

fn share_mount(path: &str) -> ShareMount {
    ShareMount {
        guest_path: path.into(),
        read_only: false,
    }
}

fn is_device_call(c: &Call) -> bool {
    matches!(
        c,
        Call::AttachDisk
            | Call::DetachDisk
            | Call::AddShare
            | Call::RemoveShare
            | Call::MountDisk
            | Call::UnmountDisk
            | Call::EjectDisk
            | Call::MountShare
            | Call::UnmountShare
    )
}

fn device_calls(f: &Fakes) -> Vec<Call> {
    f.script
        .calls()
        .into_iter()
        .filter(is_device_call)
        .collect()
}

#[tokio::test]
async fn terminate_tears_down_devices_in_every_state_guest_first_then_host() {
    let f = Fakes::running().await;
    let c = &f.controller;
    // Mounted and attached.
    c.add_disk(disk(0), DiskMount::at("/mounted"))
        .await
        .expect("add");
    // Busy: the unmount will be refused at terminate too.
    c.add_disk(disk(1), DiskMount::at("/busy"))
        .await
        .expect("add");
    f.guest.refuse_unmount("/busy", Rejection::Busy);
    // Ejected: its host detach failed.
    c.add_disk(disk(2), DiskMount::at("/ejected"))
        .await
        .expect("add");
    f.script.fail_nth(Call::DetachDisk, 1);
    c.remove_disk("/ejected").await.expect_err("detach fails");
    // A share, added and mounted.
    c.add_share(share("/srv", false), share_mount("/srv"))
        .await
        .expect("add");
    let before = c.devices();
    assert_eq!(
        before.disks.iter().map(|d| d.state).collect::<Vec<_>>(),
        [DiskState::Attached, DiskState::Attached, DiskState::Ejected]
    );
    f.script.clear_log();

    c.terminate_vm().await.expect("terminate");
    assert_eq!(c.state(), State::Terminated);
    let calls = f.script.calls();
    assert_eq!(
        calls,
        vec![
            // Guest, disk by disk: unmount, then eject (the busy one's refusal is tolerated);
            // the ejected disk has nothing left in the guest; then the share's mount.
            Call::UnmountDisk,
            Call::EjectDisk,
            Call::UnmountDisk,
            Call::EjectDisk,
            Call::UnmountShare,
            // Host: detach every disk, remove the share.
            Call::DetachDisk,
            Call::DetachDisk,
            Call::DetachDisk,
            Call::RemoveShare,
            // Then the VM.
            Call::Terminate,
            Call::CloseConnection,
            Call::Release
        ]
    );
    assert_eq!(c.devices(), uvm::Devices::default());
    assert!(f.vm().attached_disks().is_empty());
    assert!(f.vm().added_shares().is_empty());
}

#[tokio::test]
async fn terminating_a_vm_never_started_forgets_its_cold_devices_without_calls() {
    let f = Fakes::new();
    let config = VmConfig {
        disks: vec![DiskSpec {
            disk: disk(0),
            mount: DiskMount::at("/d0"),
        }],
        shares: vec![ShareSpec {
            share: share("/srv", true),
            mount: share_mount("/srv"),
        }],
        ..VmConfig::default()
    };
    f.controller.create_vm(config).await.expect("create");
    f.script.clear_log();
    f.controller.terminate_vm().await.expect("terminate");
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(f.script.calls(), vec![Call::CloseConnection, Call::Release]);
    assert_eq!(f.controller.devices(), uvm::Devices::default());
}

#[tokio::test]
async fn terminate_goes_on_when_device_calls_fail() {
    let f = Fakes::running().await;
    f.controller
        .add_disk(disk(0), DiskMount::at("/a"))
        .await
        .expect("add");
    f.controller
        .add_share(share("/srv", false), share_mount("/srv"))
        .await
        .expect("add");
    for call in [
        Call::UnmountDisk,
        Call::EjectDisk,
        Call::UnmountShare,
        Call::DetachDisk,
        Call::RemoveShare,
    ] {
        f.script.fail_always(call);
    }
    f.controller.terminate_vm().await.expect("terminate");
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(f.controller.devices(), uvm::Devices::default());
    assert_eq!(f.vm().successful_releases(), 1);
}

#[tokio::test]
async fn terminate_skips_the_guest_when_its_link_is_gone() {
    let f = Fakes::running().await;
    f.controller
        .add_disk(disk(0), DiskMount::at("/a"))
        .await
        .expect("add");
    // The guest link collapses (e.g. the agent died) while the VM process lives.
    uvm::seams::GuestConnection::close_connection(&*f.guest)
        .await
        .expect("close");
    f.script.clear_log();
    f.controller.terminate_vm().await.expect("terminate");
    assert_eq!(
        f.script.calls(),
        vec![
            Call::DetachDisk,
            Call::Terminate,
            Call::CloseConnection,
            Call::Release
        ],
        "no guest calls once the guest is unreachable; the host still detaches"
    );
}

#[tokio::test]
async fn a_vm_that_exits_by_itself_with_devices_attached_ends_terminated_with_none() {
    let f = Fakes::running().await;
    f.controller
        .add_disk(disk(0), DiskMount::at("/a"))
        .await
        .expect("add");
    f.controller
        .add_share(share("/srv", false), share_mount("/srv"))
        .await
        .expect("add");
    f.script.clear_log();
    f.vm().exit(uvm::VmExit::clean());
    f.controller
        .wait(&tokio_util::sync::CancellationToken::new())
        .await
        .expect("wait");
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(f.controller.devices(), uvm::Devices::default());
    assert!(
        device_calls(&f).is_empty(),
        "the VM is gone: no device calls"
    );
    // Terminate afterwards is the usual no-op.
    f.controller.terminate_vm().await.expect("no-op");
}

#[tokio::test]
async fn an_attach_racing_a_terminate_ends_terminated_with_nothing_attached() {
    let f = Arc::new(Fakes::running().await);
    let hold = f.script.hold(Call::AttachDisk);
    let adder = {
        let f = f.clone();
        tokio::spawn(async move { f.controller.add_disk(disk(0), DiskMount::at("/a")).await })
    };
    hold.entered().await;
    // The books show the disk while its attach is in flight, without waiting for it.
    assert_eq!(f.controller.devices().disks[0].state, DiskState::Reserved);
    f.controller.terminate_vm().await.expect("terminate");
    let err = adder.await.expect("join").expect_err("cancelled");
    assert!(matches!(
        err,
        ControllerError::Cancelled {
            operation: Operation::AddDisk,
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(f.controller.devices(), uvm::Devices::default());
    assert!(f.vm().attached_disks().is_empty());
    // The interrupted attach may have happened: teardown ejects and detaches it anyway.
    let calls = device_calls(&f);
    assert_eq!(
        calls,
        vec![Call::AttachDisk, Call::EjectDisk, Call::DetachDisk]
    );
}

#[tokio::test]
async fn a_mount_racing_a_terminate_ends_terminated_with_nothing_mounted() {
    let f = Arc::new(Fakes::running().await);
    let hold = f.script.hold(Call::MountShare);
    let adder = {
        let f = f.clone();
        tokio::spawn(async move {
            f.controller
                .add_share(share("/srv", false), share_mount("/srv"))
                .await
        })
    };
    hold.entered().await;
    f.controller.terminate_vm().await.expect("terminate");
    let err = adder.await.expect("join").expect_err("cancelled");
    assert!(matches!(err, ControllerError::Cancelled { .. }));
    assert_eq!(f.controller.state(), State::Terminated);
    assert!(f.guest.mounts().is_empty());
    assert!(f.vm().added_shares().is_empty());
    // The interrupted mount may have happened: teardown unmounts (the fake says nothing is
    // there, which is tolerated), then removes the share.
    assert_eq!(
        device_calls(&f),
        vec![
            Call::AddShare,
            Call::MountShare,
            Call::UnmountShare,
            Call::RemoveShare
        ]
    );
}

#[tokio::test]
async fn a_device_operation_after_a_terminate_began_is_refused() {
    let f = Arc::new(Fakes::running().await);
    let hold = f.script.hold(Call::Terminate);
    let terminator = {
        let f = f.clone();
        tokio::spawn(async move { f.controller.terminate_vm().await })
    };
    hold.entered().await;
    let err = f
        .controller
        .add_disk(disk(0), DiskMount::at("/a"))
        .await
        .expect_err("refused");
    assert!(matches!(err, ControllerError::Cancelled { .. }), "{err:?}");
    hold.release();
    terminator.await.expect("join").expect("terminate");
    assert!(f.vm().attached_disks().is_empty());
    assert!(!f.script.calls().contains(&Call::AttachDisk));
}
