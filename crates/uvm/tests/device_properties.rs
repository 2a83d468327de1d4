//! Property test: random disk and share operations on a running VM, with random failures of the
//! device calls and busy unmounts. After every step the books agree with the fakes — a disk is
//! attached on the fake VM exactly when the books say Attached or Ejected, a share is added
//! exactly when they say Added, a guest path is mounted exactly when they say Mounted — and
//! after the final terminate the VM is Terminated with nothing in the books.

use std::collections::BTreeSet;

use proptest::prelude::*;
use uvm::devices::scsi::DiskState;
use uvm::devices::shares::ShareState;
use uvm::devices::MountState;
use uvm::seams::{DiskConfig, DiskMount, ShareConfig, ShareMount, VmConfig};
use uvm::testing::{Call, Fakes};
use uvm::{Rejection, State};

#[derive(Debug, Clone)]
enum Step {
    AddDisk {
        disk: usize,
        path: usize,
        ro: bool,
    },
    RemoveDisk(usize),
    AddShare {
        share: usize,
        path: usize,
        ro: bool,
    },
    RemoveShare(usize),
    /// The next call of this kind fails.
    FailNext(usize),
    Busy(usize),
    NotBusy(usize),
}

const FAILABLE: [Call; 9] = [
    Call::AttachDisk,
    Call::DetachDisk,
    Call::AddShare,
    Call::RemoveShare,
    Call::MountDisk,
    Call::UnmountDisk,
    Call::EjectDisk,
    Call::MountShare,
    Call::UnmountShare,
];

const PATHS: [&str; 4] = ["/a", "/b", "/c", "/a/inner"];

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0usize..3, 0usize..PATHS.len(), any::<bool>())
            .prop_map(|(disk, path, ro)| Step::AddDisk { disk, path, ro }),
        2 => (0usize..PATHS.len()).prop_map(Step::RemoveDisk),
        3 => (0usize..2, 0usize..PATHS.len(), any::<bool>())
            .prop_map(|(share, path, ro)| Step::AddShare { share, path, ro }),
        2 => (0usize..PATHS.len()).prop_map(Step::RemoveShare),
        2 => (0usize..FAILABLE.len()).prop_map(Step::FailNext),
        1 => (0usize..PATHS.len()).prop_map(Step::Busy),
        1 => (0usize..PATHS.len()).prop_map(Step::NotBusy),
    ]
}

fn books_agree_with_the_fakes(f: &Fakes) -> Result<(), TestCaseError> {
    let devices = f.controller.devices();
    let attached: BTreeSet<_> = devices
        .disks
        .iter()
        .filter(|d| matches!(d.state, DiskState::Attached | DiskState::Ejected))
        .map(|d| d.slot)
        .collect();
    let on_vm: BTreeSet<_> = f.vm().attached_disks().keys().copied().collect();
    prop_assert_eq!(
        attached.len(),
        devices.disks.len(),
        "no disk Reserved or Detached"
    );
    prop_assert_eq!(attached, on_vm, "attached disks");
    let added: BTreeSet<_> = devices
        .shares
        .iter()
        .filter(|s| s.state == ShareState::Added)
        .map(|s| s.tag.clone())
        .collect();
    let on_vm: BTreeSet<_> = f.vm().added_shares().keys().cloned().collect();
    prop_assert_eq!(
        added.len(),
        devices.shares.len(),
        "no share Reserved or Invalid"
    );
    prop_assert_eq!(added, on_vm, "added shares");
    let mut mounted = BTreeSet::new();
    let disk_mounts = devices.disks.iter().flat_map(|d| {
        d.mounts
            .iter()
            .map(|m| (m.state, m.config.guest_path.clone()))
    });
    let share_mounts = devices.shares.iter().flat_map(|s| {
        s.mounts
            .iter()
            .map(|m| (m.state, m.config.guest_path.clone()))
    });
    for (state, path) in disk_mounts.chain(share_mounts) {
        // Nothing half-done outlives an operation: a failed add was undone, a failed removal
        // left its mount mounted (busy) or already gone.
        prop_assert_eq!(state, MountState::Mounted, "{}", path);
        prop_assert!(mounted.insert(path), "one mount per guest path");
    }
    let in_guest: BTreeSet<_> = f.guest.mounts().keys().cloned().collect();
    prop_assert_eq!(mounted, in_guest, "guest mounts");
    Ok(())
}

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let f = Fakes::new();
    let config = VmConfig {
        scsi_controllers: 1,
        ..VmConfig::default()
    };
    f.controller.create_vm(config).await.expect("create");
    f.controller.start_vm().await.expect("start");
    let c = &f.controller;
    for step in &steps {
        match step {
            Step::AddDisk { disk, path, ro } => {
                let mut config = DiskConfig::raw(format!("/images/{disk}.img"));
                config.read_only = *ro;
                let _ = c.add_disk(config, DiskMount::at(PATHS[*path])).await;
            }
            Step::RemoveDisk(path) => {
                let _ = c.remove_disk(PATHS[*path]).await;
            }
            Step::AddShare { share, path, ro } => {
                let config = ShareConfig {
                    host_path: format!("/srv/{share}").into(),
                    read_only: *ro,
                };
                let mount = ShareMount {
                    guest_path: PATHS[*path].into(),
                    read_only: false,
                };
                let _ = c.add_share(config, mount).await;
            }
            Step::RemoveShare(path) => {
                let _ = c.remove_share(PATHS[*path]).await;
            }
            Step::FailNext(call) => {
                let call = FAILABLE[*call];
                f.script.fail_nth(call, f.script.count(call) + 1);
            }
            Step::Busy(path) => f.guest.refuse_unmount(PATHS[*path], Rejection::Busy),
            Step::NotBusy(path) => f.guest.allow_unmount(PATHS[*path]),
        }
        prop_assert_eq!(
            c.state(),
            State::Running,
            "device operations never move the VM"
        );
        books_agree_with_the_fakes(&f)?;
    }
    c.terminate_vm().await.expect("terminate");
    prop_assert_eq!(c.state(), State::Terminated);
    prop_assert_eq!(c.devices(), uvm::Devices::default());
    prop_assert!(f.vm().attached_disks().is_empty());
    prop_assert!(f.vm().added_shares().is_empty());
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_device_operations_keep_the_books_and_the_fakes_in_step(
        steps in prop::collection::vec(step(), 1..32),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run(steps))?;
    }
}
