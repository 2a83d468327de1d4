//! Disks and shares through the VM controller, on the fakes: Running-only, cleanup after a
//! failed add, retryable removal, cold devices (terminate: `device_teardown.rs`).
//! Failure paths first.

use uvm::devices::scsi::DiskState;
use uvm::devices::shares::ShareState;
use uvm::devices::{DeviceError, MountState};
use uvm::seams::{
    DiskConfig, DiskLocation, DiskMount, DiskSpec, ScsiSlot, ShareConfig, ShareMount, ShareSpec,
    ShareTransport, VmConfig,
};
use uvm::testing::{Call, FakeMount, Fakes};
use uvm::{ControllerError, GuestError, HostError, Operation, Rejection, StartStep, State};

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

fn device_error(err: &ControllerError) -> &DeviceError {
    match err {
        ControllerError::Device { source, .. } => source,
        other => panic!("not a device error: {other:?}"),
    }
}

#[tokio::test]
async fn a_failed_attach_returns_the_host_error_and_leaves_nothing_behind() {
    let f = Fakes::running().await;
    f.script.fail_nth(Call::AttachDisk, 1);
    let err = f
        .controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect_err("attach fails");
    assert!(matches!(
        device_error(&err),
        DeviceError::Host {
            step: "attach disk",
            source: HostError::Failed { .. }
        }
    ));
    assert!(matches!(
        err,
        ControllerError::Device {
            operation: Operation::AddDisk,
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::Running);
    assert_eq!(f.controller.devices(), uvm::Devices::default());
    assert_eq!(device_calls(&f), vec![Call::AttachDisk]);
    // The slot and the guest path are free again.
    let slot = f
        .controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect("add");
    assert_eq!(
        slot,
        ScsiSlot {
            controller: 0,
            lun: 0
        }
    );
}

#[tokio::test]
async fn a_disk_the_host_refuses_passes_its_invalid_input_through_and_leaves_nothing() {
    // One writer: the backend refuses a disk attached writable to another VM.
    let f = Fakes::running().await;
    f.vm().refuse_disk(disk(0).host_path);
    let err = f
        .controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect_err("refused");
    assert!(matches!(
        device_error(&err),
        DeviceError::Host {
            step: "attach disk",
            source: HostError::InvalidInput { what: "disk", .. }
        }
    ));
    assert_eq!(f.controller.state(), State::Running);
    assert!(f.vm().attached_disks().is_empty());
    assert_eq!(f.controller.devices(), uvm::Devices::default());
}

#[tokio::test]
async fn a_failed_guest_mount_is_undone_before_add_disk_returns() {
    let f = Fakes::running().await;
    f.script.fail_nth(Call::MountDisk, 1);
    let err = f
        .controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect_err("mount fails");
    assert!(matches!(
        device_error(&err),
        DeviceError::Guest {
            step: "mount disk",
            source: GuestError::Rejected { .. }
        }
    ));
    assert_eq!(
        device_calls(&f),
        vec![
            Call::AttachDisk,
            Call::MountDisk,
            Call::EjectDisk,
            Call::DetachDisk
        ]
    );
    assert!(f.vm().attached_disks().is_empty());
    assert!(f.controller.devices().disks.is_empty());
}

#[tokio::test]
async fn a_failed_cleanup_is_left_in_the_books_and_remove_finishes_it() {
    let f = Fakes::running().await;
    f.script.fail_nth(Call::MountDisk, 1);
    f.script.fail_nth(Call::DetachDisk, 1);
    let err = f
        .controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect_err("mount fails");
    // The caller gets the cause (the mount), not the cleanup's failure.
    assert!(matches!(
        device_error(&err),
        DeviceError::Guest {
            step: "mount disk",
            ..
        }
    ));
    let disks = f.controller.devices().disks;
    assert_eq!(disks[0].state, DiskState::Ejected);
    f.controller
        .remove_disk("/data")
        .await
        .expect("remove finishes it");
    assert!(f.vm().attached_disks().is_empty());
    assert!(f.controller.devices().disks.is_empty());
}

#[tokio::test]
async fn a_busy_unmount_fails_the_removal_and_a_retry_succeeds() {
    let f = Fakes::running().await;
    f.controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect("add");
    f.guest.refuse_unmount("/data", Rejection::Busy);
    let err = f.controller.remove_disk("/data").await.expect_err("busy");
    assert!(matches!(
        device_error(&err),
        DeviceError::Guest {
            source: GuestError::Rejected {
                kind: Rejection::Busy,
                ..
            },
            ..
        }
    ));
    let d = &f.controller.devices().disks[0];
    assert_eq!(
        (d.state, d.mounts[0].state),
        (DiskState::Attached, MountState::Mounted)
    );
    f.guest.allow_unmount("/data");
    f.controller.remove_disk("/data").await.expect("retry");
    assert!(f.controller.devices().disks.is_empty());
    assert!(f.vm().attached_disks().is_empty());
}

#[tokio::test]
async fn a_failed_host_detach_leaves_the_disk_ejected_and_a_retry_detaches_it() {
    let f = Fakes::running().await;
    f.controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect("add");
    f.script.clear_log();
    f.script.fail_nth(Call::DetachDisk, 1);
    f.controller
        .remove_disk("/data")
        .await
        .expect_err("detach fails");
    assert_eq!(f.controller.devices().disks[0].state, DiskState::Ejected);
    f.controller.remove_disk("/data").await.expect("retry");
    assert_eq!(
        device_calls(&f),
        vec![
            Call::UnmountDisk,
            Call::EjectDisk,
            Call::DetachDisk,
            Call::DetachDisk
        ]
    );
    assert!(f.controller.devices().disks.is_empty());
}

#[tokio::test]
async fn the_same_host_path_with_a_different_config_is_refused() {
    let f = Fakes::running().await;
    f.controller
        .add_disk(disk(0), DiskMount::at("/a"))
        .await
        .expect("add");
    f.script.clear_log();
    let mut read_only = disk(0);
    read_only.read_only = true;
    let err = f
        .controller
        .add_disk(read_only, DiskMount::at("/b"))
        .await
        .expect_err("other config");
    assert!(matches!(
        device_error(&err),
        DeviceError::ConfigMismatch { .. }
    ));
    assert!(device_calls(&f).is_empty());
}

#[tokio::test]
async fn a_writable_share_is_refused_under_no_writable_shares_and_a_read_only_one_passes() {
    let f = Fakes::running_with(VmConfig {
        no_writable_shares: true,
        ..VmConfig::default()
    })
    .await;
    let err = f
        .controller
        .add_share(share("/srv", false), share_mount("/srv"))
        .await
        .expect_err("writable");
    assert!(matches!(
        device_error(&err),
        DeviceError::WritableShareRefused { .. }
    ));
    assert!(device_calls(&f).is_empty());
    f.controller
        .add_share(share("/srv", true), share_mount("/srv"))
        .await
        .expect("read-only passes");
    match &f.guest.mounts()["/srv"] {
        FakeMount::Share(_, _, mount) => assert!(mount.read_only),
        other => panic!("not a share: {other:?}"),
    }
}

#[tokio::test]
async fn a_writable_share_given_at_create_is_refused_under_no_writable_shares() {
    let f = Fakes::new();
    let config = VmConfig {
        no_writable_shares: true,
        shares: vec![ShareSpec {
            share: share("/srv", false),
            mount: share_mount("/srv"),
        }],
        ..VmConfig::default()
    };
    let err = f.controller.create_vm(config).await.expect_err("refused");
    assert!(matches!(
        err,
        ControllerError::Device {
            operation: Operation::Create,
            source: DeviceError::WritableShareRefused { .. },
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::NotCreated);
    assert!(
        f.script.calls().is_empty(),
        "refused before the backend was asked"
    );
}

#[tokio::test]
async fn device_operations_are_refused_in_every_state_but_running() {
    for (f, state) in [
        (Fakes::new(), State::NotCreated),
        (Fakes::created().await, State::Created),
        (Fakes::terminated().await, State::Terminated),
        (Fakes::invalid().await, State::Invalid),
    ] {
        f.script.clear_log();
        let c = &f.controller;
        let refusals = [
            (
                Operation::AddDisk,
                c.add_disk(disk(0), DiskMount::at("/a")).await.map(drop),
            ),
            (Operation::RemoveDisk, c.remove_disk("/a").await),
            (
                Operation::AddShare,
                c.add_share(share("/srv", true), share_mount("/s"))
                    .await
                    .map(drop),
            ),
            (Operation::RemoveShare, c.remove_share("/s").await),
        ];
        for (op, r) in refusals {
            let err = r.expect_err("refused");
            assert!(
                matches!(err, ControllerError::WrongState { operation, state: s, .. } if operation == op && s == state),
                "{op} in {state}: {err:?}"
            );
        }
        assert!(f.script.calls().is_empty(), "{state}: no calls");
    }
}

#[tokio::test]
async fn removing_something_unknown_is_not_found() {
    let f = Fakes::running().await;
    f.controller
        .add_share(share("/srv", true), share_mount("/s"))
        .await
        .expect("add");
    f.script.clear_log();
    for (r, what) in [
        (f.controller.remove_disk("/nothing").await, "disk"),
        (f.controller.remove_share("/nothing").await, "share"),
        // A share is not removed as a disk.
        (f.controller.remove_disk("/s").await, "disk"),
    ] {
        let err = r.expect_err("unknown");
        assert!(
            matches!(device_error(&err), DeviceError::NotFound { what: w, .. } if *w == what),
            "{err:?}"
        );
    }
    assert!(device_calls(&f).is_empty());
    assert_eq!(f.controller.devices().shares.len(), 1);
}

#[tokio::test]
async fn a_guest_path_holds_one_device() {
    let f = Fakes::running().await;
    f.controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect("add");
    let err = f
        .controller
        .add_share(share("/srv", true), share_mount("/data"))
        .await
        .expect_err("taken by a disk");
    assert!(matches!(
        device_error(&err),
        DeviceError::GuestPathInUse { .. }
    ));
    let err = f
        .controller
        .add_disk(disk(1), DiskMount::at("/data"))
        .await
        .expect_err("taken by another disk");
    assert!(matches!(
        device_error(&err),
        DeviceError::GuestPathInUse { .. }
    ));
}

#[tokio::test]
async fn bad_guest_paths_are_refused_before_any_call() {
    let f = Fakes::running().await;
    for path in ["data", "/data/../etc", "/proc/self", "/dev"] {
        let err = f
            .controller
            .add_disk(disk(0), DiskMount::at(path))
            .await
            .expect_err(path);
        assert!(matches!(
            device_error(&err),
            DeviceError::InvalidArgument {
                what: "guest path",
                ..
            }
        ));
    }
    assert!(device_calls(&f).is_empty());
}

#[tokio::test]
async fn add_disk_attaches_then_mounts_and_remove_disk_unmounts_ejects_then_detaches() {
    let f = Fakes::running().await;
    let slot = f
        .controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect("add");
    assert_eq!(f.vm().attached_disks()[&slot], disk(0));
    assert_eq!(
        f.guest.mounts()["/data"],
        FakeMount::Disk(
            DiskLocation::Scsi {
                controller: 0,
                lun: 0
            },
            DiskMount::at("/data")
        )
    );
    let d = &f.controller.devices().disks[0];
    assert_eq!(
        (d.slot, d.state, d.cold),
        (slot, DiskState::Attached, false)
    );
    assert_eq!(d.config.host_path, disk(0).host_path);
    assert_eq!(d.mounts[0].config.guest_path, "/data");
    assert_eq!(d.mounts[0].state, MountState::Mounted);

    f.controller.remove_disk("/data").await.expect("remove");
    assert_eq!(
        device_calls(&f),
        vec![
            Call::AttachDisk,
            Call::MountDisk,
            Call::UnmountDisk,
            Call::EjectDisk,
            Call::DetachDisk
        ]
    );
    assert!(f.vm().attached_disks().is_empty());
    assert!(f.guest.mounts().is_empty());
    assert_eq!(
        f.guest.ejected(),
        vec![DiskLocation::Scsi {
            controller: 0,
            lun: 0
        }]
    );
}

#[tokio::test]
async fn adding_the_same_device_at_the_same_path_again_is_a_no_op() {
    let f = Fakes::running().await;
    let first = f
        .controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect("add");
    let again = f
        .controller
        .add_disk(disk(0), DiskMount::at("/data"))
        .await
        .expect("again");
    assert_eq!(first, again);
    let tag = f
        .controller
        .add_share(share("/srv", false), share_mount("/srv"))
        .await
        .expect("add");
    let tag_again = f
        .controller
        .add_share(share("/srv", false), share_mount("/srv"))
        .await
        .expect("again");
    assert_eq!(tag, tag_again);
    assert_eq!(
        device_calls(&f),
        vec![
            Call::AttachDisk,
            Call::MountDisk,
            Call::AddShare,
            Call::MountShare
        ]
    );
    // One removal takes each away.
    f.controller.remove_disk("/data").await.expect("remove");
    f.controller.remove_share("/srv").await.expect("remove");
    assert_eq!(f.controller.devices(), uvm::Devices::default());
}

#[tokio::test]
async fn add_share_adds_then_mounts_under_a_fresh_tag() {
    let f = Fakes::running().await;
    let tag = f
        .controller
        .add_share(share("/srv", false), share_mount("/srv"))
        .await
        .expect("add");
    assert_eq!(f.vm().added_shares()[&tag], share("/srv", false));
    assert_eq!(
        f.guest.mounts()["/srv"],
        FakeMount::Share(tag.clone(), ShareTransport::VirtioFs, share_mount("/srv"))
    );
    let s = &f.controller.devices().shares[0];
    assert_eq!((s.tag.as_str(), s.state), (tag.as_str(), ShareState::Added));
    f.controller.remove_share("/srv").await.expect("remove");
    let again = f
        .controller
        .add_share(share("/srv", false), share_mount("/srv"))
        .await
        .expect("add again");
    assert_ne!(again, tag, "a tag is never reused within a VM");
}

#[tokio::test]
async fn devices_given_at_create_are_reserved_cold_and_mounted_by_start() {
    let f = Fakes::new();
    let config = VmConfig {
        disks: vec![
            DiskSpec {
                disk: disk(0),
                mount: DiskMount::at("/d0"),
            },
            DiskSpec {
                disk: disk(1),
                mount: DiskMount::at("/d1"),
            },
        ],
        shares: vec![ShareSpec {
            share: share("/srv", true),
            mount: share_mount("/srv"),
        }],
        ..VmConfig::default()
    };
    f.controller.create_vm(config).await.expect("create");
    let devices = f.controller.devices();
    let slots: Vec<_> = devices
        .disks
        .iter()
        .map(|d| (d.slot.index(), d.state, d.cold))
        .collect();
    assert_eq!(
        slots,
        [
            (0, DiskState::Attached, true),
            (1, DiskState::Attached, true)
        ]
    );
    assert_eq!(devices.disks[0].mounts[0].state, MountState::Reserved);
    assert_eq!(devices.shares[0].tag, "uvm-cold-0");
    assert_eq!(devices.shares[0].state, ShareState::Added);

    f.controller.start_vm().await.expect("start");
    let calls = f.script.calls();
    let connect = calls
        .iter()
        .position(|c| *c == Call::Connect)
        .expect("connect");
    assert_eq!(
        calls[connect + 1..],
        [Call::MountDisk, Call::MountDisk, Call::MountShare],
        "mounted after the guest connected, without attaching again"
    );
    assert_eq!(f.guest.mounts().len(), 3);
    let devices = f.controller.devices();
    assert!(devices
        .disks
        .iter()
        .all(|d| d.mounts[0].state == MountState::Mounted));

    // A hot disk takes the next free slot; a cold one is removed like a hot one.
    let slot = f
        .controller
        .add_disk(disk(2), DiskMount::at("/d2"))
        .await
        .expect("add");
    assert_eq!(slot.index(), 2);
    f.controller.remove_disk("/d0").await.expect("remove cold");
    assert!(!f.vm().attached_disks().contains_key(&ScsiSlot {
        controller: 0,
        lun: 0
    }));
    let slot = f
        .controller
        .add_disk(disk(3), DiskMount::at("/d3"))
        .await
        .expect("add");
    assert_eq!(slot.index(), 0, "the cold disk's slot is reused");
}

#[tokio::test]
async fn a_failed_cold_mount_fails_the_start_at_mount_devices_and_terminate_cleans_up() {
    let f = Fakes::new();
    let config = VmConfig {
        disks: vec![DiskSpec {
            disk: disk(0),
            mount: DiskMount::at("/d0"),
        }],
        ..VmConfig::default()
    };
    f.controller.create_vm(config).await.expect("create");
    f.script.fail_nth(Call::MountDisk, 1);
    let err = f.controller.start_vm().await.expect_err("mount fails");
    assert!(matches!(
        err,
        ControllerError::StartFailed {
            step: StartStep::MountDevices,
            source: uvm::SeamError::Guest(GuestError::Rejected { .. }),
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::Invalid);
    f.script.clear_log();
    f.controller.terminate_vm().await.expect("terminate");
    assert_eq!(f.controller.state(), State::Terminated);
    // The failed mount needs no unmount; the disk is ejected and detached before the VM goes.
    assert_eq!(
        f.script.calls(),
        vec![
            Call::EjectDisk,
            Call::DetachDisk,
            Call::Terminate,
            Call::CloseConnection,
            Call::Release
        ]
    );
    assert_eq!(f.controller.devices(), uvm::Devices::default());
}

#[tokio::test]
async fn devices_given_at_create_that_do_not_fit_are_refused_before_the_backend() {
    let twice = VmConfig {
        disks: vec![
            DiskSpec {
                disk: disk(0),
                mount: DiskMount::at("/a"),
            },
            DiskSpec {
                disk: disk(0),
                mount: DiskMount::at("/b"),
            },
        ],
        ..VmConfig::default()
    };
    let same_path = VmConfig {
        disks: vec![DiskSpec {
            disk: disk(0),
            mount: DiskMount::at("/a"),
        }],
        shares: vec![ShareSpec {
            share: share("/srv", true),
            mount: share_mount("/a"),
        }],
        ..VmConfig::default()
    };
    for config in [twice, same_path] {
        let f = Fakes::new();
        let err = f.controller.create_vm(config).await.expect_err("refused");
        assert!(matches!(
            err,
            ControllerError::Device {
                source: DeviceError::InvalidArgument { .. } | DeviceError::GuestPathInUse { .. },
                ..
            }
        ));
        assert!(f.script.calls().is_empty());
    }
}
