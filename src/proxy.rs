//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2), sans-IO: the
//! header a load balancer sends first on each connection it passes on, carrying the
//! client's address. [`parse`] takes the bytes received so far and says whether they hold
//! a whole header, need more, or can never be one; nothing here reads a socket or a clock.
//!
//! ```text
//!   bytes ─► parse ─┬─ NeedMore                  (a prefix of a header: read on)
//!                   ├─ Done { header, consumed } (bytes after `consumed` are the session's)
//!                   │     header: Proxied { source, destination, unique_id }
//!                   │           Local          (v2 LOCAL: the balancer's own health check)
//!                   │           Unknown        (v1 UNKNOWN, v2 AF_UNSPEC: no address carried)
//!                   └─ Invalid(why)            (never a header, whatever comes next)
//! ```
//!
//! Only a balancer the operator trusts (`[listen] proxy_protocol_from`) is asked for a
//! header; from anyone else a `PROXY` line is an unknown command like any other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 header, CRLF included (the specification's own bound).
pub const MAX_V1: usize = 107;
/// The longest v2 header accepted (its fixed 16 octets, addresses and TLVs): more than
/// any balancer sends (HAProxy's and the clouds' TLVs come to a few hundred octets).
pub const MAX_V2: usize = 1024;
/// The longest unique-id TLV (the specification's bound).
pub const MAX_UNIQUE_ID: usize = 128;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const PP2_TYPE_UNIQUE_ID: u8 = 0x05;

/// What a header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection: the client's address, and the address it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
        /// The balancer's unique id for the connection (v2 TLV 0x05), for the mail log.
        unique_id: Option<Vec<u8>>,
    },
    /// v2 LOCAL: the balancer speaking for itself (a health check).
    Local,
    /// v1 `UNKNOWN`, or v2 with no address family (or a UNIX one): no client address.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes so far begin a header: read more.
    NeedMore,
    /// A whole header, the first `consumed` bytes.
    Done { header: Header, consumed: usize },
    /// Not a header, and no more bytes can make it one.
    Invalid(HeaderFault),
}

/// Why bytes can never be a PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderFault {
    #[error("neither a v1 nor a v2 header")]
    NotAHeader,
    #[error("v1 header over 107 octets")]
    V1TooLong,
    #[error("v1 header not ending in CRLF")]
    V1NoCrlf,
    #[error("v1 header not ASCII")]
    V1NotAscii,
    #[error("v1 header without its five fields")]
    V1Fields,
    #[error("v1 TCP4 header with a bad IPv4 address")]
    V1BadIpv4,
    #[error("v1 TCP6 header with a bad IPv6 address")]
    V1BadIpv6,
    #[error("v1 header of an unknown family")]
    V1Family,
    #[error("v1 header with a bad port")]
    V1BadPort,
    #[error("v2 header of another version")]
    V2Version,
    #[error("v2 header over 1024 octets")]
    V2TooLong,
    #[error("v2 header with an unknown command")]
    V2Command,
    #[error("v2 header with an unknown family or protocol")]
    V2Family,
    #[error("v2 header shorter than its addresses")]
    V2Short,
    #[error("v2 header with a TLV past its end")]
    V2Tlv,
}

/// Parses the header at the start of `bytes`.
pub fn parse(bytes: &[u8]) -> Parsed {
    if starts_like(bytes, V1_PREFIX) {
        if bytes.len() < V1_PREFIX.len() {
            return Parsed::NeedMore;
        }
        return v1(bytes);
    }
    if starts_like(bytes, V2_SIGNATURE) {
        if bytes.len() < V2_SIGNATURE.len() {
            return Parsed::NeedMore;
        }
        return v2(bytes);
    }
    Parsed::Invalid(HeaderFault::NotAHeader)
}

/// `bytes` and `prefix` agree as far as both go.
fn starts_like(bytes: &[u8], prefix: &[u8]) -> bool {
    let n = bytes.len().min(prefix.len());
    bytes[..n] == prefix[..n]
}

