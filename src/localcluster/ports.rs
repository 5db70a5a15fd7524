//! Free TCP ports for the servers and proxies a process starts.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::Mutex;

use super::{io_err, lock, ClusterError, Result};

/// Picks a TCP port on 127.0.0.1 that nothing is bound to, for a server this process (or a
/// child it starts) is about to bind.
///
/// The port is free only when probed; what matters is that nobody takes it before the server
/// binds it. Two measures make that unlikely:
/// - Ports handed out are remembered for the life of the process, so two clusters or proxies
///   in one test process never receive the same port, even after a node stopped (restarts
///   reuse a node's port).
/// - Ports come from below the kernel's ephemeral range when there is room. A port from that
///   range can be handed by the kernel to any `bind(…:0)` or outgoing connection in the
///   meantime, and the test suite does many of both in parallel; a port below it is taken only
///   by someone asking for it by number.
///
/// A collision with another process is still possible; servers started here retry on
/// another port when theirs is taken.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = lock(&HANDED_OUT);
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    let probe = |port: u16| -> Result<Option<u16>> {
        match TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)) {
            Ok(l) => Ok(Some(
                l.local_addr()
                    .map_err(io_err("reading the address of a probe socket"))?
                    .port(),
            )),
            Err(e) if port != 0 && e.kind() == io::ErrorKind::AddrInUse => Ok(None),
            Err(e) => Err(io_err("binding 127.0.0.1 to find a free port")(e)),
        }
    };
    if let Some((low, high)) = non_ephemeral_ports() {
        let span = u32::from(high - low) + 1;
        let start = rand::random::<u32>() % span;
        for i in 0..span {
            let port = (u32::from(low) + (start + i) % span) as u16;
            if !handed_out.contains(&port) && probe(port)?.is_some() {
                handed_out.insert(port);
                return Ok(port);
            }
        }
    }
    for _ in 0..1000 {
        if let Some(port) = probe(0)? {
            if handed_out.insert(port) {
                return Ok(port);
            }
        }
    }
    Err(ClusterError::Invalid(
        "could not find an unused TCP port on 127.0.0.1".into(),
    ))
}

/// A range of ports just below the kernel's ephemeral range (`ip_local_port_range`), or
/// `None` when that range starts too low to leave room.
fn non_ephemeral_ports() -> Option<(u16, u16)> {
    const WANTED: u16 = 8000;
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let ephemeral_low: u16 = text.split_whitespace().next()?.parse().ok()?;
    let high = ephemeral_low.checked_sub(1)?;
    let low = ephemeral_low.checked_sub(WANTED)?;
    (low >= 10_000).then_some((low, high))
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    /// Ports handed out are bindable, never repeat within the process (even across
    /// threads), and stay out of the kernel's ephemeral range when there is room below it.
    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let handles: Vec<_> = (0..4)
            .map(|_| thread::spawn(|| (0..50).map(|_| free_port().expect("free port")).collect::<Vec<u16>>()))
            .collect();
        let ports: Vec<u16> = handles.into_iter().flat_map(|h| h.join().expect("thread")).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        if let Some((low, high)) = non_ephemeral_ports() {
            assert!(ports.iter().all(|p| (low..=high).contains(p)), "{ports:?} not all in {low}-{high}");
        }
        for port in ports.iter().take(20) {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, *port)).expect("handed-out port binds");
        }
    }
}
