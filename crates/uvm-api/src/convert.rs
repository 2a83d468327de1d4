//! Conversions between the controller's types (`uvm`) and the API's messages (`uvm.v1`).
//!
//! Towards the API they are `From` and cannot fail (durations saturate at protobuf's range, which
//! no VM reaches). From the API the few that the supervisor needs validate what a client sent and
//! fail with [`ApiError::InvalidRequest`]. Every enum match is exhaustive and without a wildcard.

use std::time::{Duration, SystemTime};

use uvm::seams::{CpuLimits, GuestInfo, GuestStats, HostStats, LinkHealth, TerminalSize, VmConfig};
use uvm::{ExitStatus, Operation, Reason, StartStep, State, Status, Transition, VmExit};

use crate::status::ApiError;
use crate::v1;

mod devices;
mod network;

pub use devices::{disk_request, share_request};
pub use network::{nic_netns, pci_address, route_text};

/// A protobuf duration for `d`, saturating at protobuf's maximum (about 10,000 years).
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: 315_576_000_000,
        nanos: 999_999_999,
    })
}

/// A protobuf timestamp for `t`.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

impl From<State> for v1::State {
    fn from(state: State) -> v1::State {
        match state {
            State::NotCreated => v1::State::NotCreated,
            State::Created => v1::State::Created,
            State::Running => v1::State::Running,
            State::Terminated => v1::State::Terminated,
            State::Invalid => v1::State::Invalid,
        }
    }
}

impl From<LinkHealth> for v1::LinkHealth {
    fn from(link: LinkHealth) -> v1::LinkHealth {
        match link {
            LinkHealth::NotConnected => v1::LinkHealth::NotConnected,
            LinkHealth::Connected => v1::LinkHealth::Connected,
            LinkHealth::Lost => v1::LinkHealth::Lost,
            LinkHealth::Closed => v1::LinkHealth::Closed,
        }
    }
}

impl From<StartStep> for v1::StartStep {
    fn from(step: StartStep) -> v1::StartStep {
        match step {
            StartStep::PrepareGuestListener => v1::StartStep::PrepareGuestListener,
            StartStep::StartVm => v1::StartStep::StartVm,
            StartStep::ConnectGuest => v1::StartStep::ConnectGuest,
            StartStep::ApplySecurityPolicy => v1::StartStep::ApplySecurityPolicy,
            StartStep::MountDevices => v1::StartStep::MountDevices,
            StartStep::ConfigureNetwork => v1::StartStep::ConfigureNetwork,
        }
    }
}

impl From<Operation> for v1::Operation {
    fn from(operation: Operation) -> v1::Operation {
        match operation {
            Operation::Create => v1::Operation::Create,
            Operation::Start => v1::Operation::Start,
            Operation::Terminate => v1::Operation::Terminate,
            Operation::Wait => v1::Operation::Wait,
            Operation::ExecIntoHost => v1::Operation::Exec,
            Operation::DumpStacks => v1::Operation::DumpStacks,
            Operation::Stats => v1::Operation::Stats,
            Operation::GuestStats => v1::Operation::GuestStats,
            Operation::UpdateCpuGroup => v1::Operation::UpdateCpuGroup,
            Operation::UpdateCpuLimits => v1::Operation::UpdateCpuLimits,
            Operation::UpdateMemory => v1::Operation::UpdateMemory,
            Operation::UpdateCpus => v1::Operation::UpdateCpus,
            Operation::UpdatePolicyFragment => v1::Operation::UpdatePolicyFragment,
            Operation::CopyIn => v1::Operation::CopyIn,
            Operation::CopyOut => v1::Operation::CopyOut,
            Operation::StartTime => v1::Operation::StartTime,
            Operation::ExitStatus => v1::Operation::ExitStatus,
            Operation::AddDisk => v1::Operation::AddDisk,
            Operation::RemoveDisk => v1::Operation::RemoveDisk,
            Operation::AddShare => v1::Operation::AddShare,
            Operation::RemoveShare => v1::Operation::RemoveShare,
            Operation::AddNic => v1::Operation::AddNic,
            Operation::RemoveNic => v1::Operation::RemoveNic,
            Operation::AddPciDevice => v1::Operation::AddPciDevice,
            Operation::RemovePciDevice => v1::Operation::RemovePciDevice,
            Operation::VmExited => v1::Operation::VmExited,
        }
    }
}

