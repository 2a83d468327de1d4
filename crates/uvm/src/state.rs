//! The VM lifecycle state and the one function that decides what each operation may do in each state.
//!
//! ```text
//!                 create_vm ok            start_vm ok
//!   NotCreated ───────────────▶ Created ───────────────▶ Running
//!                                 │  │                      │
//!                                 │  │ start_vm fails       │ VM exits by itself,
//!                                 │  ▼                      │ or terminate_vm ok
//!                                 │ Invalid ◀───────────────┤ terminate_vm: release fails
//!                                 │  │ terminate_vm ok      ▼
//!                  terminate_vm ok└──┴────────────────▶ Terminated (terminal)
//! ```
//!
//! Only [`crate::Controller`] writes the state, and only through [`plan`].

use std::fmt;

/// Where a utility VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// No VM exists yet; `create_vm` has not succeeded.
    NotCreated,
    /// The VM is described and its resources reserved, but it has not been started.
    Created,
    /// The VM runs and its guest agent is connected.
    Running,
    /// The VM is gone and everything it held was released. Terminal.
    Terminated,
    /// A step failed in a way that may have left resources behind; only `terminate_vm` is useful.
    Invalid,
}

impl State {
    /// Every state, for tables and property tests.
    pub const ALL: [State; 5] = [
        State::NotCreated,
        State::Created,
        State::Running,
        State::Terminated,
        State::Invalid,
    ];
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::NotCreated => "NotCreated",
            State::Created => "Created",
            State::Running => "Running",
            State::Terminated => "Terminated",
            State::Invalid => "Invalid",
        })
    }
}

/// Everything that can happen to a VM: the controller's public operations plus the VM exiting by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// [`crate::Controller::create_vm`].
    Create,
    /// [`crate::Controller::start_vm`].
    Start,
    /// [`crate::Controller::terminate_vm`].
    Terminate,
    /// [`crate::Controller::wait`].
    Wait,
    /// [`crate::Controller::exec_into_host`].
    ExecIntoHost,
    /// [`crate::Controller::dump_stacks`].
    DumpStacks,
    /// [`crate::Controller::stats`].
    Stats,
    /// [`crate::Controller::guest_stats`].
    GuestStats,
    /// [`crate::Controller::update_cpu_group`].
    UpdateCpuGroup,
    /// [`crate::Controller::update_cpu_limits`].
    UpdateCpuLimits,
    /// [`crate::Controller::update_memory`].
    UpdateMemory,
    /// [`crate::Controller::update_cpus`].
    UpdateCpus,
    /// [`crate::Controller::update_policy_fragment`].
    UpdatePolicyFragment,
    /// [`crate::Controller::copy_in`].
    CopyIn,
    /// [`crate::Controller::copy_out`].
    CopyOut,
    /// [`crate::Controller::start_time`].
    StartTime,
    /// [`crate::Controller::exit_status`].
    ExitStatus,
    /// [`crate::Controller::add_disk`].
    AddDisk,
    /// [`crate::Controller::remove_disk`].
    RemoveDisk,
    /// [`crate::Controller::add_share`].
    AddShare,
    /// [`crate::Controller::remove_share`].
    RemoveShare,
    /// [`crate::Controller::add_nics`].
    AddNic,
    /// [`crate::Controller::remove_nic`].
    RemoveNic,
    /// [`crate::Controller::add_pci_device`].
    AddPciDevice,
    /// [`crate::Controller::remove_pci_device`].
    RemovePciDevice,
    /// Not a request: the background waiter saw the VM process end.
    VmExited,
}

impl Operation {
    /// Every operation, for tables and property tests.
    pub const ALL: [Operation; 26] = [
        Operation::Create,
        Operation::Start,
        Operation::Terminate,
        Operation::Wait,
        Operation::ExecIntoHost,
        Operation::DumpStacks,
        Operation::Stats,
        Operation::GuestStats,
        Operation::UpdateCpuGroup,
        Operation::UpdateCpuLimits,
        Operation::UpdateMemory,
        Operation::UpdateCpus,
        Operation::UpdatePolicyFragment,
        Operation::CopyIn,
        Operation::CopyOut,
        Operation::StartTime,
        Operation::ExitStatus,
        Operation::AddDisk,
        Operation::RemoveDisk,
        Operation::AddShare,
        Operation::RemoveShare,
        Operation::AddNic,
        Operation::RemoveNic,
        Operation::AddPciDevice,
        Operation::RemovePciDevice,
        Operation::VmExited,
    ];
}

