//! `idlepeers PORT N [ROOT.pem NAME]`: opens N sessions to an SMTP server on
//! 127.0.0.1:PORT, each from its own source address in 127.88.0.0/16 and beyond, reads
//! each banner and says EHLO, reads its reply, then holds them all open and idle. With a
//! root certificate and the server's name, each session first says STARTTLS, completes
//! a full TLS 1.3 handshake (the server's certificate checked against ROOT.pem for NAME) and says
//! EHLO again under TLS. Prints `ready N` once every session is idle, then waits for its
//! standard input to close (the script measures meanwhile) and closes them. Exit status 1
//! when a session did not get its banner, its EHLO reply or its handshake.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use loadtest::tls::{TlsClient, read_root};

/// A session held open: in clear, or under TLS.
#[allow(dead_code, reason = "held only to keep the connection open")]
enum Held {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// Reads one reply (all its lines); true when its code is `code`.
fn reply(reader: &mut impl BufRead, code: &str) -> std::io::Result<bool> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(false);
        }
        if line.get(..3) != Some(code) {
            return Ok(false);
        }
        if line.as_bytes().get(3) == Some(&b' ') {
            return Ok(true);
        }
    }
}

fn starttls(stream: TcpStream, tls: &TlsClient) -> std::io::Result<Held> {
    let mut stream = stream;
    stream.write_all(b"STARTTLS\r\n")?;
    let mut reader = BufReader::new(stream.try_clone()?);
    if !reply(&mut reader, "220")? {
        return Err(std::io::Error::other("STARTTLS refused"));
    }
    let conn =
        rustls::ClientConnection::new(Arc::clone(&tls.config), tls.name.clone()).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    tls.write_all(b"EHLO idle.test\r\n")?;
    if !reply(&mut BufReader::new(&mut tls), "250")? {
        return Err(std::io::Error::other("EHLO under TLS refused"));
    }
    Ok(Held::Tls(Box::new(tls)))
}

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
    let tls = match (args.get(3), args.get(4)) {
        // a full handshake for each session
        (Some(root), Some(name)) => {
            match read_root(std::path::Path::new(root)).and_then(|r| TlsClient::new(r, name, false)) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    eprintln!("idlepeers: {e}");
                    std::process::exit(2);
                }
            }
        }
        _ => None,
    };
    let mut held = Vec::with_capacity(n as usize);
    for i in 0..n {
        // 127.88.0.1 onwards: a source address of its own for each session
        let source = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 88, 0, 1)) + i);
        let opened = session(source, port).and_then(|s| match &tls {
            Some(tls) => starttls(s, tls),
            None => Ok(Held::Plain(s)),
        });
        match opened {
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
