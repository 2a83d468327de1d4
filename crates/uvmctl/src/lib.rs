//! uvmctl as a library: the terminal handling and the `--disk`/`--share` argument that the CLI
//! and its tests share. The VM itself is `uvm-vm`'s, the benchmark `uvm-bench`'s.

pub mod cpu_groups;
pub mod mount_spec;
pub mod terminal;
