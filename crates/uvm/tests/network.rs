//! The network sub-controller through the VM controller, on the fakes: NICs from a namespace
//! and user-mode NICs configured at start, hot-added and removed, unwound after failures, torn
//! down with the VM. Failure paths first.

use std::path::Path;
use std::time::Duration;

use uvm::devices::network::{NetworkController, NetworkState, NicState};
use uvm::devices::{Deadlines, DeviceError, Reach};
use uvm::seams::{DnsConfig, HostNetwork, NetworkConfig, NetworkMode, VmConfig};
use uvm::testing::{fake_endpoint, Call, Fakes};
use uvm::{ControllerError, HostError, StartStep, State};

const NS: &str = "/run/netns/test-a";
const NS2: &str = "/run/netns/test-b";

fn with_namespace(path: &str) -> VmConfig {
    VmConfig {
        network: NetworkConfig {
            mode: NetworkMode::Namespace { path: path.into() },
            dns: DnsConfig {
                nameservers: vec![[10, 200, 0, 1].into()],
                ..DnsConfig::default()
            },
        },
        ..VmConfig::default()
    }
}

/// A running VM created with the two-interface namespace `NS` (eth0 the primary).
async fn running_in_namespace() -> Fakes {
    let f = Fakes::new();
    f.backend
        .add_namespace(NS, vec![fake_endpoint("eth0", 1), fake_endpoint("eth1", 2)]);
    f.controller
        .create_vm(with_namespace(NS))
        .await
        .expect("create");
    f.controller.start_vm().await.expect("start");
    f.script.clear_log();
    f
}

fn network_calls(f: &Fakes) -> Vec<Call> {
    f.script
        .calls()
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Call::NamespaceEndpoints
                    | Call::AddNic
                    | Call::RemoveNic
                    | Call::ConfigureInterface
                    | Call::DeconfigureInterface
                    | Call::ConfigureDns
            )
        })
        .collect()
}

fn device_error(err: &ControllerError) -> &DeviceError {
    match err {
        ControllerError::Device { source, .. } => source,
        other => panic!("not a device error: {other:?}"),
    }
}

#[tokio::test]
async fn a_namespace_that_does_not_exist_fails_the_create_before_anything_runs() {
    let f = Fakes::new();
    let err = f
        .controller
        .create_vm(with_namespace("/run/netns/missing"))
        .await
        .expect_err("no such namespace");
    assert!(matches!(
        err,
        ControllerError::CreateFailed {
            source: HostError::InvalidInput {
                what: "network namespace",
                ..
            },
            ..
        }
    ));
    assert_eq!(f.controller.state(), State::NotCreated);
    assert!(!f.script.calls().contains(&Call::Start));
}

#[tokio::test]
async fn setup_configures_every_cold_nic_primary_first_then_the_resolver() {
    let f = Fakes::new();
    f.backend
        .add_namespace(NS, vec![fake_endpoint("eth0", 1), fake_endpoint("eth1", 2)]);
    f.controller
        .create_vm(with_namespace(NS))
        .await
        .expect("a test value");
    f.controller.start_vm().await.expect("a test value");
    assert_eq!(
        network_calls(&f),
        vec![
            Call::ConfigureInterface,
            Call::ConfigureInterface,
            Call::ConfigureDns
        ]
    );
    let net = f.controller.network();
    assert_eq!(net.state, NetworkState::Configured);
    let names: Vec<_> = net
        .nics
        .iter()
        .map(|n| n.nic.endpoint.name.as_str())
        .collect();
    assert_eq!(names, ["eth0", "eth1"]);
    assert!(net
        .nics
        .iter()
        .all(|n| n.state == NicState::Configured && n.cold));
    assert_eq!(f.guest.interfaces().len(), 2);
    assert_eq!(
        f.guest.dns().expect("a test value").nameservers,
        vec![std::net::IpAddr::from([10, 200, 0, 1])]
    );
}

#[tokio::test]
async fn a_failed_guest_configuration_at_setup_fails_the_start_and_leaves_nothing_plugged() {
    let f = Fakes::new();
    f.backend.add_namespace(NS, vec![fake_endpoint("eth0", 1)]);
    f.controller
        .create_vm(with_namespace(NS))
        .await
        .expect("a test value");
    f.script.fail_nth(Call::ConfigureInterface, 1);
    let err = f.controller.start_vm().await.expect_err("setup fails");
    assert!(matches!(
        err,
        ControllerError::StartFailed {
            step: StartStep::ConfigureNetwork,
            ..
        }
    ));
    f.controller.terminate_vm().await.expect("terminate");
    assert_eq!(f.controller.state(), State::Terminated);
    assert!(f.vm().nics().is_empty(), "the tap went with the VM");
}

