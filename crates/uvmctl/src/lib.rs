//! uvmctl as a library: the benchmark and the terminal handling, shared by the CLI and its
//! tests. The VM itself is `uvm-vm`'s.

pub mod bench;
pub mod terminal;
