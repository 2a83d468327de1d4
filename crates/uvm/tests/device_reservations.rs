//! The sub-controllers on their own, on the fakes: reservations, refcounts, slots, retries.
//! Failure paths first.

use uvm::devices::scsi::{DiskState, ScsiController};
use uvm::devices::shares::{ShareController, ShareState};
use uvm::devices::{Deadlines, DeviceError, MountState};
use uvm::seams::{DiskConfig, DiskMount, ScsiSlot, ShareConfig, ShareMount};
use uvm::testing::{Call, Fakes};
use uvm::{GuestError, HostError, Rejection};

fn deadlines() -> Deadlines {
    Deadlines {
        host: std::time::Duration::from_secs(5),
        guest: std::time::Duration::from_secs(5),
    }
}

fn scsi(controllers: u8) -> ScsiController {
    ScsiController::new(controllers, deadlines())
}

fn disk(n: usize) -> DiskConfig {
    DiskConfig::raw(format!("/images/disk-{n}.img"))
}

fn share(path: &str) -> ShareConfig {
    ShareConfig {
        host_path: path.into(),
        read_only: false,
    }
}

fn share_mount(path: &str) -> ShareMount {
    ShareMount {
        guest_path: path.into(),
        read_only: false,
    }
}

/// The device calls in the log, in order (the set-up calls left out).
fn device_calls(f: &Fakes) -> Vec<Call> {
    f.script
        .calls()
        .into_iter()
        .filter(|c| {
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
        })
        .collect()
}

#[tokio::test]
async fn a_failed_attach_is_terminal_and_the_unmap_frees_the_slot() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let c = scsi(1);
    let id = c.reserve(disk(0), DiskMount::at("/a")).expect("reserve");
    f.script.fail_nth(Call::AttachDisk, 1);
    let err = c.map(id, &*vm, &*guest).await.expect_err("attach fails");
    assert!(
        matches!(
            err,
            DeviceError::Host {
                step: "attach disk",
                source: HostError::Failed { .. }
            }
        ),
        "{err:?}"
    );
    assert_eq!(c.snapshot()[0].state, DiskState::Detached);
    // Mapping again is refused: a failed attach is terminal.
    let again = c.map(id, &*vm, &*guest).await.expect_err("terminal");
    assert!(matches!(
        again,
        DeviceError::WrongDeviceState {
            what: "disk",
            state: "Detached",
            ..
        }
    ));
    c.unmap(id, &*vm, &*guest).await.expect("unmap cleans up");
    assert!(c.snapshot().is_empty());
    assert_eq!(device_calls(&f), vec![Call::AttachDisk]);
    let next = c.reserve(disk(1), DiskMount::at("/b")).expect("reserve");
    assert_eq!(
        c.map(next, &*vm, &*guest).await.expect("map"),
        ScsiSlot {
            controller: 0,
            lun: 0
        }
    );
}

#[tokio::test]
async fn a_failed_guest_mount_then_a_retried_map_fails_and_an_unmap_cleans_up() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let c = scsi(1);
    let id = c.reserve(disk(0), DiskMount::at("/a")).expect("reserve");
    f.script.fail_nth(Call::MountDisk, 1);
    let err = c.map(id, &*vm, &*guest).await.expect_err("mount fails");
    assert!(matches!(
        err,
        DeviceError::Guest {
            step: "mount disk",
            source: GuestError::Rejected { .. }
        }
    ));
    let snap = &c.snapshot()[0];
    assert_eq!(snap.state, DiskState::Attached);
    assert_eq!(snap.mounts[0].state, MountState::Unmounted);

    let retry = c
        .map(id, &*vm, &*guest)
        .await
        .expect_err("a failed mount is over");
    assert!(matches!(
        retry,
        DeviceError::WrongDeviceState {
            what: "mount",
            state: "Unmounted",
            ..
        }
    ));
    c.unmap(id, &*vm, &*guest).await.expect("unmap cleans up");
    assert!(c.snapshot().is_empty());
    assert!(vm.attached_disks().is_empty());
    assert!(guest.mounts().is_empty());
    // Nothing was mounted, so nothing is unmounted; the disk is ejected, then detached.
    assert_eq!(
        device_calls(&f),
        vec![
            Call::AttachDisk,
            Call::MountDisk,
            Call::EjectDisk,
            Call::DetachDisk
        ]
    );
}

