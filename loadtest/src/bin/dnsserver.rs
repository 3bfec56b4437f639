//! `dnsserver PORT [LISTED_PREFIX ...]`: a DNS blocklist server on 127.0.0.1:PORT (UDP)
//! for the screening benchmarks: an A query for an IPv4 address's reversed octets under
//! any zone is answered 127.0.0.2 (TTL 3600) when the address is in a listed prefix,
//! NXDOMAIN otherwise. One thread; it runs until killed.

use std::net::{Ipv4Addr, UdpSocket};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};

/// The address a blocklist name asks about: its first four labels, reversed.
fn asked(name: &str) -> Option<Ipv4Addr> {
    let mut labels = name.split('.');
    let mut octets = [0u8; 4];
    for i in (0..4).rev() {
        octets[i] = labels.next()?.parse().ok()?;
    }
    Some(Ipv4Addr::from(octets))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(port) = args.get(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: dnsserver PORT [LISTED_PREFIX ...]");
        std::process::exit(2);
    };
    let listed: Vec<(u32, u32)> = args[2..]
        .iter()
        .filter_map(|p| {
            let (ip, len) = p.split_once('/').unwrap_or((p, "32"));
            let (ip, len): (Ipv4Addr, u32) = (ip.parse().ok()?, len.parse().ok()?);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len.min(32)) };
            Some((u32::from(ip) & mask, mask))
        })
        .collect();
    let socket = match UdpSocket::bind(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dnsserver: {e}");
            std::process::exit(1);
        }
    };
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
        let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
        let Some(q) = query.queries().first() else { continue };
        let mut reply = Message::new();
        reply.set_id(query.id()).set_message_type(MessageType::Response).set_recursion_available(true);
        reply.add_query(q.clone());
        let name = q.name().to_ascii();
        let hit = asked(&name).is_some_and(|ip| listed.iter().any(|(net, mask)| u32::from(ip) & mask == *net));
        if hit {
            reply.add_answer(Record::from_rdata(q.name().clone(), 3600, RData::A(A(Ipv4Addr::new(127, 0, 0, 2)))));
        } else {
            reply.set_response_code(ResponseCode::NXDomain);
        }
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, from);
        }
    }
}
