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

/// `GET path` over HTTP/1.1 from `addr` (a scrape of mxgate's metrics): the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text.split_once("\r\n\r\n").map_or(text.clone(), |(_, body)| body.to_owned()))
}
