//! Mounts the host asks for: shared directories ([`share`]), behind the guest-path check
//! every mount passes ([`path`]).

pub mod path;
pub mod share;