/// A network controller of its own over a running fake VM's host and guest, with the VM's
/// two cold NICs booked (the VM's own network stays as it is).
fn standalone(f: &Fakes) -> NetworkController {
    let net = NetworkController::new(
        DnsConfig::default(),
        Deadlines {
            host: Duration::from_secs(5),
            guest: Duration::from_secs(5),
        },
    );
    net.add_cold(f.vm().cold_nics());
    net
}

fn reach() -> Reach {
    Reach {
        guest: true,
        host: true,
    }
}

#[tokio::test]
async fn setup_is_refused_in_any_state_but_not_configured() {
    let f = running_in_namespace().await;
    let net = standalone(&f);
    net.setup(&*f.vm(), &*f.guest).await.expect("first setup");
    let err = net.setup(&*f.vm(), &*f.guest).await.expect_err("second");
    assert!(matches!(
        err,
        DeviceError::WrongDeviceState {
            state: "Configured",
            ..
        }
    ));
    net.teardown(&*f.vm(), &*f.guest, &mut reach())
        .await
        .expect("a test value");
    let err = net.setup(&*f.vm(), &*f.guest).await.expect_err("torn down");
    assert!(matches!(
        err,
        DeviceError::WrongDeviceState {
            state: "TornDown",
            ..
        }
    ));
}

#[tokio::test]
async fn teardown_is_a_no_op_from_not_configured_and_from_torn_down() {
    let f = running_in_namespace().await;
    let net = standalone(&f);
    net.teardown(&*f.vm(), &*f.guest, &mut reach())
        .await
        .expect("a test value");
    assert_eq!(net.state(), NetworkState::NotConfigured);
    assert_eq!(network_calls(&f), vec![]);
    net.setup(&*f.vm(), &*f.guest).await.expect("a test value");
    net.teardown(&*f.vm(), &*f.guest, &mut reach())
        .await
        .expect("a test value");
    assert_eq!(net.state(), NetworkState::TornDown);
    f.script.clear_log();
    net.teardown(&*f.vm(), &*f.guest, &mut reach())
        .await
        .expect("a test value");
    assert_eq!(net.state(), NetworkState::TornDown);
    assert_eq!(network_calls(&f), vec![]);
}

#[tokio::test]
async fn a_partial_teardown_failure_attempts_the_rest_and_a_retry_from_invalid_finishes() {
    let f = running_in_namespace().await;
    let net = standalone(&f);
    net.setup(&*f.vm(), &*f.guest).await.expect("a test value");
    f.script.clear_log();
    f.script.fail_nth(Call::RemoveNic, 1);
    let err = net
        .teardown(&*f.vm(), &*f.guest, &mut reach())
        .await
        .expect_err("one NIC fails");
    assert!(matches!(err, DeviceError::Incomplete { failures: 1, .. }));
    assert_eq!(net.state(), NetworkState::Invalid);
    assert_eq!(
        f.script.count(Call::RemoveNic),
        2,
        "the second NIC was attempted"
    );
    let left: Vec<_> = net
        .snapshot()
        .nics
        .into_iter()
        .map(|n| (n.nic.id, n.state))
        .collect();
    assert_eq!(left, [("nic0".to_owned(), NicState::Invalid)]);
    assert!(f.vm().nics().contains_key("nic0"));
    assert!(!f.vm().nics().contains_key("nic1"));
    // Only a teardown is accepted from Invalid, and it can still finish.
    assert!(net.setup(&*f.vm(), &*f.guest).await.is_err());
    net.teardown(&*f.vm(), &*f.guest, &mut reach())
        .await
        .expect("retry");
    assert_eq!(net.state(), NetworkState::TornDown);
    assert!(f.vm().nics().is_empty());
}

#[tokio::test]
async fn a_failed_setup_leaves_invalid_and_teardown_still_reaches_torn_down() {
    let f = running_in_namespace().await;
    let net = standalone(&f);
    f.script.fail_nth(Call::ConfigureInterface, 4);
    net.setup(&*f.vm(), &*f.guest)
        .await
        .expect_err("second NIC fails");
    assert_eq!(net.state(), NetworkState::Invalid);
    net.teardown(&*f.vm(), &*f.guest, &mut reach())
        .await
        .expect("teardown");
    assert_eq!(net.state(), NetworkState::TornDown);
    assert!(f.vm().nics().is_empty());
}

#[tokio::test]
async fn nic_add_of_a_namespace_without_interfaces_is_refused_and_changes_nothing() {
    let f = running_in_namespace().await;
    f.backend.add_namespace(NS2, vec![]);
    let err = f
        .controller
        .add_nics(Path::new(NS2))
        .await
        .expect_err("no interface");
    assert!(matches!(
        device_error(&err),
        DeviceError::Host {
            source: HostError::InvalidInput { .. },
            ..
        }
    ));
    assert_eq!(network_calls(&f), vec![Call::NamespaceEndpoints]);
    assert_eq!(f.controller.network().nics.len(), 2);
}