impl From<VmExit> for v1::VmExit {
    fn from(exit: VmExit) -> v1::VmExit {
        v1::VmExit {
            code: exit.code,
            signal: exit.signal,
            reason: exit.reason.unwrap_or_default(),
        }
    }
}

impl From<Reason> for v1::Reason {
    fn from(reason: Reason) -> v1::Reason {
        let description = reason.to_string();
        let mut out = v1::Reason {
            description,
            ..v1::Reason::default()
        };
        match reason {
            Reason::StartFailed { step, message } => {
                out.set_kind(v1::ReasonKind::StartFailed);
                out.set_start_step(step.into());
                out.error = message;
            }
            Reason::ReleaseFailed { message } => {
                out.set_kind(v1::ReasonKind::ReleaseFailed);
                out.error = message;
            }
            Reason::TerminateRequested => out.set_kind(v1::ReasonKind::TerminateRequested),
            Reason::StartCancelled => out.set_kind(v1::ReasonKind::StartCancelled),
            Reason::Exited(exit) => {
                out.set_kind(v1::ReasonKind::Exited);
                out.exit = Some(exit.into());
            }
        }
        out
    }
}

impl From<Status> for v1::VmStatus {
    fn from(status: Status) -> v1::VmStatus {
        let mut out = v1::VmStatus {
            reason: status.reason.map(Into::into),
            ..v1::VmStatus::default()
        };
        out.set_state(status.state.into());
        out.set_link(status.link.into());
        out
    }
}

/// The controller's transitions carry neither a reason nor a time: both stay unset here, for the
/// supervisor to fill in when it records them itself.
impl From<Transition> for v1::Transition {
    fn from(t: Transition) -> v1::Transition {
        let mut out = v1::Transition::default();
        out.set_from_state(t.from.into());
        out.set_to_state(t.to.into());
        out.set_operation(t.operation.into());
        out
    }
}

impl From<ExitStatus> for v1::ExitStatus {
    fn from(exit: ExitStatus) -> v1::ExitStatus {
        v1::ExitStatus {
            stopped_at: Some(timestamp(exit.stopped_at)),
            reason: Some(exit.reason.into()),
            exit: exit.exit.map(Into::into),
        }
    }
}

impl From<HostStats> for v1::HostStats {
    fn from(stats: HostStats) -> v1::HostStats {
        v1::HostStats {
            cpu_time: Some(duration(stats.cpu_time)),
            rss_bytes: stats.rss_bytes,
            memory_current_bytes: stats.memory_current_bytes,
            memory_peak_bytes: stats.memory_peak_bytes,
            cpu_throttling: stats.cpu_throttling.map(|t| v1::CpuThrottling {
                periods: t.periods,
                throttled_periods: t.throttled_periods,
                throttled_time: Some(duration(t.throttled_time)),
            }),
        }
    }
}

impl From<GuestStats> for v1::GuestStats {
    fn from(stats: GuestStats) -> v1::GuestStats {
        v1::GuestStats {
            mem_total_bytes: stats.mem_total_bytes,
            mem_available_bytes: stats.mem_available_bytes,
            cpu_user: Some(duration(stats.cpu_user)),
            cpu_system: Some(duration(stats.cpu_system)),
            cpu_idle: Some(duration(stats.cpu_idle)),
            uptime: Some(duration(stats.uptime)),
            processes: stats.processes,
        }
    }
}

