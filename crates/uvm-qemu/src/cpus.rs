//! vCPU hotplug on q35 (a VM created with a maximum: `-smp N,maxcpus=M`; QEMU lays the slots
//! out as one socket with a core each).
//!
//! QMP `query-hotpluggable-cpus` lists every possible vCPU with its topology properties and,
//! for those present, a `qom-path`. Adding one is `device_add` of the listed type with those
//! properties (the lowest free slot of the topology first, with the id `vcpu-<position>`); the
//! guest's ACPI CPU
//! hotplug adds it and the agent brings it online. Removing one is `device_del` of a hot-added
//! vCPU (the highest first), waiting for `DEVICE_DELETED`, which QEMU sends once the guest has
//! offlined and ejected it. The vCPUs the VM booted with are not removable.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use uvm::HostError;

use crate::vm::QemuVm;

/// How long the guest may take to let go of a vCPU.
const UNPLUG_WAIT: Duration = Duration::from_secs(8);

const OP: &str = "update cpus";

/// One entry of `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct HotpluggableCpu {
    /// The QOM type to `device_add` (`max-x86_64-cpu`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its topology (`socket-id`, `core-id`, `thread-id`).
    pub props: Map<String, Value>,
    /// Where it is in the QOM tree, when present.
    #[serde(rename = "qom-path")]
    pub qom_path: Option<String>,
}

/// The topology properties, outermost first (QEMU lists those the machine has).
const LEVELS: [&str; 6] = [
    "node-id",
    "socket-id",
    "die-id",
    "module-id",
    "core-id",
    "thread-id",
];

impl HotpluggableCpu {
    /// Its place in the topology, outermost level first: the order vCPUs are added in.
    fn position(&self) -> [u64; 6] {
        LEVELS.map(|level| self.props.get(level).and_then(Value::as_u64).unwrap_or(0))
    }

    /// The id a hot-added vCPU gets: `vcpu-<position>` (unique per topology slot).
    fn new_id(&self) -> String {
        let parts: Vec<String> = self.position().iter().map(u64::to_string).collect();
        format!("vcpu-{}", parts.join("-"))
    }

    /// Hot-added ones are named by us (`/machine/peripheral/vcpu-<position>`); boot ones are not.
    fn hot_added_id(&self) -> Option<&str> {
        self.qom_path
            .as_deref()?
            .strip_prefix("/machine/peripheral/")
    }
}

/// What to do to go from the listed vCPUs to `wanted`: (entries to add, ids to remove).
pub(crate) fn plan(
    cpus: &[HotpluggableCpu],
    wanted: u32,
) -> Result<(Vec<HotpluggableCpu>, Vec<String>), HostError> {
    let present = cpus.iter().filter(|c| c.qom_path.is_some()).count();
    let wanted = usize::try_from(wanted).unwrap_or(usize::MAX);
    if wanted > cpus.len() {
        return Err(HostError::InvalidInput {
            what: "cpu count",
            message: format!(
                "{wanted} is above the VM's maximum of {} (create it with a larger maximum)",
                cpus.len()
            ),
        });
    }
    if wanted >= present {
        let mut free: Vec<HotpluggableCpu> = cpus
            .iter()
            .filter(|c| c.qom_path.is_none())
            .cloned()
            .collect();
        free.sort_by_key(HotpluggableCpu::position);
        free.truncate(wanted - present);
        return Ok((free, Vec::new()));
    }
    let mut hot: Vec<&HotpluggableCpu> =
        cpus.iter().filter(|c| c.hot_added_id().is_some()).collect();
    hot.sort_by_key(|c| std::cmp::Reverse(c.position()));
    let remove = present - wanted;
    if remove > hot.len() {
        return Err(HostError::InvalidInput {
            what: "cpu count",
            message: format!(
                "{wanted} is below the {} vCPUs the VM booted with, which cannot be removed",
                present - hot.len()
            ),
        });
    }
    Ok((
        Vec::new(),
        hot.iter()
            .take(remove)
            .filter_map(|c| c.hot_added_id().map(str::to_owned))
            .collect(),
    ))
}

