//! The host↔guest wire protocol of the uvmctl utility-VM agent.
//!
//! Two channels connect the host and the agent (PID 1 of the guest), both over vsock:
//!
//! * **The API** — a ttrpc service (`uvm.agent.v1.Agent`, see `proto/agent.proto`) served by the
//!   agent on [`AGENT_VSOCK_PORT`]. Messages live in [`agent`], the async client
//!   ([`agent_ttrpc::AgentClient`]), the server trait ([`agent_ttrpc::Agent`]) and its
//!   registration helper ([`agent_ttrpc::create_agent`]) in [`agent_ttrpc`]. They are generated at
//!   build time from the `.proto` file by ttrpc-codegen's pure-Rust parser (no `protoc`).
//! * **The announce stream** — a guest→host connection to [`HOST_ANNOUNCE_PORT`] carrying one
//!   ready line and then the agent's log lines ([`announce`]).
//!
//! [`hybrid_vsock`] opens the API from the host through a hybrid-vsock unix socket
//! (vhost-device-vsock's `CONNECT <port>` exchange).
//!
//! The guest is untrusted: the host must bound everything it reads from it, with the constants
//! below.

#![warn(missing_docs)]

pub mod announce;
pub mod hybrid_vsock;

/// Code generated from `proto/agent.proto` (messages and ttrpc service).
// `allow`, not `expect` as elsewhere: which of these lints the generated code trips depends on
// the generator's version (today's trips the first two), and an unfulfilled expectation would
// turn a ttrpc-codegen upgrade into a build failure over code we cannot edit. `missing_docs`:
// today's generators add their own `#![allow(missing_docs)]`; this keeps it should one stop.
#[expect(
    clippy::allow_attributes,
    reason = "see above: generated code gets allow"
)]
#[allow(
    missing_debug_implementations,
    clippy::unwrap_used,
    clippy::undocumented_unsafe_blocks,
    unsafe_op_in_unsafe_fn,
    missing_docs,
    reason = "generated code is not ours to lint"
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/generated.rs"));
}

/// Protobuf messages of the `uvm.agent.v1` package (`HandshakeRequest`, `ExecRequest`, …).
pub use generated::agent;
/// The async ttrpc service: `AgentClient` (host), `Agent` trait and `create_agent` (guest).
pub use generated::agent_ttrpc;

/// Re-exported so that implementors of [`agent_ttrpc::Agent`] use the same macro version.
pub use async_trait::async_trait;
/// Re-exported so that both sides use the exact runtime the generated code was made for.
pub use protobuf;
/// Re-exported so that both sides use the exact runtime the generated code was made for.
pub use ttrpc;

/// Version of this protocol; `Handshake` fails when host and agent disagree.
pub const PROTOCOL_VERSION: u32 = 1;
/// The agent's ttrpc listener, on the guest side (`VMADDR_CID_ANY:1024`).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The host's announce listener that the guest connects to (`VMADDR_CID_HOST:1025`).
pub const HOST_ANNOUNCE_PORT: u32 = 1025;
/// Bound on any ttrpc message, either direction (ttrpc itself enforces the same 4 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Bound on the data of one `ReadOutput` reply (and on its `max_bytes`).
pub const MAX_OUTPUT_CHUNK: u32 = 1 << 20;
/// Bound on the data of one `WriteStdin` request.
pub const MAX_STDIN_CHUNK: usize = 1 << 20;
/// Bound on the data of one `WriteChunk` request or `ReadChunk` reply (and on its `max_bytes`).
pub const MAX_FILE_CHUNK: u32 = 1 << 20;
/// Bound on the length of a path in the file requests (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Files open at once through the file requests; more is `RESOURCE_EXHAUSTED`.
pub const MAX_OPEN_FILES: usize = 16;
/// A file handle unused this long is dropped by the agent (an unfinished write leaves nothing).
pub const FILE_IDLE_TIMEOUT_SECS: u64 = 60;
/// How long `MountDisk` waits for its device when the request names no wait.
pub const DEFAULT_DEVICE_WAIT_MS: u32 = 5_000;
/// Bound on `MountDiskRequest.wait_ms` and `MountShareRequest.wait_ms`: how long the agent waits
/// for a device to appear.
pub const MAX_DEVICE_WAIT_MS: u32 = 60_000;
/// Bound on one `MountDiskRequest`'s options, together (Linux's mount data is one page).
pub const MAX_MOUNT_OPTIONS_BYTES: usize = 4000;
/// Bound on the addresses, routes, nameservers, search domains or hosts lines of one network
/// request (each list on its own).
pub const MAX_NETWORK_ITEMS: usize = 64;
/// Bound on the entropy seed of one `Handshake`.
pub const MAX_ENTROPY_BYTES: usize = 512;
/// Bound on one line of the announce stream (longer lines are truncated).
pub const MAX_LOG_LINE: usize = 4096;

