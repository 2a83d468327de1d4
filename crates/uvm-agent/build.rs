//! Link-time fix for the agent's static, LTO-built binary.
//!
//! `std` declares `posix_spawn_file_actions_addchdir_np` as a *weak* symbol (it probes for it at
//! run time); the agent calls it directly. With fat LTO both declarations merge and the weak one
//! wins, and a weak undefined reference does not make the linker pull the defining member out of
//! the static `libc.a`: the call then jumps to address 0. Naming the symbol as undefined on the
//! linker's command line pulls the member in. (Harmless when linking dynamically.)
fn main() {
    println!("cargo:rustc-link-arg=-Wl,--undefined=posix_spawn_file_actions_addchdir_np");
}
