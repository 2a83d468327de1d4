//! The local terminal of `uvmctl run -t`: raw mode while the guest's terminal is in charge of
//! echo, line editing and signals (Ctrl-C reaches the guest process, not uvmctl), and the
//! window size the guest's terminal follows.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::pty::OpenptFlags;
use rustix::termios::{self, OptionalActions, Termios};
use uvm::seams::TerminalSize;

/// A terminal in raw mode until this is dropped, which restores its previous mode.
#[derive(Debug)]
pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal on `fd` into raw mode; `Ok(None)` when `fd` is not a terminal.
    pub fn enter(fd: BorrowedFd<'_>) -> std::io::Result<Option<RawMode>> {
        if !termios::isatty(fd) {
            return Ok(None);
        }
        // Everything that can fail comes before the switch: once raw, the guard exists.
        let fd = fd.try_clone_to_owned()?;
        let saved = termios::tcgetattr(&fd)?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&fd, OptionalActions::Now, &raw)?;
        Ok(Some(RawMode { fd, saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // `Now`, not `Drain`: a terminal nobody reads would block the drain (and the teardown
        // after it), and a signal interrupting it would leave the terminal raw.
        let _ = termios::tcsetattr(self.fd.as_fd(), OptionalActions::Now, &self.saved);
    }
}

/// The window size of the terminal on `fd`; `None` when it is not a terminal or reports no size.
pub fn size_of(fd: BorrowedFd<'_>) -> Option<TerminalSize> {
    if !termios::isatty(fd) {
        return None;
    }
    let ws = termios::tcgetwinsize(fd).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some(TerminalSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// A new pseudo-terminal pair (master, slave), both close-on-exec and neither our controlling
/// terminal: for driving `uvmctl run -t` from a program, as the tests do.
pub fn pty_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags)?;
    Ok((master, slave))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pty() -> (OwnedFd, OwnedFd) {
        pty_pair().expect("a pty pair")
    }

    fn canonical(fd: BorrowedFd<'_>) -> bool {
        termios::tcgetattr(fd)
            .expect("tcgetattr")
            .local_modes
            .contains(
                termios::LocalModes::ICANON | termios::LocalModes::ECHO | termios::LocalModes::ISIG,
            )
    }

    #[test]
    fn raw_mode_lasts_until_dropped_and_then_the_old_mode_is_back() {
        let (_master, slave) = pty();
        assert!(canonical(slave.as_fd()));
        let raw = RawMode::enter(slave.as_fd())
            .expect("enter")
            .expect("a tty");
        let modes = termios::tcgetattr(slave.as_fd())
            .expect("tcgetattr")
            .local_modes;
        assert!(!modes.intersects(
            termios::LocalModes::ICANON | termios::LocalModes::ECHO | termios::LocalModes::ISIG
        ));
        drop(raw);
        assert!(canonical(slave.as_fd()));
    }

    #[test]
    fn a_pipe_is_not_a_terminal_and_has_no_size() {
        let (r, _w) = rustix::pipe::pipe().expect("pipe");
        assert!(RawMode::enter(r.as_fd()).expect("no error").is_none());
        assert_eq!(size_of(r.as_fd()), None);
    }

    #[test]
    fn the_size_is_the_terminals_window_size() {
        let (master, slave) = pty();
        let ws = termios::Winsize {
            ws_row: 33,
            ws_col: 77,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        termios::tcsetwinsize(&master, ws).expect("set size");
        assert_eq!(
            size_of(slave.as_fd()),
            Some(TerminalSize { rows: 33, cols: 77 })
        );
    }
}