impl From<&GuestInfo> for v1::GuestInfo {
    fn from(info: &GuestInfo) -> v1::GuestInfo {
        v1::GuestInfo {
            protocol_version: info.protocol_version,
            agent_version: info.agent_version.clone(),
            capabilities: info.capabilities.names.clone(),
        }
    }
}

/// The guest's own boot marks; `start_total` is the supervisor's to measure and stays unset.
impl From<&GuestInfo> for v1::BootTimings {
    fn from(info: &GuestInfo) -> v1::BootTimings {
        v1::BootTimings {
            kernel_to_init: Some(duration(info.kernel_to_init)),
            init_to_ready: Some(duration(info.init_to_ready)),
            start_total: None,
        }
    }
}

/// The controller's part of the configuration; `backend_options` is the supervisor's to fill in.
impl From<VmConfig> for v1::VmConfig {
    fn from(config: VmConfig) -> v1::VmConfig {
        let mut out = v1::VmConfig {
            memory_mib: config.memory_mib,
            max_memory_mib: config.max_memory_mib,
            cpus: config.cpus,
            max_cpus: config.max_cpus,
            security_policy: config.security_policy.map(|p| p.0),
            backend_options: Default::default(),
            disks: config.disks.iter().map(Into::into).collect(),
            shares: config.shares.iter().map(Into::into).collect(),
            ..v1::VmConfig::default()
        };
        set_network(&mut out, &config.network);
        out
    }
}

/// Fills `config`'s network fields from `network`.
pub fn set_network(config: &mut v1::VmConfig, network: &uvm::seams::NetworkConfig) {
    use uvm::seams::NetworkMode;
    let (mode, netns, publish) = match &network.mode {
        NetworkMode::None => ("none", String::new(), Vec::new()),
        NetworkMode::User { publish } => (
            "user",
            String::new(),
            publish.iter().map(ToString::to_string).collect(),
        ),
        NetworkMode::Namespace { path } => ("netns", path.display().to_string(), Vec::new()),
    };
    config.network_mode = mode.to_owned();
    config.netns = netns;
    config.publish = publish;
    config.nameservers = network
        .dns
        .nameservers
        .iter()
        .map(ToString::to_string)
        .collect();
}

impl From<&uvm::ResourceSettings> for v1::Resources {
    fn from(r: &uvm::ResourceSettings) -> Self {
        v1::Resources {
            memory_mib: r.memory_bytes >> 20,
            cpus: r.cpus,
            cpu_limit_per_10000: r.cpu_limits.limit,
            cpu_weight: r.cpu_limits.weight,
            cpu_group: r.cpu_group.clone().unwrap_or_default(),
        }
    }
}

impl From<TerminalSize> for v1::TerminalSize {
    fn from(size: TerminalSize) -> v1::TerminalSize {
        v1::TerminalSize {
            rows: size.rows.into(),
            cols: size.cols.into(),
        }
    }
}

/// A client's terminal size: both sides from 1 to 65535.
impl TryFrom<v1::TerminalSize> for TerminalSize {
    type Error = ApiError;

    fn try_from(size: v1::TerminalSize) -> Result<TerminalSize, ApiError> {
        let side = |n: u32| u16::try_from(n).ok().filter(|&n| n > 0);
        match (side(size.rows), side(size.cols)) {
            (Some(rows), Some(cols)) => Ok(TerminalSize { rows, cols }),
            _ => Err(ApiError::InvalidRequest {
                what: "terminal size",
                message: format!(
                    "{}x{} (rows x columns) is out of range: each must be 1 to 65535",
                    size.rows, size.cols
                ),
            }),
        }
    }
}

/// A client's CPU limits, unset fields left as they are.
impl From<&v1::UpdateCpuLimitsRequest> for CpuLimits {
    fn from(request: &v1::UpdateCpuLimitsRequest) -> CpuLimits {
        CpuLimits {
            limit: request.limit_per_10000,
            weight: request.weight,
        }
    }
}