/// `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`, `TCP6` likewise, `UNKNOWN ...\r\n`.
fn v1(bytes: &[u8]) -> Parsed {
    let window = &bytes[..bytes.len().min(MAX_V1)];
    let Some(lf) = memchr::memchr(b'\n', window) else {
        return if bytes.len() >= MAX_V1 { Parsed::Invalid(HeaderFault::V1TooLong) } else { Parsed::NeedMore };
    };
    let Some(line) = window[..lf].strip_suffix(b"\r") else {
        return Parsed::Invalid(HeaderFault::V1NoCrlf);
    };
    let consumed = lf + 1;
    let Ok(line) = std::str::from_utf8(&line[V1_PREFIX.len()..]) else {
        return Parsed::Invalid(HeaderFault::V1NotAscii);
    };
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or("");
    if family == "UNKNOWN" {
        // the rest of the line is to be ignored (the specification)
        return Parsed::Done { header: Header::Unknown, consumed };
    }
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Parsed::Invalid(HeaderFault::V1Fields);
    };
    let (source, destination) = match family {
        "TCP4" => match (src.parse::<Ipv4Addr>(), dst.parse::<Ipv4Addr>()) {
            (Ok(s), Ok(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
            _ => return Parsed::Invalid(HeaderFault::V1BadIpv4),
        },
        "TCP6" => match (src.parse::<Ipv6Addr>(), dst.parse::<Ipv6Addr>()) {
            (Ok(s), Ok(d)) => (IpAddr::V6(s), IpAddr::V6(d)),
            _ => return Parsed::Invalid(HeaderFault::V1BadIpv6),
        },
        _ => return Parsed::Invalid(HeaderFault::V1Family),
    };
    let (Some(sport), Some(dport)) = (port(sport), port(dport)) else {
        return Parsed::Invalid(HeaderFault::V1BadPort);
    };
    let header = Header::Proxied {
        source: SocketAddr::new(source, sport),
        destination: SocketAddr::new(destination, dport),
        unique_id: None,
    };
    Parsed::Done { header, consumed }
}

/// A decimal port, 0 to 65535, without a sign or leading zeros.
fn port(text: &str) -> Option<u16> {
    let canonical = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    if !canonical || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

/// The 12-octet signature, version and command, family and protocol, a 16-bit length,
/// then the addresses and TLVs.
fn v2(bytes: &[u8]) -> Parsed {
    let Some(fixed) = bytes.get(..16) else { return Parsed::NeedMore };
    let (version, command) = (fixed[12] >> 4, fixed[12] & 0x0f);
    if version != 2 {
        return Parsed::Invalid(HeaderFault::V2Version);
    }
    let (family, protocol) = (fixed[13] >> 4, fixed[13] & 0x0f);
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let consumed = 16 + len;
    if consumed > MAX_V2 {
        return Parsed::Invalid(HeaderFault::V2TooLong);
    }
    if command > 1 {
        return Parsed::Invalid(HeaderFault::V2Command);
    }
    if family > 3 || protocol > 2 {
        return Parsed::Invalid(HeaderFault::V2Family);
    }
    let address_len = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if len < address_len {
        return Parsed::Invalid(HeaderFault::V2Short);
    }
    let Some(body) = bytes.get(16..consumed) else { return Parsed::NeedMore };
    let Some(tlvs) = tlvs(&body[address_len..]) else {
        return Parsed::Invalid(HeaderFault::V2Tlv);
    };
    // LOCAL: the receiver uses the connection's own addresses, whatever follows
    if command == 0 {
        return Parsed::Done { header: Header::Local, consumed };
    }
    let (source, destination) = match family {
        1 => {
            let ip = |at: usize| IpAddr::from(<[u8; 4]>::try_from(&body[at..at + 4]).unwrap_or_default());
            (SocketAddr::new(ip(0), be16(body, 8)), SocketAddr::new(ip(4), be16(body, 10)))
        }
        2 => {
            let ip = |at: usize| IpAddr::from(<[u8; 16]>::try_from(&body[at..at + 16]).unwrap_or_default());
            (SocketAddr::new(ip(0), be16(body, 32)), SocketAddr::new(ip(16), be16(body, 34)))
        }
        // AF_UNSPEC and AF_UNIX carry no client address to judge
        _ => return Parsed::Done { header: Header::Unknown, consumed },
    };
    let unique_id = tlvs.unique_id.map(<[u8]>::to_vec);
    Parsed::Done { header: Header::Proxied { source, destination, unique_id }, consumed }
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

#[derive(Default)]
struct Tlvs<'a> {
    unique_id: Option<&'a [u8]>,
}

/// Walks the TLVs (type, 16-bit length, value); none may run past the header's end.
fn tlvs(mut rest: &[u8]) -> Option<Tlvs<'_>> {
    let mut found = Tlvs::default();
    while !rest.is_empty() {
        let (&kind, after) = rest.split_first()?;
        let len = usize::from(u16::from_be_bytes([*after.first()?, *after.get(1)?]));
        let value = after.get(2..2 + len)?;
        if kind == PP2_TYPE_UNIQUE_ID && len <= MAX_UNIQUE_ID {
            found.unique_id = Some(value);
        }
        rest = &after[2 + len..];
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loadtest::proxy::{v1_header, v2_header};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("an address")
    }

    fn proxied(source: &str, destination: &str) -> Header {
        Header::Proxied { source: addr(source), destination: addr(destination), unique_id: None }
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO x\r\n";
        assert_eq!(parse(line), Parsed::Done { header: proxied("192.0.2.1:56324", "198.51.100.2:25"), consumed: 44 });
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n";
        assert_eq!(
            parse(line),
            Parsed::Done { header: proxied("[2001:db8::1]:65535", "[2001:db8::2]:0"), consumed: 44 }
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parsed::Done { header: Header::Unknown, consumed: 15 });
        let unknown = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(parse(unknown), Parsed::Done { header: Header::Unknown, consumed: unknown.len() });
    }

    #[test]
    fn v1_needs_more_until_its_line_ends() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n";
        for n in 0..line.len() {
            assert_eq!(parse(&line[..n]), Parsed::NeedMore, "{n} octets");
        }
        assert!(matches!(parse(line), Parsed::Done { .. }));
    }

    #[test]
    fn v1_malformed() {
        for (line, why) in [
            (&b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n"[..], "bad port"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 056 25\r\n", "bad port"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 +56 25\r\n", "bad port"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\n", "CRLF"),
            (b"PROXY TCP4 192.0.2.1  198.51.100.2 56324 25\r\n", "five fields"),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n", "five fields"),
            (b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n", "IPv4"),
            (b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", "IPv6"),
            (b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n", "unknown family"),
            (b"PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n", "unknown family"),
            (b"EHLO client.test\r\n", "neither"),
            (b"PROXZ", "neither"),
        ] {
            match parse(line) {
                Parsed::Invalid(w) => assert!(w.to_string().contains(why), "{:?}: {w}", String::from_utf8_lossy(line)),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(line)),
            }
        }
        // 108 octets without a line end can never become a header; 107 with one is fine
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(MAX_V1 - 16));
        assert_eq!(long.len(), MAX_V1);
        assert!(matches!(parse(long.as_bytes()), Parsed::Done { consumed: MAX_V1, .. }));
        let longer = format!("PROXY UNKNOWN {}\r\n", "x".repeat(MAX_V1 - 15));
        assert_eq!(parse(longer.as_bytes()), Parsed::Invalid(HeaderFault::V1TooLong));
        assert_eq!(parse(&longer.as_bytes()[..MAX_V1]), Parsed::Invalid(HeaderFault::V1TooLong));
    }

    #[test]
    fn v2_inet_inet6_tlvs_local_and_unspec() {
        let header = v2_header(addr("192.0.2.1:56324"), addr("198.51.100.2:25"), &[]);
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"EHLO x\r\n");
        let done = Parsed::Done { header: proxied("192.0.2.1:56324", "198.51.100.2:25"), consumed: 28 };
        assert_eq!(parse(&bytes), done);
        for n in 0..header.len() {
            assert_eq!(parse(&header[..n]), Parsed::NeedMore, "{n} octets");
        }
        let header = v2_header(
            addr("[2001:db8::1]:1"),
            addr("[2001:db8::2]:2"),
            &[(0x01, b"h2"), (PP2_TYPE_UNIQUE_ID, b"id-1\x00"), (0xEA, b"vpce-0123")],
        );
        let Parsed::Done { header: Header::Proxied { source, unique_id, .. }, consumed } = parse(&header) else {
            panic!()
        };
        assert_eq!(
            (source, unique_id.as_deref(), consumed),
            (addr("[2001:db8::1]:1"), Some(&b"id-1\x00"[..]), header.len())
        );
        // LOCAL: the addresses (if any) are ignored
        let mut local = header.clone();
        local[12] = 0x20;
        assert_eq!(parse(&local), Parsed::Done { header: Header::Local, consumed: header.len() });
        // AF_UNSPEC with PROXY: no address carried
        let unspec = [&V2_SIGNATURE[..], &[0x21, 0x00, 0, 0]].concat();
        assert_eq!(parse(&unspec), Parsed::Done { header: Header::Unknown, consumed: 16 });
    }

    #[test]
    fn v2_malformed() {
        let good = v2_header(addr("192.0.2.1:56324"), addr("198.51.100.2:25"), &[(0x05, b"abc")]);
        let with = |at: usize, b: u8| {
            let mut h = good.clone();
            h[at] = b;
            h
        };
        for (bytes, why) in [
            (with(3, b'X'), "neither"),
            (with(12, 0x11), "another version"),
            (with(12, 0x22), "unknown command"),
            (with(13, 0x41), "unknown family"),
            (with(13, 0x13), "unknown family"),
            (with(15, 11), "shorter than its addresses"),
            (with(15, 16), "TLV past its end"),
            (with(14, 0x04), "over 1024"),
        ] {
            match parse(&bytes) {
                Parsed::Invalid(w) => assert!(w.to_string().contains(why), "{why}: {w}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        // a length past what was received is a truncated header: more is needed
        assert_eq!(parse(&good[..good.len() - 1]), Parsed::NeedMore);
    }

    proptest::proptest! {
        /// Any bytes: an answer, never a panic; a header's end within the bytes and the
        /// bounds; and more bytes never turn a verdict on a prefix into another.
        #[test]
        fn any_bytes_get_an_answer(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300), cut in 0usize..300) {
            let whole = parse(&bytes);
            if let Parsed::Done { consumed, .. } = whole {
                proptest::prop_assert!(consumed <= bytes.len() && consumed <= MAX_V2);
            }
            let prefix = parse(&bytes[..cut.min(bytes.len())]);
            if prefix != Parsed::NeedMore {
                proptest::prop_assert_eq!(prefix, whole);
            }
        }

        #[test]
        fn headers_written_are_read_back(a in proptest::num::u32::ANY, b in proptest::num::u128::ANY, p in proptest::num::u16::ANY, tail in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let v4 = SocketAddr::new(IpAddr::from(a.to_be_bytes()), p);
            let v6 = SocketAddr::new(IpAddr::from(b.to_be_bytes()), p);
            for (source, destination) in [(v4, v4), (v6, v6)] {
                let line = v1_header(source, destination);
                let mut bytes = line.clone().into_bytes();
                bytes.extend_from_slice(&tail);
                let header = Header::Proxied { source, destination, unique_id: None };
                proptest::prop_assert_eq!(parse(&bytes), Parsed::Done { header: header.clone(), consumed: line.len() });
                let v2 = v2_header(source, destination, &[]);
                let mut bytes = v2.clone();
                bytes.extend_from_slice(&tail);
                proptest::prop_assert_eq!(parse(&bytes), Parsed::Done { header, consumed: v2.len() });
            }
        }
    }
}