#[tokio::test]
async fn a_busy_unmount_keeps_the_mount_and_a_retry_succeeds() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let c = scsi(1);
    let id = c.reserve(disk(0), DiskMount::at("/a")).expect("reserve");
    c.map(id, &*vm, &*guest).await.expect("map");
    guest.refuse_unmount("/a", Rejection::Busy);
    let err = c.unmap(id, &*vm, &*guest).await.expect_err("busy");
    assert!(matches!(
        err,
        DeviceError::Guest {
            source: GuestError::Rejected {
                kind: Rejection::Busy,
                ..
            },
            ..
        }
    ));
    let snap = &c.snapshot()[0];
    assert_eq!(
        (snap.state, snap.mounts[0].state),
        (DiskState::Attached, MountState::Mounted)
    );
    guest.allow_unmount("/a");
    c.unmap(id, &*vm, &*guest).await.expect("retry");
    assert!(c.snapshot().is_empty());
    assert!(vm.attached_disks().is_empty());
}

#[tokio::test]
async fn a_failed_host_detach_stays_ejected_and_a_retry_only_detaches() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let c = scsi(1);
    let id = c.reserve(disk(0), DiskMount::at("/a")).expect("reserve");
    c.map(id, &*vm, &*guest).await.expect("map");
    f.script.clear_log();
    f.script.fail_nth(Call::DetachDisk, 1);
    let err = c.unmap(id, &*vm, &*guest).await.expect_err("detach fails");
    assert!(matches!(
        err,
        DeviceError::Host {
            step: "detach disk",
            ..
        }
    ));
    assert_eq!(c.snapshot()[0].state, DiskState::Ejected);
    assert!(c.snapshot()[0].mounts.is_empty());
    c.unmap(id, &*vm, &*guest).await.expect("retry");
    assert_eq!(
        device_calls(&f),
        vec![
            Call::UnmountDisk,
            Call::EjectDisk,
            Call::DetachDisk,
            Call::DetachDisk
        ]
    );
    assert!(c.snapshot().is_empty());
    assert!(vm.attached_disks().is_empty());
}

#[tokio::test]
async fn a_failed_eject_stays_attached_and_a_retry_ejects_and_detaches() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let c = scsi(1);
    let id = c.reserve(disk(0), DiskMount::at("/a")).expect("reserve");
    c.map(id, &*vm, &*guest).await.expect("map");
    f.script.fail_nth(Call::EjectDisk, 1);
    c.unmap(id, &*vm, &*guest).await.expect_err("eject fails");
    assert_eq!(c.snapshot()[0].state, DiskState::Attached);
    c.unmap(id, &*vm, &*guest).await.expect("retry");
    assert!(vm.attached_disks().is_empty());
}

#[tokio::test]
async fn several_reservations_of_one_disk_all_drain_after_a_failed_attach() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let c = scsi(1);
    let a1 = c.reserve(disk(0), DiskMount::at("/a")).expect("reserve");
    let a2 = c.reserve(disk(0), DiskMount::at("/a")).expect("same mount");
    let b = c
        .reserve(disk(0), DiskMount::at("/b"))
        .expect("another mount");
    let snap = &c.snapshot()[0];
    assert_eq!(
        snap.mounts.iter().map(|m| m.references).collect::<Vec<_>>(),
        [2, 1]
    );

    f.script.fail_nth(Call::AttachDisk, 1);
    c.map(a1, &*vm, &*guest).await.expect_err("attach fails");
    for id in [a2, b] {
        let err = c
            .map(id, &*vm, &*guest)
            .await
            .expect_err("disk is Detached");
        assert!(matches!(
            err,
            DeviceError::WrongDeviceState { what: "disk", .. }
        ));
    }
    let late = c
        .reserve(disk(0), DiskMount::at("/c"))
        .expect_err("no new references");
    assert!(matches!(
        late,
        DeviceError::WrongDeviceState {
            what: "disk",
            state: "Detached",
            ..
        }
    ));
    for id in [a2, a1, b] {
        c.unmap(id, &*vm, &*guest).await.expect("drains");
        // The slot is freed only with the last reservation.
        assert_eq!(c.snapshot().is_empty(), id == b);
    }
    assert_eq!(device_calls(&f), vec![Call::AttachDisk]);
    let err = c.unmap(a1, &*vm, &*guest).await.expect_err("gone");
    assert!(matches!(
        err,
        DeviceError::UnknownReservation { what: "disk", .. }
    ));
}