#[tokio::test]
async fn a_guest_configuration_failure_unwinds_the_nic_on_the_host() {
    let f = running_in_namespace().await;
    f.backend.add_namespace(NS2, vec![fake_endpoint("eth0", 3)]);
    f.script.fail_nth(Call::ConfigureInterface, 3);
    let err = f
        .controller
        .add_nics(Path::new(NS2))
        .await
        .expect_err("configure fails");
    assert!(matches!(
        device_error(&err),
        DeviceError::Guest {
            step: "configure interface",
            ..
        }
    ));
    assert_eq!(
        network_calls(&f),
        vec![
            Call::NamespaceEndpoints,
            Call::AddNic,
            Call::ConfigureInterface,
            Call::RemoveNic
        ]
    );
    assert_eq!(f.vm().nics().len(), 2, "only the cold NICs are plugged");
    let net = f.controller.network();
    assert_eq!(net.state, NetworkState::Configured);
    assert_eq!(net.nics.len(), 2);
}

#[tokio::test]
async fn a_failed_hot_add_unwinds_every_nic_of_the_call() {
    let f = running_in_namespace().await;
    f.backend.add_namespace(
        NS2,
        vec![fake_endpoint("eth0", 3), fake_endpoint("eth1", 4)],
    );
    // The second NIC's host plug fails: the first, already configured, goes too.
    f.script.fail_nth(Call::AddNic, 2);
    f.controller
        .add_nics(Path::new(NS2))
        .await
        .expect_err("second plug fails");
    assert_eq!(f.vm().nics().len(), 2);
    assert_eq!(f.guest.interfaces().len(), 2);
    assert_eq!(f.controller.network().nics.len(), 2);
}

#[tokio::test]
async fn an_unwinding_that_fails_leaves_the_nic_invalid_and_a_remove_clears_it() {
    let f = running_in_namespace().await;
    f.backend.add_namespace(NS2, vec![fake_endpoint("eth0", 3)]);
    f.script.fail_nth(Call::ConfigureInterface, 3);
    f.script.fail_nth(Call::RemoveNic, 1);
    f.controller
        .add_nics(Path::new(NS2))
        .await
        .expect_err("fails");
    let nic = f
        .controller
        .network()
        .nics
        .into_iter()
        .find(|n| n.nic.endpoint.name == "eth0" && !n.cold)
        .expect("the NIC stays in the books");
    assert_eq!(nic.state, NicState::Invalid);
    assert!(f.vm().nics().contains_key(&nic.nic.id));
    f.controller.remove_nic(&nic.nic.id).await.expect("retry");
    assert!(!f.vm().nics().contains_key(&nic.nic.id));
    assert_eq!(f.controller.network().nics.len(), 2);
}

#[tokio::test]
async fn hot_add_then_remove_plugs_configures_and_takes_it_all_away() {
    let f = running_in_namespace().await;
    f.backend.add_namespace(NS2, vec![fake_endpoint("eth0", 3)]);
    let ids = f.controller.add_nics(Path::new(NS2)).await.expect("add");
    assert_eq!(ids, ["nic2"], "ids count on from the cold NICs");
    assert_eq!(f.guest.interfaces().len(), 3);
    f.controller.remove_nic("nic2").await.expect("remove");
    assert_eq!(
        network_calls(&f),
        vec![
            Call::NamespaceEndpoints,
            Call::AddNic,
            Call::ConfigureInterface,
            Call::DeconfigureInterface,
            Call::RemoveNic
        ]
    );
    assert_eq!(f.guest.interfaces().len(), 2);
    assert_eq!(f.vm().nics().len(), 2);
    // Ids are never reused.
    let again = f.controller.add_nics(Path::new(NS2)).await.expect("add");
    assert_eq!(again, ["nic3"]);
}

#[tokio::test]
async fn removing_an_unknown_nic_is_a_clear_error() {
    let f = running_in_namespace().await;
    let err = f.controller.remove_nic("nic9").await.expect_err("unknown");
    assert!(matches!(device_error(&err), DeviceError::UnknownNic { id } if id == "nic9"));
    assert_eq!(network_calls(&f), vec![]);
}

