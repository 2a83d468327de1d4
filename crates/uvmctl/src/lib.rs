//! uvmctl as a library: the terminal handling that the CLI and its tests share. The VM itself
//! is `uvm-vm`'s, the benchmark `uvm-bench`'s.

pub mod terminal;
