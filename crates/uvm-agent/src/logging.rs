//! The agent's log lines: kmsg-style text (`[   1.234567] uvm-agent: INFO: …`) written
//! best-effort to the console and forwarded to the host on the announce stream.
//!
//! Logging never blocks the caller on I/O: a line is formatted, pushed into two bounded queues
//! (console, host) and the writer threads drain them. A queue that overflows drops its oldest
//! lines and says so. Before [`init`] (unit tests, tools) lines go straight to stderr.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write as _;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use uvm_agent_proto::MAX_LOG_LINE;

use crate::clock;

/// Lines kept per queue while nobody drains it (e.g. before the host connection exists).
const QUEUE_LINES: usize = 2048;

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something failed and was not recovered.
    Error,
    /// Something failed and was worked around.
    Warn,
    /// Milestones.
    Info,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
        })
    }
}

/// Logs at [`Level::Info`], `format!`-style.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::logging::emit($crate::logging::Level::Info, format_args!($($arg)*)) };
}
/// Logs at [`Level::Warn`], `format!`-style.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::logging::emit($crate::logging::Level::Warn, format_args!($($arg)*)) };
}
/// Logs at [`Level::Error`], `format!`-style.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::logging::emit($crate::logging::Level::Error, format_args!($($arg)*)) };
}

/// A bounded queue of log lines, drained by one writer thread.
#[derive(Debug)]
pub struct LogQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Debug)]
struct QueueState {
    lines: VecDeque<String>,
    dropped: u64,
    enabled: bool,
}

impl LogQueue {
    fn new() -> Self {
        LogQueue {
            state: Mutex::new(QueueState {
                lines: VecDeque::new(),
                dropped: 0,
                enabled: true,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding this lock leaves only a queue of strings behind: keep using it.
        uvm_util::lock(&self.state)
    }

    fn push(&self, line: &str) {
        let mut state = self.lock();
        if !state.enabled {
            return;
        }
        if state.lines.len() >= QUEUE_LINES {
            state.lines.pop_front();
            state.dropped += 1;
        }
        state.lines.push_back(line.to_owned());
        drop(state);
        self.ready.notify_one();
    }

    /// Blocks until lines are queued and takes them all, oldest first, preceded by a marker
    /// line when some were dropped.
    pub fn wait_take(&self) -> Vec<String> {
        let mut state = self.lock();
        while state.lines.is_empty() && state.dropped == 0 {
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let mut out = Vec::with_capacity(state.lines.len() + 1);
        if state.dropped > 0 {
            out.push(format_line(
                Level::Warn,
                format_args!("{} log lines dropped (queue full)", state.dropped),
            ));
            state.dropped = 0;
        }
        out.extend(state.lines.drain(..));
        out
    }

    /// Stops collecting lines (the sink is gone) and frees the queued ones.
    pub fn disable(&self) {
        let mut state = self.lock();
        state.enabled = false;
        state.lines.clear();
        state.dropped = 0;
    }
}

#[derive(Debug)]
struct Logger {
    console: LogQueue,
    host: LogQueue,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Starts queueing log lines for the console and host writers (see [`console_queue`],
/// [`host_queue`]). Until then, and in processes that never call it, lines go to stderr.
pub fn init() {
    LOGGER.get_or_init(|| Logger {
        console: LogQueue::new(),
        host: LogQueue::new(),
    });
}

/// The queue the console writer drains, once [`init`] was called.
pub fn console_queue() -> Option<&'static LogQueue> {
    LOGGER.get().map(|l| &l.console)
}

/// The queue the host (announce) writer drains, once [`init`] was called.
pub fn host_queue() -> Option<&'static LogQueue> {
    LOGGER.get().map(|l| &l.host)
}

/// Formats and queues one log line. Use the [`info!`](crate::info), [`warn!`](crate::warn) and
/// [`error!`](macro@crate::error) macros.
pub fn emit(level: Level, args: fmt::Arguments<'_>) {
    let line = format_line(level, args);
    match LOGGER.get() {
        Some(logger) => {
            logger.console.push(&line);
            logger.host.push(&line);
        }
        None => {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
}

/// One line of text: kmsg-style boot-time stamp, no control characters, at most
/// `MAX_LOG_LINE - 1` bytes (the `\n` added by writers makes `MAX_LOG_LINE`).
pub fn format_line(level: Level, args: fmt::Arguments<'_>) -> String {
    let since_boot = clock::boottime();
    let mut line = format!(
        "[{:5}.{:06}] uvm-agent: {level}: ",
        since_boot.as_secs(),
        since_boot.subsec_micros()
    );
    let message = args.to_string();
    line.extend(
        message
            .chars()
            .map(|c| if c.is_control() && c != '\t' { ' ' } else { c }),
    );
    truncate_to_boundary(&mut line, MAX_LOG_LINE - 1);
    line
}

fn truncate_to_boundary(line: &mut String, max: usize) {
    if line.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|&i| line.is_char_boundary(i))
            .unwrap_or(0);
        line.truncate(cut);
    }
}

/// Spawns the thread that writes console-queue lines to `open_sink()` (retried per batch, so a
/// console that appears late is still used). Lines are lost while no sink can be opened.
pub fn spawn_console_writer<F, W>(mut open_sink: F) -> std::io::Result<()>
where
    F: FnMut() -> std::io::Result<W> + Send + 'static,
    W: std::io::Write,
{
    let Some(queue) = console_queue() else {
        return Ok(());
    };
    std::thread::Builder::new()
        .name("console-log".into())
        .spawn(move || {
            let mut sink: Option<W> = None;
            loop {
                let lines = queue.wait_take();
                if sink.is_none() {
                    sink = open_sink().ok();
                }
                if let Some(out) = sink.as_mut() {
                    let mut text = lines.join("\n");
                    text.push('\n');
                    if out.write_all(text.as_bytes()).is_err() {
                        sink = None;
                    }
                }
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_single_bounded_and_stamped() {
        let line = format_line(Level::Warn, format_args!("a\nb\rc\td"));
        assert!(line.starts_with('['), "{line}");
        assert!(line.ends_with("uvm-agent: WARN: a b c\td"), "{line}");
        let long = "é".repeat(MAX_LOG_LINE);
        let line = format_line(Level::Info, format_args!("{long}"));
        assert!(line.len() < MAX_LOG_LINE);
        assert!(line.ends_with('é'));
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_says_so() {
        let queue = LogQueue::new();
        for i in 0..QUEUE_LINES + 3 {
            queue.push(&format!("line {i}"));
        }
        let lines = queue.wait_take();
        assert_eq!(lines.len(), QUEUE_LINES + 1);
        assert!(lines[0].contains("3 log lines dropped"), "{}", lines[0]);
        assert_eq!(lines[1], "line 3");
        queue.disable();
        queue.push("ignored");
        assert!(queue.lock().lines.is_empty());
    }
}