impl QemuVm {
    /// Hot-adds or hot-removes vCPUs until the VM has `wanted`.
    pub(crate) async fn set_cpus(&self, wanted: u32) -> Result<(), HostError> {
        let listed = self
            .qmp_execute("query-hotpluggable-cpus", Map::new())
            .await?;
        let cpus: Vec<HotpluggableCpu> =
            serde_json::from_value(listed).map_err(|e| HostError::Failed {
                operation: OP,
                source: Box::new(e),
            })?;
        let (add, remove) = plan(&cpus, wanted)?;
        for cpu in add {
            let mut args = cpu.props.clone();
            args.insert("driver".to_owned(), Value::String(cpu.kind.clone()));
            args.insert("id".to_owned(), Value::String(cpu.new_id()));
            self.qmp_execute("device_add", args).await?;
        }
        for id in remove {
            self.unplug(OP, &id, UNPLUG_WAIT).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One socket, a core per vCPU (QEMU's topology for `-smp 1,maxcpus=4`).
    fn cpu(core: u64, qom: Option<&str>) -> HotpluggableCpu {
        let mut props = Map::new();
        props.insert("socket-id".into(), 0.into());
        props.insert("core-id".into(), core.into());
        props.insert("thread-id".into(), 0.into());
        HotpluggableCpu {
            kind: "max-x86_64-cpu".into(),
            props,
            qom_path: qom.map(str::to_owned),
        }
    }

    fn core(c: &HotpluggableCpu) -> u64 {
        c.position()[4]
    }

    /// Booted with 1 of 4; core 2 hot-added.
    fn listed() -> Vec<HotpluggableCpu> {
        vec![
            cpu(3, None),
            cpu(2, Some("/machine/peripheral/vcpu-0-0-0-0-2-0")),
            cpu(1, None),
            cpu(0, Some("/machine/unattached/device[0]")),
        ]
    }

    #[test]
    fn growing_takes_the_lowest_free_slots() {
        let (add, remove) = plan(&listed(), 4).expect("plan");
        assert_eq!(add.iter().map(core).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(add[0].new_id(), "vcpu-0-0-0-0-1-0");
        assert!(remove.is_empty());
        let (add, _) = plan(&listed(), 3).expect("plan");
        assert_eq!(add.iter().map(core).collect::<Vec<_>>(), [1]);
        assert_eq!(
            plan(&listed(), 2).expect("as it is"),
            (Vec::new(), Vec::new())
        );
    }

    #[test]
    fn shrinking_removes_hot_added_ones_only() {
        assert_eq!(
            plan(&listed(), 1).expect("plan"),
            (Vec::new(), vec!["vcpu-0-0-0-0-2-0".to_owned()])
        );
        assert!(matches!(
            plan(&listed(), 0),
            Err(HostError::InvalidInput { .. })
        ));
        let mut booted_with_two = listed();
        booted_with_two[2].qom_path = Some("/machine/unattached/device[1]".into());
        assert!(matches!(
            plan(&booted_with_two, 1),
            Err(HostError::InvalidInput { .. })
        ));
    }

    #[test]
    fn above_the_maximum_is_refused() {
        assert!(matches!(
            plan(&listed(), 5),
            Err(HostError::InvalidInput {
                what: "cpu count",
                ..
            })
        ));
    }

    #[test]
    fn qemus_answer_parses() {
        let answer = serde_json::json!([
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 1}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "qom-path": "/machine/unattached/device[0]", "type": "max-x86_64-cpu"}
        ]);
        let cpus: Vec<HotpluggableCpu> = serde_json::from_value(answer).expect("parse");
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[0].position()[1], 1);
        assert_eq!(cpus[1].hot_added_id(), None);
    }
}