impl Operation {
    /// The operation's name as callers know it (`start_vm`, `wait`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create_vm",
            Operation::Start => "start_vm",
            Operation::Terminate => "terminate_vm",
            Operation::Wait => "wait",
            Operation::ExecIntoHost => "exec_into_host",
            Operation::DumpStacks => "dump_stacks",
            Operation::Stats => "stats",
            Operation::GuestStats => "guest_stats",
            Operation::UpdateCpuGroup => "update_cpu_group",
            Operation::UpdateCpuLimits => "update_cpu_limits",
            Operation::UpdateMemory => "update_memory",
            Operation::UpdateCpus => "update_cpus",
            Operation::UpdatePolicyFragment => "update_policy_fragment",
            Operation::CopyIn => "copy_in",
            Operation::CopyOut => "copy_out",
            Operation::StartTime => "start_time",
            Operation::ExitStatus => "exit_status",
            Operation::AddDisk => "add_disk",
            Operation::RemoveDisk => "remove_disk",
            Operation::AddShare => "add_share",
            Operation::RemoveShare => "remove_share",
            Operation::AddNic => "add_nic",
            Operation::RemoveNic => "remove_nic",
            Operation::AddPciDevice => "add_pci_device",
            Operation::RemovePciDevice => "remove_pci_device",
            Operation::VmExited => "vm_exited",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operation may do from a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Not allowed in this state: the caller gets an error naming the state.
    Refuse,
    /// Allowed and does nothing (idempotent repeats such as `start_vm` on Running).
    NoOp,
    /// Allowed; the state becomes `on_success` or `on_failure` when the operation ends.
    Run {
        /// The state after the operation succeeded.
        on_success: State,
        /// The state after the operation failed.
        on_failure: State,
    },
}

impl Plan {
    const fn stay(state: State) -> Plan {
        Plan::Run {
            on_success: state,
            on_failure: state,
        }
    }
}

/// The state table: for (state, operation), whether it is allowed and what it leads to.
///
/// Every pair is spelled out — no wildcard state and no wildcard operation — so a new [`State`] or
/// [`Operation`] does not compile until each of its pairs is decided here.
pub const fn plan(state: State, op: Operation) -> Plan {
    use Operation as O;
    use State as S;
    match op {
        // → Created; a failed create leaves nothing behind.
        O::Create => match state {
            S::NotCreated => Plan::Run {
                on_success: S::Created,
                on_failure: S::NotCreated,
            },
            S::Created | S::Running | S::Terminated | S::Invalid => Plan::Refuse,
        },

        // Created → Running; any failure once started may have left a process or listener behind → Invalid.
        O::Start => match state {
            S::Created => Plan::Run {
                on_success: S::Running,
                on_failure: S::Invalid,
            },
            S::Running => Plan::NoOp,
            S::NotCreated | S::Terminated | S::Invalid => Plan::Refuse,
        },

        // → Terminated; only a failed release (the last step) leaves the VM Invalid.
        O::Terminate => match state {
            S::Created | S::Running | S::Invalid => Plan::Run {
                on_success: S::Terminated,
                on_failure: S::Invalid,
            },
            S::NotCreated | S::Terminated => Plan::NoOp,
        },

        O::Wait => match state {
            S::Created | S::Running | S::Terminated | S::Invalid => Plan::stay(state),
            S::NotCreated => Plan::Refuse,
        },

        O::ExecIntoHost
        | O::DumpStacks
        | O::Stats
        | O::GuestStats
        | O::UpdateCpuGroup
        | O::UpdateCpuLimits
        | O::UpdateMemory
        | O::UpdateCpus
        | O::UpdatePolicyFragment
        | O::CopyIn
        | O::CopyOut
        | O::AddDisk
        | O::RemoveDisk
        | O::AddShare
        | O::RemoveShare
        | O::AddNic
        | O::RemoveNic
        | O::AddPciDevice
        | O::RemovePciDevice => match state {
            S::Running => Plan::stay(S::Running),
            S::NotCreated | S::Created | S::Terminated | S::Invalid => Plan::Refuse,
        },

        O::StartTime => match state {
            S::Running | S::Terminated => Plan::stay(state),
            S::NotCreated | S::Created | S::Invalid => Plan::Refuse,
        },

        O::ExitStatus => match state {
            S::Terminated => Plan::stay(S::Terminated),
            S::NotCreated | S::Created | S::Running | S::Invalid => Plan::Refuse,
        },

        O::VmExited => match state {
            // Running → Terminated when the VM ends by itself and the waiter released it; a
            // failed release leaves it Invalid, as in terminate_vm.
            S::Running => Plan::Run {
                on_success: S::Terminated,
                on_failure: S::Invalid,
            },
            // During start the start itself fails (→ Invalid) and cleans up through terminate;
            // an Invalid VM stays Invalid until a terminate releases what it holds: an exited
            // process does not mean released resources. In every state the exit is recorded;
            // only Running moves.
            S::NotCreated | S::Created | S::Terminated | S::Invalid => Plan::NoOp,
        },
    }
}

