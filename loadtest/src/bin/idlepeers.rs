//! `idlepeers PORT N`: opens N sessions to an SMTP server on 127.0.0.1:PORT, each from its
//! own source address in 127.88.0.0/16 and beyond, reads each banner and says EHLO, reads
//! its reply, then holds them all open and idle. Prints `ready N` once every session is
//! idle, then waits for its standard input to close (the script measures meanwhile) and
//! closes them. Exit status 1 when a session did not get its banner and EHLO reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

fn session(source: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("220 ") {
        return Err(std::io::Error::other(format!("{source}: no banner: {line:?}")));
    }
    stream.write_all(b"EHLO idle.test\r\n")?;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        match line.get(..4) {
            Some("250-") => continue,
            Some("250 ") => return Ok(stream),
            _ => return Err(std::io::Error::other(format!("{source}: EHLO answered {line:?}"))),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(port), Some(n)) = (args.get(1).and_then(|p| p.parse().ok()), args.get(2).and_then(|n| n.parse().ok()))
    else {
        eprintln!("usage: idlepeers PORT N");
        std::process::exit(2);
    };
    let n: u32 = n;
    let mut held = Vec::with_capacity(n as usize);
    for i in 0..n {
        // 127.88.0.1 onwards: a source address of its own for each session
        let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 88, 0, 1)) + i);
        match session(source, port) {
            Ok(s) => held.push(s),
            Err(e) => {
                eprintln!("session {i}: {e}");
                std::process::exit(1);
            }
        }
    }
    println!("ready {}", held.len());
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(held);
}
