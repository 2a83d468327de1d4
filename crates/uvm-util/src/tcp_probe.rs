//! A TCP measuring protocol both ends of a benchmark speak: the server runs in a guest
//! (`uvm-agent probe tcp-serve PORT`) or in a network namespace, the client on the host.
//!
//! A connection's first byte picks its mode: `e` echoes every byte back until EOF (round
//! trips, one byte each way, `TCP_NODELAY`); `s` reads until EOF and answers the byte count
//! (8 bytes, little-endian) before closing (throughput, counted from the first byte to the
//! answer, so the receiver's buffer is drained too).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Serves connections on `listener` until it fails, each on a thread of its own.
///
/// # Errors
/// Accepting failed.
pub fn serve(listener: &TcpListener) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept()?;
        std::thread::spawn(move || {
            let _ = serve_one(stream);
        });
    }
}

/// Serves one connection in the mode its first byte names.
///
/// # Errors
/// The connection failed, or named no mode.
pub fn serve_one(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode)?;
    match mode[0] {
        b'e' => {
            let mut buf = [0u8; 4096];
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                stream.write_all(&buf[..n])?;
            }
        }
        b's' => {
            let mut buf = vec![0u8; 1 << 16];
            let mut total: u64 = 0;
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_all(&total.to_le_bytes())
        }
        other => Err(io::Error::other(format!("unknown mode {other:#x}"))),
    }
}

/// `n` one-byte round trips on a new connection to `addr`; each one's time.
///
/// # Errors
/// The connection failed or the echo was wrong.
pub fn round_trips(addr: std::net::SocketAddr, n: usize) -> io::Result<Vec<Duration>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"e")?;
    let mut out = Vec::with_capacity(n);
    let mut byte = [0u8; 1];
    for i in 0..n {
        let sent = [(i % 251) as u8];
        let t = Instant::now();
        s.write_all(&sent)?;
        s.read_exact(&mut byte)?;
        out.push(t.elapsed());
        if byte != sent {
            return Err(io::Error::other("the echo differs"));
        }
    }
    Ok(out)
}

/// Sends `bytes` on a new connection to `addr`; MiB per second, counted until the server
/// confirmed the count.
///
/// # Errors
/// The connection failed or the count came back wrong.
pub fn throughput(addr: std::net::SocketAddr, bytes: u64) -> io::Result<f64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(b"s")?;
    let chunk = vec![0x5au8; 1 << 16];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    let secs = t.elapsed().as_secs_f64();
    if u64::from_le_bytes(count) != bytes {
        return Err(io::Error::other("the server counted another size"));
    }
    Ok(bytes as f64 / f64::from(1u32 << 20) / secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_throughput_work_against_the_server_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || serve(&listener));
        let rtts = round_trips(addr, 20).expect("round trips");
        assert_eq!(rtts.len(), 20);
        let mib_s = throughput(addr, 3 << 20).expect("throughput");
        assert!(mib_s > 0.0);
    }
}
