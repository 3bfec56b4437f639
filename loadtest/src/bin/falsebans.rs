//! `falsebans PORT ADDRESSES FAILURES [FRESH] [ABUSERS] [THREADS]`: does a spread attack
//! get innocent addresses banned? Against an mxgate on 127.0.0.1:PORT whose
//! `failure_threshold` is FAILURES + 1:
//!  1. ADDRESSES addresses from 127.16.0.0 on each hold one conversation failing FAILURES
//!     times (none reaches the threshold);
//!  2. FRESH addresses (default 10,000) from 127.200.0.0 fail once each (a mistyped
//!     recipient);
//!  3. ABUSERS addresses (default 1,000) from 127.220.0.0 on, each in a /24 of its own,
//!     fail FAILURES + 1 times each;
//!  4. every address of the three is asked again: how many are refused (`530`).
//!
//! Prints one line: the attack's rate and time, and how many of each group were banned
//! (0 of the attackers and of the fresh ones, all of the abusers, with exact counting).

use std::net::Ipv4Addr;
use std::time::Instant;

use loadtest::spread::{Range, attack, count_refused};

const ATTACKERS: Ipv4Addr = Ipv4Addr::new(127, 16, 0, 0);
const FRESH: Ipv4Addr = Ipv4Addr::new(127, 200, 0, 0);
const ABUSERS: Ipv4Addr = Ipv4Addr::new(127, 220, 0, 0);

fn main() {
    let args: Vec<u32> = std::env::args().skip(1).map(|a| a.parse().unwrap_or(u32::MAX)).collect();
    let (Some(&port), Some(&addresses), Some(&failures)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("usage: falsebans PORT ADDRESSES FAILURES [FRESH] [ABUSERS] [THREADS]");
        std::process::exit(2);
    };
    let (fresh, abusers) = (args.get(3).copied().unwrap_or(10_000), args.get(4).copied().unwrap_or(1_000));
    let threads = args.get(5).copied().unwrap_or(32);
    if port > u32::from(u16::MAX) || addresses > 12_000_000 || fresh > 300_000 || abusers > 60_000 || failures > 19 {
        eprintln!("falsebans: PORT, ADDRESSES (at most 12,000,000), FAILURES (at most 19), FRESH, ABUSERS");
        std::process::exit(2);
    }
    let port = port as u16;
    let attackers = Range { first: ATTACKERS, stride: 1, count: addresses };
    let fresh_ones = Range { first: FRESH, stride: 1, count: fresh };
    let abusing = Range { first: ABUSERS, stride: 256, count: abusers };
    let run = || -> std::io::Result<()> {
        let started = Instant::now();
        let met = attack(attackers, failures as usize, port, threads)?;
        let attack_s = started.elapsed().as_secs_f64();
        attack(fresh_ones, 1, port, threads)?;
        attack(abusing, failures as usize + 1, port, threads)?;
        let asked = Instant::now();
        let attackers_banned = count_refused(attackers, port, threads)?;
        let fresh_banned = count_refused(fresh_ones, port, threads)?;
        let abusers_banned = count_refused(abusing, port, threads)?;
        println!(
            "falsebans addresses={addresses} failures_each={failures} attack_s={attack_s:.1} \
             conversations_per_s={:.0} met_a_ban_while_attacking={met} attackers_banned={attackers_banned} \
             fresh_banned={fresh_banned}/{fresh} abusers_banned={abusers_banned}/{abusers} asking_s={:.1}",
            f64::from(addresses) / attack_s,
            asked.elapsed().as_secs_f64()
        );
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("falsebans: {e}");
        std::process::exit(1);
    }
}
