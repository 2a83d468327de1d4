//! The VM record `<root>/<id>/vm.json`: what `ps` and `inspect` read without asking the
//! supervisor, and what a later adopter needs. The supervisor rewrites it at every state change,
//! atomically: a temp file in the same directory, fsync, rename over the record, fsync of the
//! directory — a reader sees the old record or the new one, never a mix, even across a crash.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The record's file name in the VM directory.
pub const RECORD_FILE: &str = "vm.json";
/// The API socket's file name in the VM directory.
pub const SOCKET_FILE: &str = "api.sock";
/// The supervisor's log (its stdout and stderr) in the VM directory.
pub const LOG_FILE: &str = "supervisor.log";

/// A host process of the VM, with its start time so that a reused pid is not mistaken for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat` field 22); `None` if unread.
    pub start_time: Option<u64>,
}

impl ProcessRecord {
    /// The process `pid` as it is now.
    pub fn of(pid: u32) -> ProcessRecord {
        ProcessRecord {
            pid,
            start_time: process_start_time(pid),
        }
    }

    /// Whether this very process (same pid, same start time) still runs; a zombie does not.
    pub fn is_alive(&self) -> bool {
        if process_state(self.pid).is_none_or(|s| matches!(s, 'Z' | 'X')) {
            return false;
        }
        match (process_start_time(self.pid), self.start_time) {
            (Some(now), Some(then)) => now == then,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// What the VM was created with, as the user gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRecord {
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// The most it may grow to, in MiB (`--max-memory`).
    #[serde(default)]
    pub max_memory_mib: Option<u64>,
    /// Virtual CPUs.
    pub cpus: u32,
    /// The most vCPUs it may have (`--max-cpus`).
    #[serde(default)]
    pub max_cpus: Option<u32>,
    /// Backend settings: machine, accel, kernel, append.
    pub backend: BTreeMap<String, String>,
    /// The disks given at create (`--disk`), in order.
    #[serde(default)]
    pub disks: Vec<MountSpecRecord>,
    /// The shares given at create (`--share`), in order.
    #[serde(default)]
    pub shares: Vec<MountSpecRecord>,
    /// The security policy file given at create (`--policy`); its text is the supervisor's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PathBuf>,
    /// The network given at create (`--net`, `--netns`, `--publish`, `--dns`).
    #[serde(default)]
    pub network: NetworkRecord,
}

/// A VM's network as given at create.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// `none`, `user` or `netns` (an empty record reads as `none`).
    #[serde(default)]
    pub mode: String,
    /// The namespace of `netns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The published ports of `user`, as given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// The guest's nameservers, as given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

/// A disk or share given at create: a host path mounted at a guest path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpecRecord {
    /// The image or directory on the host (absolute).
    pub host_path: PathBuf,
    /// Where the guest mounts it.
    pub guest_path: String,
    /// Attached (and mounted) read-only.
    pub read_only: bool,
}

/// A disk or share on the VM as the record shows it: what `ps` and `inspect` read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// `disk` or `share`.
    pub kind: String,
    /// Its SCSI slot index (controller × 64 + lun); disks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// Its tag; shares only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The image or directory on the host.
    pub host_path: PathBuf,
    /// Attached read-only.
    pub read_only: bool,
    /// Its state as the controller names it (`Attached`, `Added`, …).
    pub state: String,
    /// Given at create rather than added since.
    pub cold: bool,
    /// Its guest mounts.
    pub mounts: Vec<MountRecord>,
}

/// A guest mount of a disk or share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    /// Where.
    pub guest_path: String,
    /// Mounted read-only.
    pub read_only: bool,
    /// Its state (`Reserved`, `Mounted`, `Unmounted`).
    pub state: String,
}

impl DeviceRecord {
    /// The records of `devices`: disks by slot, then shares by tag.
    pub fn of(devices: &uvm::Devices) -> Vec<DeviceRecord> {
        let disks = devices.disks.iter().map(|d| DeviceRecord {
            kind: "disk".into(),
            slot: Some(d.slot.index()),
            tag: None,
            host_path: d.config.host_path.clone(),
            read_only: d.config.read_only,
            state: d.state.to_string(),
            cold: d.cold,
            mounts: d
                .mounts
                .iter()
                .map(|m| MountRecord {
                    guest_path: m.config.guest_path.clone(),
                    read_only: m.config.read_only,
                    state: m.state.to_string(),
                })
                .collect(),
        });
        let shares = devices.shares.iter().map(|s| DeviceRecord {
            kind: "share".into(),
            slot: None,
            tag: Some(s.tag.clone()),
            host_path: s.config.host_path.clone(),
            read_only: s.config.read_only,
            state: s.state.to_string(),
            cold: s.cold,
            mounts: s
                .mounts
                .iter()
                .map(|m| MountRecord {
                    guest_path: m.config.guest_path.clone(),
                    read_only: m.config.read_only,
                    state: m.state.to_string(),
                })
                .collect(),
        });
        disks.chain(shares).collect()
    }
}

