//! `denyfloor PORT direct|read [THREADS]`: the least a server can do to refuse a
//! connection, for a yardstick of what a PROXY header's read costs on this machine.
//! `direct`: accept, write one deny line, close. `read`: accept, wait until the socket is
//! readable, read what came (a PROXY header, unparsed), then the same line and close.
//! One epoll loop per thread on 127.0.0.1:PORT (SO_REUSEPORT), no allocation per
//! connection; it runs until killed. `loadtest/proxy-floor.sh` drives it.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LINE: &[u8] = b"530 5.7.1 floor ESMTP denied access\r\n";
const LISTENER: Token = Token(usize::MAX);

fn serve(port: u16, read_first: bool) -> std::io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM.nonblocking(), None)?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(4096)?;
    let mut listener = TcpListener::from_std(socket.into());
    let mut poll = Poll::new()?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut waiting: slab::Slab<TcpStream> = slab::Slab::with_capacity(4096);
    let mut buf = [0u8; 1024];
    loop {
        poll.poll(&mut events, Some(Duration::from_secs(1)))?;
        for event in &events {
            if event.token() == LISTENER {
                while let Ok((mut stream, _)) = listener.accept() {
                    if !read_first {
                        let _ = stream.write(LINE);
                        continue; // dropped: closed
                    }
                    let entry = waiting.vacant_entry();
                    if poll.registry().register(&mut stream, Token(entry.key()), Interest::READABLE).is_ok() {
                        entry.insert(stream);
                    }
                }
                continue;
            }
            let key = event.token().0;
            if let Some(stream) = waiting.get_mut(key) {
                match stream.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Ok(n) if n > 0 => {
                        let _ = stream.write(LINE);
                    }
                    _ => {}
                }
                let mut stream = waiting.remove(key);
                let _ = poll.registry().deregister(&mut stream);
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(port), Some(mode)) = (args.get(1).and_then(|p| p.parse::<u16>().ok()), args.get(2)) else {
        eprintln!("usage: denyfloor PORT direct|read [THREADS]");
        std::process::exit(2);
    };
    let read_first = match mode.as_str() {
        "direct" => false,
        "read" => true,
        _ => {
            eprintln!("denyfloor: the mode is direct or read");
            std::process::exit(2);
        }
    };
    let threads: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(2);
    let workers: Vec<_> = (0..threads).map(|_| std::thread::spawn(move || serve(port, read_first))).collect();
    for w in workers {
        if let Ok(Err(e)) = w.join() {
            eprintln!("denyfloor: {e}");
            std::process::exit(1);
        }
    }
}
