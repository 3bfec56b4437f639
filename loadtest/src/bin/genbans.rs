//! `genbans N CIDR`: prints a ban file of N bans in force for a year: every address of
//! the IPv4 prefix CIDR (the load's source addresses), then random other addresses.

use std::io::{BufWriter, Write};
use std::net::Ipv4Addr;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: Option<usize> = args.next().and_then(|a| a.parse().ok());
    let cidr = args.next().and_then(|c| {
        let (addr, len) = c.split_once('/')?;
        Some((addr.parse::<Ipv4Addr>().ok()?, len.parse::<u32>().ok().filter(|l| (8..=32).contains(l))?))
    });
    let (Some(n), Some((addr, len))) = (n, cidr) else {
        eprintln!("usage: genbans N A.B.C.D/LEN (LEN 8..32)");
        std::process::exit(2);
    };
    let until = "2100-01-01T00:00:00Z";
    let base = u32::from(addr) & (u32::MAX << (32 - len));
    let size = 1u64 << (32 - len);
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut rng = loadtest::prefixes::Rng::new(7);
    let mut written = 0;
    let mut emit = |a: u32| writeln!(out, "{} until={until} reason=\"bench\" offence=1", Ipv4Addr::from(a));
    for i in 0..size.min(n as u64) {
        if emit(base + i as u32).is_err() {
            std::process::exit(1);
        }
        written += 1;
    }
    while written < n {
        let a = rng.next_u64() as u32;
        if a & (u32::MAX << (32 - len)) == base {
            continue;
        }
        if emit(a).is_err() {
            std::process::exit(1);
        }
        written += 1;
    }
}
