//! The network, NIC and vPCI state tables walked pair by pair against literal tables written
//! out independently of the match arms in `uvm::devices::{network, vpci}`.

use uvm::devices::network::{
    network_step, nic_step, NetworkCall, NetworkEvent, NetworkState, NicCall, NicEvent, NicState,
};
use uvm::devices::vpci::{pci_step, PciCall, PciEvent, PciState};
use uvm::devices::Step;

fn call<S, C>(call: C, on_success: S, on_failure: S) -> Step<S, C> {
    Step::Call {
        call,
        on_success,
        on_failure,
    }
}

fn network_column(state: NetworkState) -> usize {
    match state {
        NetworkState::NotConfigured => 0,
        NetworkState::Configured => 1,
        NetworkState::Invalid => 2,
        NetworkState::TornDown => 3,
    }
}

/// Cells: [NotConfigured, Configured, Invalid, TornDown].
fn network_expected(event: NetworkEvent) -> [Step<NetworkState, NetworkCall>; 4] {
    use NetworkState as S;
    const R: Step<NetworkState, NetworkCall> = Step::Refuse;
    const N: Step<NetworkState, NetworkCall> = Step::Stay;
    match event {
        NetworkEvent::Setup => [call(NetworkCall::Setup, S::Configured, S::Invalid), R, R, R],
        NetworkEvent::AddNics => [
            R,
            call(NetworkCall::AddNics, S::Configured, S::Configured),
            R,
            R,
        ],
        NetworkEvent::RemoveNic => [
            R,
            call(NetworkCall::RemoveNic, S::Configured, S::Configured),
            R,
            R,
        ],
        NetworkEvent::Teardown => [
            N,
            call(NetworkCall::Teardown, S::TornDown, S::Invalid),
            call(NetworkCall::Teardown, S::TornDown, S::Invalid),
            N,
        ],
    }
}

fn nic_column(state: NicState) -> usize {
    match state {
        NicState::Reserved => 0,
        NicState::Added => 1,
        NicState::Configured => 2,
        NicState::Invalid => 3,
        NicState::Removed => 4,
    }
}

/// Cells: [Reserved, Added, Configured, Invalid, Removed].
fn nic_expected(event: NicEvent) -> [Step<NicState, NicCall>; 5] {
    use NicState as S;
    const R: Step<NicState, NicCall> = Step::Refuse;
    const N: Step<NicState, NicCall> = Step::Stay;
    let gone = Step::Become(S::Removed);
    let host_remove = call(NicCall::HostRemove, S::Removed, S::Invalid);
    match event {
        NicEvent::Add => [call(NicCall::HostAdd, S::Added, S::Removed), N, N, R, R],
        NicEvent::Configure => [
            R,
            call(NicCall::GuestConfigure, S::Configured, S::Added),
            N,
            R,
            R,
        ],
        NicEvent::Remove => [
            gone,
            host_remove,
            call(NicCall::GuestDeconfigure, S::Added, S::Configured),
            host_remove,
            N,
        ],
        NicEvent::Teardown => [
            gone,
            host_remove,
            call(NicCall::GuestDeconfigure, S::Added, S::Added),
            host_remove,
            N,
        ],
    }
}

fn pci_column(state: PciState) -> usize {
    match state {
        PciState::Reserved => 0,
        PciState::HostAssigned => 1,
        PciState::Assigned => 2,
        PciState::AssignedInvalid => 3,
        PciState::Removed => 4,
    }
}

/// Cells: [Reserved, HostAssigned, Assigned, AssignedInvalid, Removed].
fn pci_expected(event: PciEvent) -> [Step<PciState, PciCall>; 5] {
    use PciState as S;
    const R: Step<PciState, PciCall> = Step::Refuse;
    const N: Step<PciState, PciCall> = Step::Stay;
    let remove = call(PciCall::HostRemove, S::Removed, S::AssignedInvalid);
    match event {
        PciEvent::Add => [
            call(PciCall::HostAdd, S::HostAssigned, S::Removed),
            call(PciCall::GuestWait, S::Assigned, S::AssignedInvalid),
            N,
            R,
            R,
        ],
        PciEvent::Remove | PciEvent::Teardown => {
            [Step::Become(S::Removed), remove, remove, remove, N]
        }
    }
}

#[test]
fn every_network_state_event_pair_matches_the_table() {
    let mut checked = 0;
    for state in NetworkState::ALL {
        for event in NetworkEvent::ALL {
            assert_eq!(
                network_step(state, event),
                network_expected(event)[network_column(state)],
                "({state}, {})",
                event.as_str()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, NetworkState::ALL.len() * NetworkEvent::ALL.len());
}

#[test]
fn every_nic_state_event_pair_matches_the_table() {
    let mut checked = 0;
    for state in NicState::ALL {
        for event in NicEvent::ALL {
            assert_eq!(
                nic_step(state, event),
                nic_expected(event)[nic_column(state)],
                "({state}, {})",
                event.as_str()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, NicState::ALL.len() * NicEvent::ALL.len());
}

#[test]
fn every_pci_state_event_pair_matches_the_table() {
    let mut checked = 0;
    for state in PciState::ALL {
        for event in PciEvent::ALL {
            assert_eq!(
                pci_step(state, event),
                pci_expected(event)[pci_column(state)],
                "({state}, {})",
                event.as_str()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, PciState::ALL.len() * PciEvent::ALL.len());
}

#[test]
fn a_nic_teardown_that_succeeds_always_ends_removed() {
    for start in NicState::ALL {
        let mut state = start;
        for _ in 0..6 {
            match nic_step(state, NicEvent::Teardown) {
                Step::Stay | Step::Refuse => break,
                Step::Become(to) => state = to,
                Step::Call { on_success, .. } => state = on_success,
            }
        }
        assert_eq!(state, NicState::Removed, "from {start}");
    }
}
