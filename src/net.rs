//! Socket options for client and backend connections, and listener creation (socket2).

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};

/// Opens a listening socket with SO_REUSEADDR (restart without waiting out TIME_WAIT).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3)
}

/// Client sockets: no Nagle delay (the protocol is request/response), keepalive so vanished
/// clients are noticed and their backends freed.
pub fn tune_client(stream: &TcpStream) {
    let sock = SockRef::from(stream);
    if let Err(e) = sock.set_tcp_nodelay(true).and_then(|_| sock.set_tcp_keepalive(&keepalive())) {
        tracing::debug!(error = %e, "cannot set client socket options");
    }
}

/// Backend sockets: no Nagle delay, keepalive, and a user timeout so a primary that vanishes
/// without a FIN/RST is detected in seconds rather than after minutes of retransmissions.
pub fn tune_backend(stream: &TcpStream) {
    let sock = SockRef::from(stream);
    let result = sock
        .set_tcp_nodelay(true)
        .and_then(|_| sock.set_tcp_keepalive(&keepalive()))
        .and_then(|_| sock.set_tcp_user_timeout(Some(Duration::from_secs(30))));
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot set backend socket options");
    }
}