// A full output chunk or stdin chunk plus framing must fit in one message.
const _: () = assert!((MAX_OUTPUT_CHUNK as usize) + 4096 < MAX_MESSAGE_BYTES);
const _: () = assert!(MAX_STDIN_CHUNK + 4096 < MAX_MESSAGE_BYTES);
const _: () = assert!((MAX_FILE_CHUNK as usize) + MAX_PATH_BYTES + 4096 < MAX_MESSAGE_BYTES);

/// Capability names advertised in `HandshakeResponse.capabilities`.
pub mod capabilities {
    /// `ExecProcess`, `WriteStdin`, `CloseStdin`, `ReadOutput`, `WaitProcess`, `SignalProcess`.
    pub const EXEC: &str = "exec";
    /// `ExecRequest.terminal = true` is supported.
    pub const TERMINAL: &str = "terminal";
    /// A waited-for process stays readable until its output was taken (or a linger after its
    /// exit), so the host may read output and wait concurrently. Without it the host must read
    /// to EOF before `WaitProcess`, which forgets the process.
    pub const EXEC_OUTPUT_LINGER: &str = "exec-output-linger";
    /// `DumpStacks`.
    pub const DUMP_STACKS: &str = "dump-stacks";
    /// `ConfigureInterface`, `DeconfigureInterface`, `ConfigureDns`.
    pub const NETWORK: &str = "network";
    /// `WaitPciDevice`.
    pub const PCI: &str = "pci";
    /// `GuestStats`.
    pub const STATS: &str = "stats";
    /// `Shutdown`.
    pub const SHUTDOWN: &str = "shutdown";
    /// `ExecRequest.size` and `ResizeTerminal` are honoured.
    pub const TERMINAL_RESIZE: &str = "terminal-resize";
    /// `OpenWrite`, `WriteChunk`, `CommitWrite`, `OpenRead`, `ReadChunk`, `CloseFile`.
    pub const FILES: &str = "files";
    /// `MountDisk`, `UnmountDisk`, `EjectDisk`.
    pub const DISKS: &str = "disks";
    /// `MountShare`, `UnmountShare` (virtio-fs and 9p).
    pub const SHARES: &str = "shares";
    /// `SetPolicy`, `AddPolicyFragment`: a Rego security policy decides the host's requests.
    pub const POLICY: &str = "policy";
}

/// The fully qualified ttrpc service name, as registered by [`agent_ttrpc::create_agent`].
pub const SERVICE_NAME: &str = "uvm.agent.v1.Agent";

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message as _;

    #[test]
    fn messages_round_trip_through_the_wire_format() {
        let mut req = agent::ExecRequest::new();
        req.args = vec!["sh".into(), "-c".into(), "true".into()];
        req.terminal = true;
        let bytes = req.write_to_bytes().expect("encoding cannot fail");
        let back = agent::ExecRequest::parse_from_bytes(&bytes).expect("just encoded");
        assert_eq!(back, req);
    }

    #[test]
    fn the_service_registers_under_its_package_name() {
        #[derive(Debug)]
        struct Nothing;
        impl agent_ttrpc::Agent for Nothing {}
        let services = agent_ttrpc::create_agent(std::sync::Arc::new(Nothing));
        assert!(services.contains_key(SERVICE_NAME));
    }

    #[test]
    fn ttrpc_bounds_messages_like_we_do() {
        assert_eq!(ttrpc::proto::MESSAGE_LENGTH_MAX, MAX_MESSAGE_BYTES);
    }
}
