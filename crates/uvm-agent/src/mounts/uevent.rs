//! The kernel's device events (`NETLINK_KOBJECT_UEVENT`): what the wait for a disk wakes on.
//! Nothing here interprets an event beyond its action and subsystem: a waiter looks at `/sys`
//! again after each one, so a missed or merged event costs nothing but a look.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use nix::sys::socket::{
    bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use tokio::io::unix::AsyncFd;

/// The kernel's multicast group of uevents (udev listens on group 2, for its own re-sends).
const KERNEL_GROUP: u32 = 1;
/// One uevent is at most a page or two of `KEY=value` lines.
const MAX_EVENT: usize = 8192;

/// A subscription to the kernel's uevents, opened before the first look at `/sys` so that
/// nothing that happens after that look goes unseen.
#[derive(Debug)]
pub(crate) struct Uevents {
    fd: AsyncFd<OwnedFd>,
}

/// One event, as far as a waiter cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Uevent {
    /// `add`, `remove`, `change`, `bind`, …
    pub action: String,
    /// `block`, `scsi`, `virtio`, … (empty when the event has none).
    pub subsystem: String,
    /// The device node's name (`sdb`), for devices that have one; else empty.
    pub devname: String,
    /// The bound driver (`virtiofs`, on a `bind`), else empty.
    pub driver: String,
}

impl Uevents {
    /// Subscribes (non-blocking, close-on-exec). Must be called inside the runtime.
    pub(crate) fn open() -> io::Result<Uevents> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
        Ok(Uevents {
            fd: crate::process::register_fd(fd, tokio::io::Interest::READABLE)?,
        })
    }

    /// The next event, or `None` once `deadline` passed. An overflowed socket (`ENOBUFS`: events
    /// were dropped) counts as an event: the waiter looks again.
    pub(crate) async fn next(&self, deadline: Instant) -> io::Result<Option<Uevent>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut buf = vec![0u8; MAX_EVENT];
        loop {
            let mut ready = match tokio::time::timeout_at(deadline, self.fd.readable()).await {
                Ok(r) => r?,
                Err(_) => return Ok(None),
            };
            match recv(
                self.fd.get_ref().as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => return Ok(Some(parse(&buf[..n]))),
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(nix::errno::Errno::ENOBUFS) => return Ok(Some(Uevent::named("overflow", ""))),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Uevent {
    fn named(action: &str, subsystem: &str) -> Uevent {
        Uevent {
            action: action.to_owned(),
            subsystem: subsystem.to_owned(),
            devname: String::new(),
            driver: String::new(),
        }
    }
}

/// `action@devpath\0KEY=value\0…`.
fn parse(msg: &[u8]) -> Uevent {
    let mut event = Uevent::named("", "");
    for field in msg.split(|b| *b == 0).map(String::from_utf8_lossy) {
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        let slot = match key {
            "ACTION" => &mut event.action,
            "SUBSYSTEM" => &mut event.subsystem,
            "DEVNAME" => &mut event.devname,
            "DRIVER" => &mut event.driver,
            _ => continue,
        };
        value.clone_into(slot);
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_gives_its_action_and_subsystem() {
        let msg = b"add@/devices/pci0000:00/0000:00:10.0/virtio2/host0/target0:0:0/0:0:0:1/block/sdb\0\
ACTION=add\0DEVPATH=/devices/.../block/sdb\0SUBSYSTEM=block\0MAJOR=8\0MINOR=16\0DEVNAME=sdb\0SEQNUM=1234\0";
        assert_eq!(
            parse(msg),
            Uevent {
                devname: "sdb".into(),
                ..Uevent::named("add", "block")
            }
        );
        let bind =
            parse(b"bind@/devices/x/virtio3\0ACTION=bind\0SUBSYSTEM=virtio\0DRIVER=virtiofs\0");
        assert_eq!(
            (bind.action.as_str(), bind.driver.as_str()),
            ("bind", "virtiofs")
        );
        assert_eq!(parse(b"").action, "");
    }

    #[tokio::test]
    async fn a_subscription_opens_and_times_out_without_events() {
        // Unprivileged processes may listen to the kernel's uevents.
        let events = Uevents::open().expect("uevent socket");
        let deadline = Instant::now() + std::time::Duration::from_millis(20);
        // Another engineer's VM may plug something meanwhile; either answer is fine, an error is not.
        events.next(deadline).await.expect("no error");
    }
}
