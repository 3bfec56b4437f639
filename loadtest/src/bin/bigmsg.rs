//! `bigmsg PORT SESSIONS SIZE_MIB PID`: SESSIONS concurrent SMTP sessions to 127.0.0.1:PORT,
//! each from its own address in 127.88.0.0/16, each sending one message of SIZE_MIB MiB
//! to user@bench.test, all at once; meanwhile samples the resident memory of process
//! PID (the server). Prints `key=value` lines: ok, failed, seconds, peak_rss_kib (the
//! highest sample), vm_hwm_kib (the kernel's peak for the process).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed: Option<(u16, usize, usize, u32)> = (|| {
        Some((
            args.first()?.parse().ok()?,
            args.get(1)?.parse().ok()?,
            args.get(2)?.parse().ok()?,
            args.get(3)?.parse().ok()?,
        ))
    })();
    let Some((port, sessions, size_mib, pid)) = parsed else {
        eprintln!("usage: bigmsg PORT SESSIONS SIZE_MIB PID");
        std::process::exit(2);
    };
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    let line = [&[b'x'; 998][..], b"\r\n"].concat();
    let chunk: Arc<Vec<u8>> = Arc::new(line.iter().cycle().take(64 * 1000).copied().collect());
    let chunks = size_mib * 1024 * 1024 / chunk.len() + 1;

    let ok = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kib) = status_kib(pid, "VmRSS:") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let barrier = Arc::new(Barrier::new(sessions));
    let started = Instant::now();
    let workers: Vec<_> = (0..sessions)
        .map(|i| {
            let (barrier, chunk, ok) = (barrier.clone(), chunk.clone(), ok.clone());
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let source = SocketAddr::from(([127, 88, (i / 250) as u8, (i % 250 + 1) as u8], 0));
                    let result = session(source, target, &barrier, &chunk, chunks);
                    match result {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => eprintln!("session {i}: {e}"),
                    }
                })
                .expect("thread")
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let ok = ok.load(Ordering::Relaxed);
    println!("ok={ok}");
    println!("failed={}", sessions as u64 - ok);
    println!("seconds={:.1}", started.elapsed().as_secs_f64());
    println!("peak_rss_kib={}", peak.load(Ordering::Relaxed));
    println!("vm_hwm_kib={}", status_kib(pid, "VmHWM:").unwrap_or(0));
}

fn session(
    source: SocketAddr,
    target: SocketAddr,
    barrier: &Barrier,
    chunk: &[u8],
    chunks: usize,
) -> Result<(), String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
    socket.bind(&source.into()).map_err(|e| format!("bind {source}: {e}"))?;
    let connected = socket.connect(&target.into());
    // every session connects first, then all send at once
    barrier.wait();
    connected.map_err(|e| format!("connect: {e}"))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(300))).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    let mut expect = |want: &str| -> Result<(), String> {
        let mut reply = String::new();
        loop {
            reply.clear();
            reader.read_line(&mut reply).map_err(|e| e.to_string())?;
            if reply.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        if reply.starts_with(want) { Ok(()) } else { Err(format!("expected {want}, got {reply:?}")) }
    };
    expect("220")?;
    let say = |w: &mut TcpStream, s: &[u8]| w.write_all(s).map_err(|e| e.to_string());
    say(&mut writer, b"EHLO load.test\r\n")?;
    expect("250")?;
    say(&mut writer, b"MAIL FROM:<load@load.test>\r\n")?;
    expect("250")?;
    say(&mut writer, b"RCPT TO:<user@bench.test>\r\n")?;
    expect("250")?;
    say(&mut writer, b"DATA\r\n")?;
    expect("354")?;
    for _ in 0..chunks {
        say(&mut writer, chunk)?;
    }
    say(&mut writer, b".\r\n")?;
    expect("250")?;
    say(&mut writer, b"QUIT\r\n")?;
    expect("221")
}

/// A `Vm*:` field of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}