#[tokio::test]
async fn slots_fill_up_and_a_freed_slot_is_reused() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let c = scsi(2);
    let ids: Vec<_> = (0..128)
        .map(|n| {
            c.reserve(disk(n), DiskMount::at(format!("/d{n}")))
                .expect("a free slot")
        })
        .collect();
    let full = c
        .reserve(disk(128), DiskMount::at("/d128"))
        .expect_err("full");
    assert!(matches!(
        full,
        DeviceError::NoAvailableSlots { capacity: 128 }
    ));
    let slots: Vec<ScsiSlot> = c.snapshot().iter().map(|d| d.slot).collect();
    assert_eq!(
        slots[64],
        ScsiSlot {
            controller: 1,
            lun: 0
        }
    );
    assert_eq!(
        slots[127],
        ScsiSlot {
            controller: 1,
            lun: 63
        }
    );

    // A reservation never mapped only drops its reference: no I/O, and its slot is free again.
    c.unmap(ids[10], &*vm, &*guest).await.expect("unmap");
    assert!(device_calls(&f).is_empty());
    let again = c
        .reserve(disk(200), DiskMount::at("/again"))
        .expect("the freed slot");
    let slot = c.map(again, &*vm, &*guest).await.expect("map");
    assert_eq!(
        slot,
        ScsiSlot {
            controller: 0,
            lun: 10
        }
    );
}

#[tokio::test]
async fn no_scsi_controller_means_no_hot_slots() {
    let c = scsi(0);
    let err = c
        .reserve(disk(0), DiskMount::at("/a"))
        .expect_err("no slots");
    assert!(matches!(err, DeviceError::NoAvailableSlots { capacity: 0 }));
}

#[tokio::test]
async fn the_same_host_path_with_a_different_config_is_refused() {
    let c = scsi(1);
    c.reserve(disk(0), DiskMount::at("/a")).expect("reserve");
    let mut read_only = disk(0);
    read_only.read_only = true;
    let err = c
        .reserve(read_only, DiskMount::at("/b"))
        .expect_err("other config");
    assert!(matches!(err, DeviceError::ConfigMismatch { .. }));

    let s = ShareController::new(false, deadlines());
    s.reserve(share("/srv/a"), share_mount("/a"))
        .expect("reserve");
    let mut ro = share("/srv/a");
    ro.read_only = true;
    let err = s.reserve(ro, share_mount("/b")).expect_err("other config");
    assert!(matches!(err, DeviceError::ConfigMismatch { .. }));
}

#[tokio::test]
async fn one_guest_path_holds_one_mount() {
    let c = scsi(1);
    c.reserve(disk(0), DiskMount::at("/a")).expect("reserve");
    let err = c
        .reserve(disk(1), DiskMount::at("/a"))
        .expect_err("taken by another disk");
    assert!(matches!(err, DeviceError::GuestPathInUse { .. }));
    let mut other = DiskMount::at("/a");
    other.partition = 1;
    let err = c
        .reserve(disk(0), other)
        .expect_err("taken by another mount of the disk");
    assert!(matches!(err, DeviceError::GuestPathInUse { .. }));
}

#[tokio::test]
async fn bad_paths_are_refused_at_reserve() {
    let c = scsi(1);
    for path in ["relative", "/a/../b", "/", "/proc/x", "/sys", "/dev/sda"] {
        let err = c.reserve(disk(0), DiskMount::at(path)).expect_err(path);
        assert!(
            matches!(
                err,
                DeviceError::InvalidArgument {
                    what: "guest path",
                    ..
                }
            ),
            "{path}: {err:?}"
        );
    }
    let err = c
        .reserve(DiskConfig::raw("images/x.img"), DiskMount::at("/a"))
        .expect_err("relative host path");
    assert!(matches!(
        err,
        DeviceError::InvalidArgument {
            what: "host path",
            ..
        }
    ));
    // /processes is not /proc.
    c.reserve(disk(0), DiskMount::at("/processes"))
        .expect("a lookalike is fine");
}

