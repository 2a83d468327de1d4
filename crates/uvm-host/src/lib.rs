//! # uvm-host — the host machine, without VMs
//!
//! What the host side of uvmctl needs from Linux, for the QEMU backend, the benchmark and the
//! tests alike, knowing nothing of VMs:
//!
//! - [`process`]: child processes tethered to this one ([`tethered_command`]), the end of their
//!   logs ([`log_tail`]), and which processes still mention a path ([`processes_mentioning`]);
//! - [`socket`]: whether a unix socket listens, without connecting to it
//!   ([`unix_socket_listening`]);
//! - [`tsc`]: the host's TSC frequency, and the clock arguments a guest kernel under TCG boots
//!   with ([`tcg_kernel_args`]).

#![warn(missing_docs)]

pub mod net;
pub mod process;
pub mod socket;
pub mod tsc;

pub use process::{log_tail, processes_mentioning, tethered_command};
pub use socket::unix_socket_listening;
pub use tsc::{
    host_tsc_khz, host_tsc_khz_with, tcg_kernel_args, tcg_kernel_args_with, TscError,
    TCG_APIC_TIMER_KHZ,
};
