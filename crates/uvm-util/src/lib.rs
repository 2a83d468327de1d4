//! # uvm-util — the few helpers every uvmctl crate shares
//!
//! One home for what the controller, the host backend, the guest link, the benchmark and the
//! guest agent would otherwise each write again. It has no dependencies and does no I/O, so the
//! controller (which does no I/O) and the agent (a static PID 1 that keeps its dependencies
//! few) can use it as well as the host crates.

#![warn(missing_docs)]

use std::sync::{Mutex, MutexGuard, PoisonError};

/// An error and its sources, joined with ": " on one line, for logs, state reasons and RPC
/// statuses.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// Locks `m`, recovering from poisoning: for mutexes whose value stays consistent even when a
/// holder panics (no writer leaves it half-changed), where one panic must not make every later
/// caller panic too. Each mutex that relies on it says why it may.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// At most `len` characters of `id`, keeping only those safe in a file or thread name (ASCII
/// letters and digits, `-`, `_`); `"vm"` when none is (an id made only of other characters).
pub fn short_id(id: &str, len: usize) -> String {
    let s: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(len)
        .collect();
    if s.is_empty() {
        "vm".to_owned()
    } else {
        s
    }
}

pub mod tcp_probe;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn error_chain_joins_every_source() {
        let e = Layer(
            "start failed",
            Some(Box::new(Layer(
                "spawn",
                Some(Box::new(Layer("ENOENT", None))),
            ))),
        );
        assert_eq!(error_chain(&e), "start failed: spawn: ENOENT");
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }

    #[test]
    fn a_poisoned_lock_is_still_usable() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let held = m.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = held.lock().expect("not yet poisoned");
            panic!("poison it");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }

    #[test]
    fn short_ids_keep_safe_characters_up_to_the_length() {
        assert_eq!(short_id("0123456789abcdef", 12), "0123456789ab");
        assert_eq!(short_id("a/b c.d-e_f", 12), "abcd-e_f");
        assert_eq!(short_id("abcdef", 3), "abc");
        assert_eq!(short_id("../..", 12), "vm");
        assert_eq!(short_id("", 12), "vm");
    }
}