#[tokio::test]
async fn a_disk_stays_attached_until_its_last_mount_is_gone() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let c = scsi(1);
    let a = c.reserve(disk(0), DiskMount::at("/a")).expect("reserve");
    let b = c.reserve(disk(0), DiskMount::at("/b")).expect("reserve");
    c.map(a, &*vm, &*guest).await.expect("map a");
    c.map(b, &*vm, &*guest).await.expect("map b");
    c.map(b, &*vm, &*guest).await.expect("map is idempotent");
    assert_eq!(
        device_calls(&f),
        vec![Call::AttachDisk, Call::MountDisk, Call::MountDisk]
    );
    c.unmap(a, &*vm, &*guest).await.expect("unmap a");
    assert_eq!(vm.attached_disks().len(), 1);
    assert_eq!(guest.mounts().keys().collect::<Vec<_>>(), ["/b"]);
    c.unmap(b, &*vm, &*guest).await.expect("unmap b");
    assert!(vm.attached_disks().is_empty());
    assert!(guest.mounts().is_empty());
}

#[tokio::test]
async fn a_read_only_disk_is_always_mounted_read_only() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let c = scsi(1);
    let mut ro = disk(0);
    ro.read_only = true;
    let id = c.reserve(ro, DiskMount::at("/a")).expect("reserve");
    c.map(id, &*vm, &*guest).await.expect("map");
    match &guest.mounts()["/a"] {
        uvm::testing::FakeMount::Disk(_, mount) => assert!(mount.read_only),
        other => panic!("not a disk: {other:?}"),
    }
}

#[tokio::test]
async fn a_failed_share_add_goes_invalid_and_its_reservations_drain() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let s = ShareController::new(false, deadlines());
    let a = s
        .reserve(share("/srv"), share_mount("/a"))
        .expect("reserve");
    let b = s
        .reserve(share("/srv"), share_mount("/b"))
        .expect("reserve");
    f.script.fail_nth(Call::AddShare, 1);
    s.map(a, &*vm, &*guest).await.expect_err("add fails");
    assert_eq!(s.snapshot()[0].state, ShareState::Invalid);
    let err = s.map(b, &*vm, &*guest).await.expect_err("invalid");
    assert!(matches!(
        err,
        DeviceError::WrongDeviceState {
            what: "share",
            state: "Invalid",
            ..
        }
    ));
    s.unmap(a, &*vm, &*guest).await.expect("drain a");
    assert_eq!(s.snapshot()[0].state, ShareState::Invalid);
    s.unmap(b, &*vm, &*guest).await.expect("drain b");
    assert!(s.snapshot().is_empty());
    assert_eq!(device_calls(&f), vec![Call::AddShare]);
}

#[tokio::test]
async fn a_failed_share_removal_stays_added_and_a_retry_removes_it() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let s = ShareController::new(false, deadlines());
    let id = s
        .reserve(share("/srv"), share_mount("/a"))
        .expect("reserve");
    let tag = s.map(id, &*vm, &*guest).await.expect("map");
    f.script.fail_nth(Call::RemoveShare, 1);
    s.unmap(id, &*vm, &*guest).await.expect_err("removal fails");
    assert_eq!(s.snapshot()[0].state, ShareState::Added);
    assert!(vm.added_shares().contains_key(&tag));
    s.unmap(id, &*vm, &*guest).await.expect("retry");
    assert!(vm.added_shares().is_empty());
    assert_eq!(
        device_calls(&f),
        vec![
            Call::AddShare,
            Call::MountShare,
            Call::UnmountShare,
            Call::RemoveShare,
            Call::RemoveShare
        ]
    );
}

#[tokio::test]
async fn hot_share_tags_are_unique_and_never_reused() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let s = ShareController::new(false, deadlines());
    let mut tags = Vec::new();
    for _ in 0..3 {
        let id = s
            .reserve(share("/srv"), share_mount("/a"))
            .expect("reserve");
        tags.push(s.map(id, &*vm, &*guest).await.expect("map"));
        s.unmap(id, &*vm, &*guest).await.expect("unmap");
    }
    assert_eq!(tags, ["uvm-share-0", "uvm-share-1", "uvm-share-2"]);
}

