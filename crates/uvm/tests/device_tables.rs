//! The device state tables — disk, share and mount — walked pair by pair against literal tables
//! written out independently of the match arms in `uvm::devices`.

use uvm::devices::scsi::{disk_step, DiskCall, DiskEvent, DiskState};
use uvm::devices::shares::{share_step, ShareCall, ShareEvent, ShareState};
use uvm::devices::{mount_step, MountCall, MountEvent, MountState, Step};

fn call<S, C>(call: C, on_success: S, on_failure: S) -> Step<S, C> {
    Step::Call {
        call,
        on_success,
        on_failure,
    }
}

/// Column of each disk state (exhaustive: a new state needs a column).
fn disk_column(state: DiskState) -> usize {
    match state {
        DiskState::Reserved => 0,
        DiskState::Attached => 1,
        DiskState::Ejected => 2,
        DiskState::Detached => 3,
    }
}

/// Cells: [Reserved, Attached, Ejected, Detached].
fn disk_expected(event: DiskEvent) -> [Step<DiskState, DiskCall>; 4] {
    use DiskState as S;
    const R: Step<DiskState, DiskCall> = Step::Refuse;
    const N: Step<DiskState, DiskCall> = Step::Stay;
    match event {
        DiskEvent::Reserve => [N, N, R, R],
        DiskEvent::Attach => [call(DiskCall::Attach, S::Attached, S::Detached), N, R, R],
        DiskEvent::Remove => [
            Step::Become(S::Detached),
            call(DiskCall::Eject, S::Ejected, S::Attached),
            call(DiskCall::Detach, S::Detached, S::Ejected),
            N,
        ],
        DiskEvent::Teardown => [
            Step::Become(S::Detached),
            call(DiskCall::Eject, S::Ejected, S::Ejected),
            call(DiskCall::Detach, S::Detached, S::Detached),
            N,
        ],
    }
}

fn share_column(state: ShareState) -> usize {
    match state {
        ShareState::Reserved => 0,
        ShareState::Added => 1,
        ShareState::Invalid => 2,
        ShareState::Removed => 3,
    }
}

/// Cells: [Reserved, Added, Invalid, Removed].
fn share_expected(event: ShareEvent) -> [Step<ShareState, ShareCall>; 4] {
    use ShareState as S;
    const R: Step<ShareState, ShareCall> = Step::Refuse;
    const N: Step<ShareState, ShareCall> = Step::Stay;
    let gone = Step::Become(S::Removed);
    match event {
        ShareEvent::Reserve => [N, N, R, R],
        ShareEvent::Add => [call(ShareCall::Add, S::Added, S::Invalid), N, R, R],
        ShareEvent::Remove => [gone, call(ShareCall::Remove, S::Removed, S::Added), gone, N],
        ShareEvent::Teardown => [
            gone,
            call(ShareCall::Remove, S::Removed, S::Removed),
            gone,
            N,
        ],
    }
}

fn mount_column(state: MountState) -> usize {
    match state {
        MountState::Reserved => 0,
        MountState::Mounted => 1,
        MountState::Unmounted => 2,
    }
}

/// Cells: [Reserved, Mounted, Unmounted].
fn mount_expected(event: MountEvent) -> [Step<MountState, MountCall>; 3] {
    use MountState as S;
    const R: Step<MountState, MountCall> = Step::Refuse;
    const N: Step<MountState, MountCall> = Step::Stay;
    let gone = Step::Become(S::Unmounted);
    match event {
        MountEvent::Reserve => [N, N, R],
        MountEvent::Mount => [call(MountCall::Mount, S::Mounted, S::Unmounted), N, R],
        MountEvent::Unmount => [gone, call(MountCall::Unmount, S::Unmounted, S::Mounted), N],
        MountEvent::Teardown => [
            gone,
            call(MountCall::Unmount, S::Unmounted, S::Unmounted),
            N,
        ],
    }
}

#[test]
fn every_disk_state_event_pair_matches_the_table() {
    let mut checked = 0;
    for state in DiskState::ALL {
        for event in DiskEvent::ALL {
            assert_eq!(
                disk_step(state, event),
                disk_expected(event)[disk_column(state)],
                "({state}, {})",
                event.as_str()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, DiskState::ALL.len() * DiskEvent::ALL.len());
}

#[test]
fn every_share_state_event_pair_matches_the_table() {
    let mut checked = 0;
    for state in ShareState::ALL {
        for event in ShareEvent::ALL {
            assert_eq!(
                share_step(state, event),
                share_expected(event)[share_column(state)],
                "({state}, {})",
                event.as_str()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, ShareState::ALL.len() * ShareEvent::ALL.len());
}

#[test]
fn every_mount_state_event_pair_matches_the_table() {
    let mut checked = 0;
    for state in MountState::ALL {
        for event in MountEvent::ALL {
            assert_eq!(
                mount_step(state, event),
                mount_expected(event)[mount_column(state)],
                "({state}, {})",
                event.as_str()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, MountState::ALL.len() * MountEvent::ALL.len());
}

#[test]
fn teardown_ends_every_machine_in_its_terminal_state() {
    // Following Teardown steps from any state, success or failure, always ends terminal: a
    // terminating VM never leaves a device half-way in the books.
    fn walk<S: Copy + PartialEq + std::fmt::Debug, C>(
        start: S,
        step: impl Fn(S) -> Step<S, C>,
        terminal: S,
        fail: bool,
    ) {
        let mut state = start;
        for _ in 0..8 {
            match step(state) {
                Step::Stay => break,
                Step::Refuse => panic!("teardown refused in {state:?}"),
                Step::Become(to) => state = to,
                Step::Call {
                    on_success,
                    on_failure,
                    ..
                } => state = if fail { on_failure } else { on_success },
            }
        }
        assert_eq!(state, terminal, "from {start:?}, failing: {fail}");
    }
    for fail in [false, true] {
        for s in DiskState::ALL {
            walk(
                s,
                |s| disk_step(s, DiskEvent::Teardown),
                DiskState::Detached,
                fail,
            );
        }
        for s in ShareState::ALL {
            walk(
                s,
                |s| share_step(s, ShareEvent::Teardown),
                ShareState::Removed,
                fail,
            );
        }
        for s in MountState::ALL {
            walk(
                s,
                |s| mount_step(s, MountEvent::Teardown),
                MountState::Unmounted,
                fail,
            );
        }
    }
}

#[test]
fn a_failed_removal_step_stays_where_it_was_so_a_retry_resumes_there() {
    for state in DiskState::ALL {
        if let Step::Call { on_failure, .. } = disk_step(state, DiskEvent::Remove) {
            assert_eq!(on_failure, state, "disk {state}");
        }
    }
    for state in ShareState::ALL {
        if let Step::Call { on_failure, .. } = share_step(state, ShareEvent::Remove) {
            assert_eq!(on_failure, state, "share {state}");
        }
    }
    for state in MountState::ALL {
        if let Step::Call { on_failure, .. } = mount_step(state, MountEvent::Unmount) {
            assert_eq!(on_failure, state, "mount {state}");
        }
    }
}
