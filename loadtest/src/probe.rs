//! Blocking one-connection probes for the small measuring tools (banlatency,
//! fleetattack): a connection from a chosen loopback source, and its replies line by line.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// A connection from `source` to 127.0.0.1:`port`, reading with a 5 s timeout.
pub fn connect(source: Ipv4Addr, port: u16) -> std::io::Result<BufReader<TcpStream>> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(BufReader::new(stream))
}

/// The next line (empty at the end).
pub fn line(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut l = String::new();
    r.read_line(&mut l)?;
    Ok(l)
}