#[tokio::test]
async fn writable_shares_are_refused_under_no_writable_shares_and_read_only_ones_pass() {
    let s = ShareController::new(true, deadlines());
    let err = s
        .reserve(share("/srv"), share_mount("/a"))
        .expect_err("writable");
    assert!(matches!(err, DeviceError::WritableShareRefused { .. }));
    let mut ro = share("/srv");
    ro.read_only = true;
    s.reserve(ro, share_mount("/a")).expect("read-only passes");
    let mount = &s.snapshot()[0].mounts[0];
    assert!(mount.config.read_only, "a read-only share mounts read-only");
}

#[tokio::test]
async fn teardown_takes_down_devices_in_every_state_and_empties_the_books() {
    let f = Fakes::running().await;
    let (vm, guest) = (f.vm(), f.guest.clone());
    let c = scsi(1);
    // Reserved, never mapped.
    c.reserve(disk(0), DiskMount::at("/reserved"))
        .expect("reserve");
    // Detached after a failed attach, a reservation still outstanding.
    let detached = c
        .reserve(disk(1), DiskMount::at("/detached"))
        .expect("reserve");
    f.script.fail_nth(Call::AttachDisk, 1);
    c.map(detached, &*vm, &*guest)
        .await
        .expect_err("attach fails");
    // Attached with a failed (Unmounted) mount.
    let failed = c
        .reserve(disk(2), DiskMount::at("/failed"))
        .expect("reserve");
    f.script.fail_nth(Call::MountDisk, 1);
    c.map(failed, &*vm, &*guest).await.expect_err("mount fails");
    // Attached and mounted.
    let mounted = c
        .reserve(disk(3), DiskMount::at("/mounted"))
        .expect("reserve");
    c.map(mounted, &*vm, &*guest).await.expect("map");
    // Ejected after a failed detach.
    let ejected = c
        .reserve(disk(4), DiskMount::at("/ejected"))
        .expect("reserve");
    c.map(ejected, &*vm, &*guest).await.expect("map");
    f.script.fail_nth(Call::DetachDisk, 1);
    c.unmap(ejected, &*vm, &*guest)
        .await
        .expect_err("detach fails");
    let states: Vec<_> = c.snapshot().iter().map(|d| d.state).collect();
    assert_eq!(
        states,
        [
            DiskState::Reserved,
            DiskState::Detached,
            DiskState::Attached,
            DiskState::Attached,
            DiskState::Ejected
        ]
    );

    let s = ShareController::new(false, deadlines());
    s.reserve(share("/srv/reserved"), share_mount("/s-reserved"))
        .expect("reserve");
    let invalid = s
        .reserve(share("/srv/invalid"), share_mount("/s-invalid"))
        .expect("reserve");
    f.script.fail_nth(Call::AddShare, 1);
    s.map(invalid, &*vm, &*guest).await.expect_err("add fails");
    let added = s
        .reserve(share("/srv/added"), share_mount("/s-added"))
        .expect("reserve");
    s.map(added, &*vm, &*guest).await.expect("map");
    let states: Vec<_> = s.snapshot().iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [ShareState::Reserved, ShareState::Invalid, ShareState::Added]
    );
    f.script.clear_log();

    let mut reach = uvm::devices::Reach {
        guest: true,
        host: true,
    };
    c.teardown_guest(&*vm, &*guest, &mut reach).await;
    s.teardown_guest(&*guest, &mut reach).await;
    c.teardown_host(&*vm, &*guest, &mut reach).await;
    s.teardown_host(&*vm, &mut reach).await;
    assert_eq!(
        device_calls(&f),
        vec![
            // Guest: the failed disk's eject, the mounted disk's unmount and eject, the share's
            // unmount; nothing for what never reached the guest.
            Call::EjectDisk,
            Call::UnmountDisk,
            Call::EjectDisk,
            Call::UnmountShare,
            // Host: the three disks on the VM, the one added share.
            Call::DetachDisk,
            Call::DetachDisk,
            Call::DetachDisk,
            Call::RemoveShare
        ]
    );
    assert!(c.snapshot().is_empty());
    assert!(s.snapshot().is_empty());
    assert!(vm.attached_disks().is_empty());
    assert!(vm.added_shares().is_empty());
    assert!(guest.mounts().is_empty());
    assert_eq!(
        reach,
        uvm::devices::Reach {
            guest: true,
            host: true
        }
    );
}
