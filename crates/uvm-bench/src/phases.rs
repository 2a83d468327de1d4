//! The boot-phase breakdown: host marks (host clock) and the guest's own marks (guest
//! `CLOCK_BOOTTIME`) combined into consecutive phases that add up to the whole boot.
//!
//! ```text
//! begin ── host setup ──▶ QEMU spawned ── firmware ──▶ kernel entry ── kernel ──▶ /init
//!       ── agent init ──▶ ready line ── handshake ──▶ handshake done ── other ──▶ end
//! ```
//!
//! QEMU spawned, the ready line and the handshake are host marks; kernel entry and /init are
//! placed from the guest's `kernel_to_init` / `init_to_ready`, counted back from the ready line.
//! The firmware phase (QEMU set-up, SeaBIOS or PVH entry, until the guest clock starts) is what
//! is left between the spawn and the kernel entry.

use std::time::Duration;

use serde::Serialize;

use super::stats::{median, ms};

/// Marks of one boot, as offsets from its beginning (host clock) plus the guest's durations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootMarks {
    /// QEMU was spawned.
    pub qemu_spawned: Duration,
    /// The guest's ready line arrived.
    pub ready: Duration,
    /// The handshake with the agent completed (the floor has none: equal to `ready`).
    pub handshaken: Duration,
    /// The boot was over (Running; for the floor, the ready line).
    pub end: Duration,
    /// Guest clock: kernel start → agent (`/init`) start.
    pub kernel_to_init: Duration,
    /// Guest clock: agent start → ready line sent.
    pub init_to_ready: Duration,
}

/// One boot cut into phases, in milliseconds; the phases add up to `total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Phases {
    /// Beginning → QEMU spawned: runtime directory, vhost-device-vsock up, listener bound (and,
    /// through the controller, create_vm and its checks).
    pub host_setup_ms: f64,
    /// QEMU spawned → guest kernel entry: QEMU's own set-up and the firmware/PVH entry.
    pub firmware_ms: f64,
    /// Guest kernel entry → /init (the agent) starts.
    pub kernel_ms: f64,
    /// /init starts → the agent's ready line reaches the host.
    pub agent_init_ms: f64,
    /// Ready line → handshake done (connect to the agent, Handshake RPC).
    pub handshake_ms: f64,
    /// Handshake done → Running (the controller's commit).
    pub other_ms: f64,
    pub total_ms: f64,
}

/// The phases' display names, in order.
pub const PHASE_NAMES: [&str; 6] = [
    "host setup",
    "QEMU+firmware",
    "kernel",
    "agent init",
    "handshake",
    "other",
];

impl Phases {
    /// Cuts one boot into phases. Guest durations are clamped into the window between the QEMU
    /// spawn and the ready line (the two clocks can disagree by a little), so the phases always
    /// add up to the total.
    pub fn from_marks(m: &BootMarks) -> Phases {
        let spawned = m.qemu_spawned.min(m.ready);
        let window = m.ready - spawned;
        let init = m.init_to_ready.min(window);
        let kernel = m.kernel_to_init.min(window - init);
        let firmware = window - init - kernel;
        let handshaken = m.handshaken.clamp(m.ready, m.end.max(m.ready));
        let end = m.end.max(handshaken);
        Phases {
            host_setup_ms: ms(spawned),
            firmware_ms: ms(firmware),
            kernel_ms: ms(kernel),
            agent_init_ms: ms(init),
            handshake_ms: ms(handshaken - m.ready),
            other_ms: ms(end - handshaken),
            total_ms: ms(end),
        }
    }

    /// The phases in [`PHASE_NAMES`] order.
    pub fn values(&self) -> [f64; 6] {
        [
            self.host_setup_ms,
            self.firmware_ms,
            self.kernel_ms,
            self.agent_init_ms,
            self.handshake_ms,
            self.other_ms,
        ]
    }

    /// Phase by phase medians of several boots; the total is their sum (so the phases still
    /// add up to it), which is close to, but not the same as, the median of the totals.
    pub fn median_of(all: &[Phases]) -> Phases {
        let m = |f: fn(&Phases) -> f64| median(&all.iter().map(f).collect::<Vec<_>>());
        let mut p = Phases {
            host_setup_ms: m(|p| p.host_setup_ms),
            firmware_ms: m(|p| p.firmware_ms),
            kernel_ms: m(|p| p.kernel_ms),
            agent_init_ms: m(|p| p.agent_init_ms),
            handshake_ms: m(|p| p.handshake_ms),
            other_ms: m(|p| p.other_ms),
            total_ms: 0.0,
        };
        p.total_ms = p.values().iter().sum();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn phases_add_up_to_the_total() {
        let p = Phases::from_marks(&BootMarks {
            qemu_spawned: d(10),
            ready: d(1010),
            handshaken: d(1030),
            end: d(1031),
            kernel_to_init: d(700),
            init_to_ready: d(100),
        });
        assert_eq!(p.host_setup_ms, 10.0);
        assert_eq!(p.firmware_ms, 200.0);
        assert_eq!(p.kernel_ms, 700.0);
        assert_eq!(p.agent_init_ms, 100.0);
        assert_eq!(p.handshake_ms, 20.0);
        assert_eq!(p.other_ms, 1.0);
        assert_eq!(p.total_ms, 1031.0);
        assert_eq!(p.values().iter().sum::<f64>(), p.total_ms);
    }

    #[test]
    fn guest_durations_longer_than_the_window_are_clamped() {
        let p = Phases::from_marks(&BootMarks {
            qemu_spawned: d(10),
            ready: d(510),
            handshaken: d(510),
            end: d(510),
            kernel_to_init: d(450),
            init_to_ready: d(100),
        });
        assert_eq!(p.agent_init_ms, 100.0);
        assert_eq!(p.kernel_ms, 400.0);
        assert_eq!(p.firmware_ms, 0.0);
        assert_eq!(p.values().iter().sum::<f64>(), p.total_ms);
    }

    #[test]
    fn the_floor_has_no_handshake_or_tail() {
        let p = Phases::from_marks(&BootMarks {
            qemu_spawned: d(5),
            ready: d(105),
            handshaken: d(105),
            end: d(105),
            kernel_to_init: d(50),
            init_to_ready: d(20),
        });
        assert_eq!((p.handshake_ms, p.other_ms), (0.0, 0.0));
        assert_eq!(p.total_ms, 105.0);
    }

    #[test]
    fn missing_marks_do_not_underflow() {
        // A mark recorded as zero (unknown) must not make a phase negative or panic.
        let p = Phases::from_marks(&BootMarks {
            qemu_spawned: d(50),
            ready: d(20),
            handshaken: Duration::ZERO,
            end: d(30),
            ..BootMarks::default()
        });
        assert!(p.values().iter().all(|v| *v >= 0.0));
        assert_eq!(p.values().iter().sum::<f64>(), p.total_ms);
    }

    #[test]
    fn medians_are_taken_phase_by_phase() {
        let mk = |k: f64| Phases {
            kernel_ms: k,
            total_ms: k + 1.0,
            ..Phases::default()
        };
        let m = Phases::median_of(&[mk(1.0), mk(5.0), mk(3.0)]);
        assert_eq!(m.kernel_ms, 3.0);
        assert_eq!(m.total_ms, 3.0, "the sum of the phase medians");
    }
}
