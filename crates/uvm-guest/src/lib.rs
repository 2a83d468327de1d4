//! Placeholder; filled in by the QEMU-backend work.
