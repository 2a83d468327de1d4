//! # uvm-guest — the host side of the guest link
//!
//! [`VsockGuest`] implements the controller's guest seams ([`uvm::seams::Guest`]) over vsock and
//! ttrpc, talking to our agent (`uvm-agent`) inside the VM:
//!
//! 1. `prepare_connection` binds the host listener `<uds>_1025` **before** the VM starts;
//! 2. `connect` waits for the guest to announce itself on it (an event, no poll loop), starts
//!    forwarding the guest's log lines, connects to the agent's ttrpc port and handshakes
//!    (protocol version, capabilities, a host entropy seed);
//! 3. every call is bounded by a deadline and released with [`GuestError::ConnectionLost`] when
//!    the connection is closed; a broken connection marks the link [`LinkHealth::Lost`].
//!
//! The guest is untrusted: every line and frame read from it is bounded (see
//! `uvm_agent_proto::MAX_*`), and garbage is an error, never a panic.
//!
//! [`GuestError::ConnectionLost`]: uvm::GuestError::ConnectionLost
//! [`LinkHealth::Lost`]: uvm::seams::LinkHealth::Lost

#![warn(missing_docs)]

mod disks;
mod exec;
mod files;
mod hybrid;
mod link;
mod network;
mod shares;

pub use link::{GuestLinkConfig, LinkMarks, LogSlice, VsockGuest};