/// The grace period of a Terminate: `None` (unset) means the supervisor's default; negative or
/// malformed durations are refused.
pub fn grace_period(grace: Option<&prost_types::Duration>) -> Result<Option<Duration>, ApiError> {
    let Some(grace) = grace else {
        return Ok(None);
    };
    Duration::try_from(*grace)
        .map(Some)
        .map_err(|e| ApiError::InvalidRequest {
            what: "grace period",
            message: format!("{}s {}ns: {e}", grace.seconds, grace.nanos),
        })
}

#[cfg(test)]
mod tests {
    use uvm::seams::{Capabilities, SecurityPolicy};

    use super::*;

    #[test]
    fn every_state_maps_to_its_own_value() {
        let mapped: Vec<v1::State> = State::ALL.into_iter().map(Into::into).collect();
        assert_eq!(
            mapped,
            [
                v1::State::NotCreated,
                v1::State::Created,
                v1::State::Running,
                v1::State::Terminated,
                v1::State::Invalid,
            ]
        );
        for state in State::ALL {
            // The proto names spell the controller's names in SCREAMING_CASE.
            let proto = v1::State::from(state).as_str_name().replace('_', "");
            assert_eq!(proto, format!("STATE{}", state.to_string().to_uppercase()));
        }
    }

    #[test]
    fn every_operation_maps_to_a_distinct_specified_value() {
        let mut seen = std::collections::HashSet::new();
        for op in Operation::ALL {
            let proto = v1::Operation::from(op);
            assert_ne!(proto, v1::Operation::Unspecified);
            assert!(seen.insert(proto), "{op} maps to a value already used");
        }
        assert_eq!(
            v1::Operation::from(Operation::ExecIntoHost),
            v1::Operation::Exec
        );
    }

    #[test]
    fn every_link_health_and_start_step_maps_to_its_own_value() {
        let links = [
            (LinkHealth::NotConnected, v1::LinkHealth::NotConnected),
            (LinkHealth::Connected, v1::LinkHealth::Connected),
            (LinkHealth::Lost, v1::LinkHealth::Lost),
            (LinkHealth::Closed, v1::LinkHealth::Closed),
        ];
        for (link, proto) in links {
            assert_eq!(v1::LinkHealth::from(link), proto);
        }
        let steps = [
            (
                StartStep::PrepareGuestListener,
                v1::StartStep::PrepareGuestListener,
            ),
            (StartStep::StartVm, v1::StartStep::StartVm),
            (StartStep::ConnectGuest, v1::StartStep::ConnectGuest),
            (
                StartStep::ApplySecurityPolicy,
                v1::StartStep::ApplySecurityPolicy,
            ),
        ];
        for (step, proto) in steps {
            assert_eq!(v1::StartStep::from(step), proto);
        }
    }

    #[test]
    fn each_reason_carries_its_kind_and_details() {
        let failed = v1::Reason::from(Reason::StartFailed {
            step: StartStep::ConnectGuest,
            message: "timed out".into(),
        });
        assert_eq!(failed.kind(), v1::ReasonKind::StartFailed);
        assert_eq!(failed.start_step(), v1::StartStep::ConnectGuest);
        assert_eq!(failed.error, "timed out");
        assert_eq!(
            failed.description,
            "start failed at connect guest: timed out"
        );
        assert_eq!(failed.exit, None);

        let release = v1::Reason::from(Reason::ReleaseFailed {
            message: "busy".into(),
        });
        assert_eq!(release.kind(), v1::ReasonKind::ReleaseFailed);
        assert_eq!(release.error, "busy");
        assert_eq!(release.start_step(), v1::StartStep::Unspecified);

        let terminated = v1::Reason::from(Reason::TerminateRequested);
        assert_eq!(terminated.kind(), v1::ReasonKind::TerminateRequested);
        assert_eq!(terminated.description, "terminated on request");
        assert!(terminated.error.is_empty());

        let cancelled = v1::Reason::from(Reason::StartCancelled);
        assert_eq!(cancelled.kind(), v1::ReasonKind::StartCancelled);

        let exited = v1::Reason::from(Reason::Exited(VmExit {
            code: None,
            signal: Some(9),
            reason: Some("host-signal".into()),
        }));
        assert_eq!(exited.kind(), v1::ReasonKind::Exited);
        assert_eq!(
            exited.exit,
            Some(v1::VmExit {
                code: None,
                signal: Some(9),
                reason: "host-signal".into(),
            })
        );
        assert_eq!(
            exited.description,
            "VM exited: killed by signal 9 (host-signal)"
        );
    }