/// Why the VM is Invalid or Terminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `start_vm` failed at `step`.
    StartFailed {
        /// The step that failed.
        step: StartStep,
        /// The failure and its causes, for people.
        message: String,
    },
    /// The last step of `terminate_vm`, releasing the VM, failed.
    ReleaseFailed {
        /// The failure and its causes, for people.
        message: String,
    },
    /// `terminate_vm` ended the VM.
    TerminateRequested,
    /// `terminate_vm` ended the VM while a `start_vm` was in flight; the start was cancelled.
    StartCancelled,
    /// The VM ended by itself.
    Exited(VmExit),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::StartFailed { step, message } => write!(f, "start failed at {step}: {message}"),
            Reason::ReleaseFailed { message } => write!(f, "release failed: {message}"),
            Reason::TerminateRequested => f.write_str("terminated on request"),
            Reason::StartCancelled => f.write_str("start cancelled by terminate"),
            Reason::Exited(exit) => write!(f, "VM exited: {exit}"),
        }
    }
}

/// The steps of `start_vm`, in order; a failure names the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartStep {
    /// Listening for the guest's announcement, before the VM exists.
    PrepareGuestListener,
    /// Starting the VM's processes.
    StartVm,
    /// Waiting for the guest agent and shaking hands with it.
    ConnectGuest,
    /// Handing the configured security policy to the guest.
    ApplySecurityPolicy,
    /// Configuring the NICs given at create and the resolver in the guest.
    ConfigureNetwork,
    /// Mounting the disks and shares given at create in the guest.
    MountDevices,
}

impl fmt::Display for StartStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StartStep::PrepareGuestListener => "prepare guest listener",
            StartStep::StartVm => "start VM",
            StartStep::ConnectGuest => "connect guest",
            StartStep::ApplySecurityPolicy => "apply security policy",
            StartStep::ConfigureNetwork => "configure network",
            StartStep::MountDevices => "mount devices",
        })
    }
}

/// How the VM process ended, as the backend saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Exit code of the VM process, when it exited normally.
    pub code: Option<i32>,
    /// Signal that killed the VM process, when it was killed.
    pub signal: Option<i32>,
    /// The backend's reason, e.g. QEMU's shutdown reason (`guest-shutdown`, `host-qmp-quit`).
    pub reason: Option<String>,
}

impl VmExit {
    /// A clean exit with code 0 and no reason.
    pub fn clean() -> VmExit {
        VmExit {
            code: Some(0),
            signal: None,
            reason: None,
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (_, Some(sig)) => write!(f, "killed by signal {sig}")?,
            (Some(code), None) => write!(f, "exit code {code}")?,
            (None, None) => f.write_str("unknown status")?,
        }
        if let Some(reason) = &self.reason {
            write!(f, " ({reason})")?;
        }
        Ok(())
    }
}
