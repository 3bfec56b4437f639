//! `rcptflood MXPORT SECONDS [FLOODERS]`: peers flooding RCPT while the next hop sits on
//! their MAIL. Runs the next hop itself (loadtest::stallhop) on 127.0.0.1:HOP_PORT
//! (environment, default 2751), which the mxgate on 127.0.0.1:MXPORT must relay to.
//! FLOODERS peers (default 2) say EHLO and MAIL, wait for the MAIL at the hop, then send
//! RCPT lines for SECONDS, one line a write (each read then ends at a line's end); all
//! along, a fresh peer connects every 100 ms and times its banner. Then the hop answers.
//!
//! Prints the RCPTs sent, the banner waits (ms: p50, p99, max) and what each flooder got
//! after the release (replies, 452s, whether it was dropped with 421).

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use loadtest::probe::{connect, line};
use loadtest::stallhop::{StallingHop, drip_rcpts};

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().unwrap_or(u64::MAX)).collect();
    let (Some(&port), Some(&seconds)) = (args.first(), args.get(1)) else {
        eprintln!("usage: rcptflood MXPORT SECONDS [FLOODERS]");
        std::process::exit(2);
    };
    let flooders = args.get(2).copied().unwrap_or(2);
    if port > 65_535 || seconds > 600 || flooders > 64 {
        eprintln!("rcptflood: MXPORT, SECONDS (at most 600), FLOODERS (at most 64)");
        std::process::exit(2);
    }
    if let Err(e) = run(port as u16, Duration::from_secs(seconds), flooders as u8) {
        eprintln!("rcptflood: {e}");
        std::process::exit(1);
    }
}

fn run(port: u16, seconds: Duration, flooders: u8) -> std::io::Result<()> {
    let hop_port = std::env::var("HOP_PORT").unwrap_or_else(|_| "2751".into());
    let hop = StallingHop::start(&format!("127.0.0.1:{hop_port}"))?;
    let mut peers = Vec::new();
    for i in 0..flooders {
        let mut r = connect(Ipv4Addr::new(127, 0, 13, i + 1), port)?;
        line(&mut r)?;
        r.get_mut().write_all(b"EHLO flood.test\r\n")?;
        while !line(&mut r)?.starts_with("250 ") {}
        r.get_mut().write_all(b"MAIL FROM:<flood@flood.test>\r\n")?;
        peers.push(r);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while hop.mails() < usize::from(flooders) {
        if Instant::now() > deadline {
            return Err(std::io::Error::other("the MAILs never reached the next hop"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let until = Instant::now() + seconds;
    let threads: Vec<_> = peers
        .into_iter()
        .map(|mut r| {
            std::thread::spawn(move || {
                let sent = drip_rcpts(r.get_mut(), until, Duration::from_micros(100));
                (r, sent)
            })
        })
        .collect();
    let mut waits = Vec::new();
    while Instant::now() < until {
        let asked = Instant::now();
        let mut r = connect(Ipv4Addr::new(127, 0, 13, 200), port)?;
        if line(&mut r)?.starts_with("220") {
            waits.push(asked.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    waits.sort_by(f64::total_cmp);
    let at = |q: f64| waits.get(((waits.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(f64::NAN);
    println!("banner_ms n={} p50={:.2} p99={:.2} max={:.2}", waits.len(), at(0.5), at(0.99), at(1.0));
    hop.release();
    for t in threads {
        let (mut r, sent) = t.join().map_err(|_| std::io::Error::other("a flooder panicked"))?;
        let _ = r.get_mut().set_read_timeout(Some(Duration::from_secs(10)));
        let mut got = String::new();
        let _ = r.read_to_string(&mut got);
        let replies = got.lines().count();
        let refused = got.lines().filter(|l| l.starts_with("452")).count();
        let dropped = got.lines().last().is_some_and(|l| l.starts_with("421"));
        println!("flooder rcpts_sent={sent} replies_after_release={replies} too_many_452={refused} dropped={dropped}");
    }
    Ok(())
}