/// The whole record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM's id (its directory's name).
    pub id: String,
    /// Its name; empty for none.
    pub name: String,
    /// What it was created with.
    pub config: ConfigRecord,
    /// Its state as the controller names it (`Created`, `Running`, …).
    pub state: String,
    /// Why it is in that state, as a sentence; `None` when there is nothing to explain.
    pub reason: Option<String>,
    /// Its host processes by role: `supervisor`, `qemu`, and each helper by name.
    pub pids: BTreeMap<String, ProcessRecord>,
    /// When it was created (RFC 3339, UTC).
    pub created_at: String,
    /// When it first reached Running (RFC 3339, UTC).
    pub started_at: Option<String>,
    /// The disks and shares on the VM, with their states and mounts.
    #[serde(default)]
    pub devices: Vec<DeviceRecord>,
    /// The API socket.
    pub api_socket: PathBuf,
}

/// Reading or writing a record failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A file operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The record is not valid JSON of the expected shape.
    #[error("malformed VM record {}", path.display())]
    Malformed {
        /// The record.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Writes `record` as `<dir>/vm.json` atomically (temp file, fsync, rename, fsync of `dir`).
pub fn write_record(dir: &Path, record: &VmRecord) -> Result<(), RecordError> {
    let path = dir.join(RECORD_FILE);
    let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
    let io = |action, path: &Path, source| RecordError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let json = serde_json::to_vec_pretty(record).map_err(|source| RecordError::Malformed {
        path: path.clone(),
        source,
    })?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("create", &tmp, e))?;
    file.write_all(&json)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|e| io("write", &tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(|e| io("replace", &path, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync", dir, e))
}

/// Reads `<dir>/vm.json`.
pub fn read_record(dir: &Path) -> Result<VmRecord, RecordError> {
    let path = dir.join(RECORD_FILE);
    let bytes = std::fs::read(&path).map_err(|source| RecordError::Io {
        action: "read",
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| RecordError::Malformed { path, source })
}

/// Field `n` (1-based, `n` ≥ 3) of `/proc/<pid>/stat`, if the process exists.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n - 3).map(str::to_owned)
}

/// The start time of process `pid` in clock ticks after boot (field 22), if it exists.
pub fn process_start_time(pid: u32) -> Option<u64> {
    stat_field(pid, 22)?.parse().ok()
}

/// The state letter of process `pid` (field 3: `R`, `S`, `Z`, …), if it exists.
pub fn process_state(pid: u32) -> Option<char> {
    stat_field(pid, 3)?.chars().next()
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2026-12-01T09:30:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sample() -> VmRecord {
        VmRecord {
            id: "0123456789abcdef".into(),
            name: "web".into(),
            config: ConfigRecord {
                memory_mib: 256,
                max_memory_mib: None,
                cpus: 1,
                max_cpus: None,
                policy: None,
                network: NetworkRecord::default(),
                backend: [("machine".to_string(), "q35".to_string())].into(),
                disks: vec![MountSpecRecord {
                    host_path: "/images/data.img".into(),
                    guest_path: "/data".into(),
                    read_only: true,
                }],
                shares: Vec::new(),
            },
            state: "Running".into(),
            reason: None,
            pids: [(
                "supervisor".to_string(),
                ProcessRecord::of(std::process::id()),
            )]
            .into(),
            created_at: rfc3339(SystemTime::now()),
            started_at: None,
            devices: vec![DeviceRecord {
                kind: "disk".into(),
                slot: Some(0),
                tag: None,
                host_path: "/images/data.img".into(),
                read_only: true,
                state: "Attached".into(),
                cold: true,
                mounts: vec![MountRecord {
                    guest_path: "/data".into(),
                    read_only: true,
                    state: "Mounted".into(),
                }],
            }],
            api_socket: "/run/uvmctl/0123456789abcdef/api.sock".into(),
        }
    }

    #[test]
    fn a_record_round_trips_and_a_rewrite_replaces_it_leaving_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut record = sample();
        write_record(dir.path(), &record).expect("write");
        assert_eq!(read_record(dir.path()).expect("read"), record);
        record.state = "Terminated".into();
        record.reason = Some("terminate requested".into());
        write_record(dir.path(), &record).expect("rewrite");
        assert_eq!(read_record(dir.path()).expect("read"), record);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, [RECORD_FILE]);
    }

    #[test]
    fn a_missing_or_malformed_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            read_record(dir.path()),
            Err(RecordError::Io { action: "read", .. })
        ));
        std::fs::write(dir.path().join(RECORD_FILE), b"{\"id\": 1").expect("write");
        let err = read_record(dir.path()).expect_err("malformed");
        assert!(
            matches!(&err, RecordError::Malformed { path, .. } if path.ends_with(RECORD_FILE)),
            "{err:?}"
        );
    }

    #[test]
    fn a_stale_temp_file_does_not_stop_the_next_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(format!(".{RECORD_FILE}.tmp")), b"half").expect("write");
        let record = sample();
        write_record(dir.path(), &record).expect("write");
        assert_eq!(read_record(dir.path()).expect("read"), record);
    }

    #[test]
    fn our_own_process_is_alive_and_a_changed_start_time_is_not() {
        let me = ProcessRecord::of(std::process::id());
        assert!(me.start_time.is_some());
        assert!(me.is_alive());
        let reused = ProcessRecord {
            start_time: me.start_time.map(|t| t + 1),
            ..me
        };
        assert!(!reused.is_alive());
        assert!(!ProcessRecord::of(u32::MAX).is_alive());
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_117_400_123);
        assert_eq!(rfc3339(t), "2026-12-01T09:30:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
