//! The vPCI sub-controller through the VM controller, on the fakes (hcsshim `device/vpci`
//! semantics): one reservation per device, reference-counted adds, a host failure leaves
//! nothing, a guest failure or a failed removal is AssignedInvalid until a remove clears it.

use uvm::devices::vpci::PciState;
use uvm::devices::DeviceError;
use uvm::seams::{PciAddress, PciLocation};
use uvm::testing::{Call, Fakes};
use uvm::{ControllerError, HostError, State};

fn bdf() -> PciAddress {
    "0000:03:00.0".parse().expect("a test value")
}

const NIC: PciLocation = PciLocation {
    vendor: 0x8086,
    device: 0x10fb,
};

async fn running_with_device() -> Fakes {
    let f = Fakes::running().await;
    f.backend.add_pci_device(bdf(), NIC);
    f
}

fn device_error(err: &ControllerError) -> &DeviceError {
    match err {
        ControllerError::Device { source, .. } => source,
        other => panic!("not a device error: {other:?}"),
    }
}

fn pci_calls(f: &Fakes) -> Vec<Call> {
    f.script
        .calls()
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Call::ProbePci | Call::AddPci | Call::RemovePci | Call::WaitPciDevice
            )
        })
        .collect()
}

#[tokio::test]
async fn a_device_the_host_cannot_assign_is_refused_by_the_probe_before_any_state_changes() {
    let f = Fakes::running().await;
    let err = f
        .controller
        .add_pci_device(bdf())
        .await
        .expect_err("no such device here");
    assert!(matches!(
        device_error(&err),
        DeviceError::Host {
            step: "probe PCI device",
            source: HostError::Unsupported { .. }
        }
    ));
    assert_eq!(pci_calls(&f), vec![Call::ProbePci]);
    assert!(f.controller.pci_devices().is_empty());
}

#[tokio::test]
async fn the_same_device_twice_is_one_reservation_with_two_references() {
    let f = running_with_device().await;
    let a = f.controller.add_pci_device(bdf()).await.expect("first");
    let b = f.controller.add_pci_device(bdf()).await.expect("second");
    assert_eq!(a, b);
    assert_eq!(f.script.count(Call::AddPci), 1, "plugged once");
    let d = f.controller.pci_devices();
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].state, d[0].references), (PciState::Assigned, 2));
    assert_eq!(f.guest.pci_seen(), vec![NIC]);
}

#[tokio::test]
async fn removal_happens_at_the_last_reference() {
    let f = running_with_device().await;
    let id = f
        .controller
        .add_pci_device(bdf())
        .await
        .expect("a test value");
    f.controller
        .add_pci_device(bdf())
        .await
        .expect("a test value");
    f.controller
        .remove_pci_device(&id)
        .await
        .expect("first remove");
    assert_eq!(f.script.count(Call::RemovePci), 0);
    assert_eq!(f.vm().pci_devices().len(), 1);
    f.controller
        .remove_pci_device(&id)
        .await
        .expect("last remove");
    assert_eq!(f.script.count(Call::RemovePci), 1);
    assert!(f.vm().pci_devices().is_empty());
    assert!(f.controller.pci_devices().is_empty());
    let err = f.controller.remove_pci_device(&id).await.expect_err("gone");
    assert!(matches!(
        device_error(&err),
        DeviceError::UnknownDevice { .. }
    ));
}

#[tokio::test]
async fn a_host_add_failure_leaves_the_device_removed_and_a_retry_starts_afresh() {
    let f = running_with_device().await;
    f.script.fail_nth(Call::AddPci, 1);
    let err = f
        .controller
        .add_pci_device(bdf())
        .await
        .expect_err("host fails");
    assert!(matches!(
        device_error(&err),
        DeviceError::Host {
            step: "add PCI device",
            ..
        }
    ));
    assert!(f.controller.pci_devices().is_empty());
    assert!(f.vm().pci_devices().is_empty());
    assert_eq!(f.script.count(Call::RemovePci), 0, "nothing to remove");
    f.controller.add_pci_device(bdf()).await.expect("retry");
    assert_eq!(f.controller.pci_devices()[0].state, PciState::Assigned);
}

#[tokio::test]
async fn a_guest_wait_failure_is_assigned_invalid_and_the_add_removes_it_again() {
    let f = running_with_device().await;
    f.script.fail_nth(Call::WaitPciDevice, 1);
    f.controller
        .add_pci_device(bdf())
        .await
        .expect_err("guest fails");
    assert_eq!(
        pci_calls(&f),
        vec![
            Call::ProbePci,
            Call::AddPci,
            Call::WaitPciDevice,
            Call::RemovePci
        ]
    );
    assert!(f.vm().pci_devices().is_empty());
    assert!(f.controller.pci_devices().is_empty());
}

#[tokio::test]
async fn assigned_invalid_is_cleared_only_by_a_retried_remove() {
    let f = running_with_device().await;
    f.script.fail_nth(Call::WaitPciDevice, 1);
    f.script.fail_nth(Call::RemovePci, 1);
    f.controller
        .add_pci_device(bdf())
        .await
        .expect_err("guest fails");
    let d = f.controller.pci_devices();
    assert_eq!(d[0].state, PciState::AssignedInvalid);
    assert_eq!(
        f.vm().pci_devices().len(),
        1,
        "the host side is still there"
    );
    // An add does not paper over it.
    let err = f
        .controller
        .add_pci_device(bdf())
        .await
        .expect_err("invalid");
    assert!(matches!(
        device_error(&err),
        DeviceError::WrongDeviceState { .. }
    ));
    assert_eq!(
        f.controller.pci_devices()[0].state,
        PciState::AssignedInvalid
    );
    assert_eq!(f.script.count(Call::AddPci), 1);
    f.controller
        .remove_pci_device(&d[0].id)
        .await
        .expect("remove");
    assert!(f.controller.pci_devices().is_empty());
    assert!(f.vm().pci_devices().is_empty());
}

#[tokio::test]
async fn a_failed_last_removal_is_assigned_invalid_and_a_retry_removes_it() {
    let f = running_with_device().await;
    let id = f
        .controller
        .add_pci_device(bdf())
        .await
        .expect("a test value");
    f.script.fail_nth(Call::RemovePci, 1);
    f.controller
        .remove_pci_device(&id)
        .await
        .expect_err("host fails");
    assert_eq!(
        f.controller.pci_devices()[0].state,
        PciState::AssignedInvalid
    );
    f.controller.remove_pci_device(&id).await.expect("retry");
    assert!(f.vm().pci_devices().is_empty());
    assert!(f.controller.pci_devices().is_empty());
}

#[tokio::test]
async fn terminate_removes_assigned_devices() {
    let f = running_with_device().await;
    f.controller
        .add_pci_device(bdf())
        .await
        .expect("a test value");
    f.controller.terminate_vm().await.expect("a test value");
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(f.script.count(Call::RemovePci), 1);
    assert!(f.controller.pci_devices().is_empty());
}