    #[test]
    fn a_status_becomes_a_vm_status() {
        let status = v1::VmStatus::from(Status {
            state: State::Terminated,
            reason: Some(Reason::TerminateRequested),
            link: LinkHealth::Closed,
        });
        assert_eq!(status.state(), v1::State::Terminated);
        assert_eq!(status.link(), v1::LinkHealth::Closed);
        assert_eq!(
            status.reason.map(|r| r.kind()),
            Some(v1::ReasonKind::TerminateRequested)
        );

        let running = v1::VmStatus::from(Status {
            state: State::Running,
            reason: None,
            link: LinkHealth::Connected,
        });
        assert_eq!(running.reason, None);
    }

    #[test]
    fn a_transition_keeps_its_states_and_operation() {
        let t = v1::Transition::from(Transition {
            from: State::Created,
            to: State::Running,
            operation: Operation::Start,
        });
        assert_eq!(t.from_state(), v1::State::Created);
        assert_eq!(t.to_state(), v1::State::Running);
        assert_eq!(t.operation(), v1::Operation::Start);
        assert_eq!((t.reason, t.time), (None, None));
    }

    #[test]
    fn an_exit_status_keeps_time_reason_and_exit() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_500);
        let exit = v1::ExitStatus::from(ExitStatus {
            stopped_at: at,
            reason: Reason::Exited(VmExit::clean()),
            exit: Some(VmExit::clean()),
        });
        assert_eq!(
            exit.stopped_at,
            Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(exit.reason.map(|r| r.kind()), Some(v1::ReasonKind::Exited));
        assert_eq!(exit.exit.and_then(|e| e.code), Some(0));

        let never_started = v1::ExitStatus::from(ExitStatus {
            stopped_at: at,
            reason: Reason::TerminateRequested,
            exit: None,
        });
        assert_eq!(never_started.exit, None);
    }

    #[test]
    fn stats_keep_every_figure() {
        let host = v1::HostStats::from(HostStats {
            cpu_time: Duration::from_micros(2_000_001),
            rss_bytes: 128 << 20,
            memory_current_bytes: Some(100 << 20),
            memory_peak_bytes: None,
            cpu_throttling: Some(uvm::seams::CpuThrottling {
                periods: 50,
                throttled_periods: 20,
                throttled_time: Duration::from_millis(1500),
            }),
        });
        assert_eq!(host.memory_current_bytes, Some(100 << 20));
        assert_eq!(host.memory_peak_bytes, None);
        let t = host.cpu_throttling.expect("throttling");
        assert_eq!((t.periods, t.throttled_periods), (50, 20));
        assert_eq!(
            t.throttled_time,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            host.cpu_time,
            Some(prost_types::Duration {
                seconds: 2,
                nanos: 1_000
            })
        );
        assert_eq!(host.rss_bytes, 128 << 20);

        let guest = v1::GuestStats::from(GuestStats {
            mem_total_bytes: 1,
            mem_available_bytes: 2,
            cpu_user: Duration::from_secs(3),
            cpu_system: Duration::from_secs(4),
            cpu_idle: Duration::from_secs(5),
            uptime: Duration::from_secs(6),
            processes: 7,
        });
        let secs = |d: Option<prost_types::Duration>| d.map(|d| d.seconds);
        assert_eq!((guest.mem_total_bytes, guest.mem_available_bytes), (1, 2));
        assert_eq!(secs(guest.cpu_user), Some(3));
        assert_eq!(secs(guest.cpu_system), Some(4));
        assert_eq!(secs(guest.cpu_idle), Some(5));
        assert_eq!(secs(guest.uptime), Some(6));
        assert_eq!(guest.processes, 7);
    }

    #[test]
    fn guest_info_gives_the_guest_and_its_boot_marks() {
        let info = GuestInfo {
            protocol_version: 3,
            agent_version: "0.1.0".into(),
            capabilities: Capabilities {
                names: vec!["exec".into(), "dump-stacks".into()],
            },
            kernel_to_init: Duration::from_millis(300),
            init_to_ready: Duration::from_millis(12),
        };
        let guest = v1::GuestInfo::from(&info);
        assert_eq!(guest.protocol_version, 3);
        assert_eq!(guest.agent_version, "0.1.0");
        assert_eq!(guest.capabilities, ["exec", "dump-stacks"]);
        let boot = v1::BootTimings::from(&info);
        let nanos = |d: Option<prost_types::Duration>| d.map(|d| d.nanos);
        assert_eq!(nanos(boot.kernel_to_init), Some(300_000_000));
        assert_eq!(nanos(boot.init_to_ready), Some(12_000_000));
        assert_eq!(boot.start_total, None);
    }

    #[test]
    fn the_config_keeps_memory_cpus_and_policy() {
        let config = v1::VmConfig::from(VmConfig {
            memory_mib: 512,
            cpus: 2,
            security_policy: Some(SecurityPolicy("allow all".into())),
            ..VmConfig::default()
        });
        assert_eq!((config.memory_mib, config.cpus), (512, 2));
        assert_eq!(config.security_policy.as_deref(), Some("allow all"));
        assert!(config.backend_options.is_empty());
        assert_eq!(
            v1::VmConfig::from(VmConfig::default()).security_policy,
            None
        );
    }

    #[test]
    fn terminal_sizes_round_trip_and_out_of_range_sides_are_refused() {
        let size = TerminalSize {
            rows: 50,
            cols: 132,
        };
        assert_eq!(
            TerminalSize::try_from(v1::TerminalSize::from(size)).ok(),
            Some(size)
        );
        for (rows, cols) in [(0, 80), (24, 0), (65_536, 80), (24, u32::MAX)] {
            let refused = TerminalSize::try_from(v1::TerminalSize { rows, cols });
            assert!(
                matches!(
                    refused,
                    Err(ApiError::InvalidRequest {
                        what: "terminal size",
                        ..
                    })
                ),
                "{rows}x{cols}: {refused:?}"
            );
        }
    }

    #[test]
    fn cpu_limits_keep_unset_fields_unset() {
        let limits = CpuLimits::from(&v1::UpdateCpuLimitsRequest {
            limit_per_10000: Some(5_000),
            weight: None,
        });
        assert_eq!(
            limits,
            CpuLimits {
                limit: Some(5_000),
                weight: None
            }
        );
    }

    #[test]
    fn grace_periods_unset_valid_and_negative() {
        assert!(matches!(grace_period(None), Ok(None)));
        let five = prost_types::Duration {
            seconds: 5,
            nanos: 0,
        };
        assert!(matches!(grace_period(Some(&five)), Ok(Some(d)) if d == Duration::from_secs(5)));
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert!(matches!(
            grace_period(Some(&negative)),
            Err(ApiError::InvalidRequest {
                what: "grace period",
                ..
            })
        ));
    }

    #[test]
    fn durations_saturate_instead_of_failing() {
        assert_eq!(duration(Duration::MAX).seconds, 315_576_000_000);
        assert_eq!(
            duration(Duration::from_nanos(1)),
            prost_types::Duration {
                seconds: 0,
                nanos: 1
            }
        );
    }
}
