//! vCPUs the host hot-adds arrive offline (the kernel adds them present, not online): the
//! agent brings each online as the kernel announces it, so that the guest's `nproc` follows
//! `update_cpus` with nobody asking. Removal needs nothing here: the kernel offlines a CPU
//! the host ejects.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::mounts::uevent::Uevents;
use crate::{info, warn};

/// Where the kernel lists the CPUs.
const CPU_DIR: &str = "/sys/devices/system/cpu";

/// Watches the kernel's uevents for added CPUs and onlines every offline one; never returns
/// unless the uevent socket fails.
pub async fn online_hot_added() {
    let events = match Uevents::open() {
        Ok(events) => events,
        Err(e) => {
            warn!("cannot watch for hot-added vCPUs: {e}");
            return;
        }
    };
    // Any added before the subscription.
    online_all(Path::new(CPU_DIR));
    let far = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
    loop {
        match events.next(far).await {
            Ok(Some(e)) if e.subsystem == "cpu" && e.action == "add" => {
                online_all(Path::new(CPU_DIR));
            }
            Ok(Some(e)) if e.action == "overflow" => {
                online_all(Path::new(CPU_DIR));
            }
            Ok(_) => {}
            Err(e) => {
                warn!("stopped watching for hot-added vCPUs: {e}");
                return;
            }
        }
    }
}

/// Onlines every `cpuN` under `dir` whose `online` reads 0; how many it onlined.
pub fn online_all(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut onlined = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_cpu = name
            .strip_prefix("cpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !is_cpu {
            continue;
        }
        let online = entry.path().join("online");
        let Ok(state) = std::fs::read_to_string(&online) else {
            continue; // cpu0 often has no `online`: it cannot go offline
        };
        if state.trim() != "0" {
            continue;
        }
        match std::fs::write(&online, "1") {
            Ok(()) => {
                info!("brought {name} online");
                onlined += 1;
            }
            Err(e) => warn!("cannot bring {name} online: {e}"),
        }
    }
    onlined
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_offline_cpus_are_brought_online() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cpu = |name: &str, online: Option<&str>| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).expect("cpu dir");
            if let Some(state) = online {
                std::fs::write(d.join("online"), state).expect("online");
            }
        };
        cpu("cpu0", None);
        cpu("cpu1", Some("1\n"));
        cpu("cpu2", Some("0\n"));
        cpu("cpufreq", Some("0\n"));
        std::fs::write(dir.path().join("online"), "0-1\n").expect("list");
        assert_eq!(online_all(dir.path()), 1);
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n).join("online")).expect(n);
        assert_eq!(read("cpu2"), "1");
        assert_eq!(read("cpufreq"), "0\n");
        assert_eq!(online_all(dir.path()), 0);
        assert_eq!(online_all(&dir.path().join("missing")), 0);
    }
}