#[tokio::test]
async fn a_busy_guest_keeps_the_nic_configured_and_a_retry_finishes() {
    let f = running_in_namespace().await;
    f.script.fail_nth(Call::DeconfigureInterface, 1);
    f.controller
        .remove_nic("nic1")
        .await
        .expect_err("guest fails");
    let nic1 = |f: &Fakes| {
        f.controller
            .network()
            .nics
            .into_iter()
            .find(|n| n.nic.id == "nic1")
    };
    assert_eq!(nic1(&f).expect("a test value").state, NicState::Configured);
    f.controller.remove_nic("nic1").await.expect("retry");
    assert!(nic1(&f).is_none());
    assert!(!f.vm().nics().contains_key("nic1"));
}

#[tokio::test]
async fn nic_operations_are_refused_outside_running() {
    let f = Fakes::created().await;
    let err = f
        .controller
        .add_nics(Path::new(NS))
        .await
        .expect_err("created");
    assert!(matches!(err, ControllerError::WrongState { .. }));
    let f = Fakes::terminated().await;
    let err = f
        .controller
        .remove_nic("nic0")
        .await
        .expect_err("terminated");
    assert!(matches!(err, ControllerError::WrongState { .. }));
}

#[tokio::test]
async fn terminate_tears_down_every_nic_even_when_one_fails() {
    let f = running_in_namespace().await;
    f.script.fail_nth(Call::RemoveNic, 1);
    f.controller.terminate_vm().await.expect("terminate");
    assert_eq!(f.controller.state(), State::Terminated);
    // Both were attempted; the first failed, the second went on.
    assert_eq!(f.script.count(Call::RemoveNic), 2);
    assert_eq!(
        f.script.count(Call::DeconfigureInterface),
        2,
        "every NIC let go in the guest first"
    );
    assert!(f.vm().nics().is_empty(), "the release removed the rest");
}

#[tokio::test]
async fn a_vm_that_exits_by_itself_forgets_its_nics_without_calls() {
    let f = running_in_namespace().await;
    f.vm().exit(uvm::VmExit::clean());
    f.controller
        .wait(&tokio_util::sync::CancellationToken::new())
        .await
        .expect("wait");
    assert_eq!(f.controller.state(), State::Terminated);
    assert_eq!(network_calls(&f), vec![]);
    assert!(f.vm().nics().is_empty());
}

#[tokio::test]
async fn user_mode_networking_configures_one_nic_and_no_resolver_unless_given() {
    let f = Fakes::running_with(VmConfig {
        network: NetworkConfig {
            mode: NetworkMode::User { publish: vec![] },
            dns: DnsConfig::default(),
        },
        ..VmConfig::default()
    })
    .await;
    let net = f.controller.network();
    assert_eq!(net.nics.len(), 1);
    assert_eq!(net.nics[0].nic.endpoint.name, "user");
    assert_eq!(net.nics[0].state, NicState::Configured);
    assert!(f.guest.dns().is_none());
}

#[tokio::test]
async fn a_vm_without_a_network_is_configured_with_no_nics() {
    let f = Fakes::running().await;
    let net = f.controller.network();
    assert_eq!(net.state, NetworkState::Configured);
    assert!(net.nics.is_empty());
}

#[tokio::test]
async fn nic_rm_where_nics_cannot_be_unplugged_is_refused_before_the_guest_lets_go() {
    let f = running_in_namespace().await;
    f.vm().refuse_nic_hotplug();
    let err = f
        .controller
        .remove_nic("nic1")
        .await
        .expect_err("no hotplug");
    assert!(matches!(
        device_error(&err),
        DeviceError::Host {
            source: HostError::Unsupported { .. },
            ..
        }
    ));
    assert_eq!(network_calls(&f), vec![], "the guest kept its interface");
    let nic1 = f
        .controller
        .network()
        .nics
        .into_iter()
        .find(|n| n.nic.id == "nic1");
    assert_eq!(nic1.map(|n| n.state), Some(NicState::Configured));
}

#[tokio::test]
async fn a_hot_add_cut_short_is_removed_as_if_its_plug_had_happened() {
    let f = running_in_namespace().await;
    f.backend.add_namespace(NS2, vec![fake_endpoint("eth0", 3)]);
    let hold = f.script.hold(Call::AddNic);
    let controller = f.controller.clone();
    let add = tokio::spawn(async move { controller.add_nics(Path::new(NS2)).await });
    hold.entered().await;
    // The caller goes away (a client that disconnected): its future is dropped mid-plug.
    add.abort();
    let _ = add.await;
    hold.release();
    // The plug may complete on the host after all; the NIC is booked, and a remove asks the
    // host to take it away.
    let nic = f
        .controller
        .network()
        .nics
        .into_iter()
        .find(|n| !n.cold)
        .expect("the cut-short NIC is in the books");
    f.controller.remove_nic(&nic.nic.id).await.expect("remove");
    assert_eq!(f.script.count(Call::RemoveNic), 1, "the host was asked");
    assert!(f.controller.network().nics.iter().all(|n| n.cold));
}
