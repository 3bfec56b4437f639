//! `genlist N [SEED]`: prints N random prefixes as access-list lines (bare entries),
//! for measuring mxgate with large lists.

use std::io::{BufWriter, Write};

fn main() {
    let mut args = std::env::args().skip(1);
    let parse = |a: Option<String>, default: Option<u64>| a.map_or(default, |s| s.parse().ok());
    let (Some(n), Some(seed)) = (parse(args.next(), None), parse(args.next(), Some(1))) else {
        eprintln!("usage: genlist N [SEED]");
        std::process::exit(2);
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    for p in loadtest::prefixes::random_prefixes(n as usize, seed) {
        if writeln!(out, "{p}").is_err() {
            std::process::exit(1);
        }
    }
    let _ = out.flush();
}
