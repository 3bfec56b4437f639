//! A DNS server for the tests, in process, on 127.0.0.1 (UDP): it answers A queries from
//! its own table (NXDOMAIN otherwise), or stays silent, and counts what it was asked. No
//! outside resolver is ever asked.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Honest,
    Silent,
    /// Answers come from another port than the one asked.
    FromAnotherPort,
    /// Answers carry another id than the query's.
    WrongId,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    records: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    mode: Arc<Mutex<Mode>>,
    asked: Arc<AtomicUsize>,
    /// The source port of each query, in order.
    ports: Arc<Mutex<Vec<u16>>>,
    stop: Arc<AtomicBool>,
}

impl DnsServer {
    pub fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the DNS server");
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let addr = socket.local_addr().expect("address");
        let records: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>> = Arc::default();
        let mode = Arc::new(Mutex::new(Mode::Honest));
        let (asked, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let ports: Arc<Mutex<Vec<u16>>> = Arc::default();
        let (r, md, a, st, p) = (records.clone(), mode.clone(), asked.clone(), stop.clone(), ports.clone());
        let other = UdpSocket::bind("127.0.0.1:0").expect("bind a second socket");
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                a.fetch_add(1, Ordering::Relaxed);
                p.lock().expect("lock").push(from.port());
                let mode = *md.lock().expect("lock");
                if mode == Mode::Silent {
                    continue;
                }
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                let Some(q) = query.queries().first() else { continue };
                let name = q.name().to_ascii().to_ascii_lowercase();
                let listed = r.lock().expect("lock").get(&name).cloned();
                let mut reply = Message::new();
                let id = if mode == Mode::WrongId { query.id() ^ 0x5a5a } else { query.id() };
                reply.set_id(id).set_message_type(MessageType::Response).set_recursion_available(true);
                reply.add_query(q.clone());
                match listed {
                    Some(addrs) => {
                        for a in addrs {
                            reply.add_answer(Record::from_rdata(q.name().clone(), 300, RData::A(A(a))));
                        }
                    }
                    None => {
                        reply.set_response_code(ResponseCode::NXDomain);
                    }
                }
                if let Ok(bytes) = reply.to_vec() {
                    let from_socket = if mode == Mode::FromAnotherPort { &other } else { &socket };
                    let _ = from_socket.send_to(&bytes, from);
                }
            }
        });
        DnsServer { addr, records, mode, asked, ports, stop }
    }

    /// `zone` lists `ip` (an IPv4 or IPv6 address) with `result`.
    pub fn list(&self, ip: &str, zone: &str, result: Ipv4Addr) {
        let name = mxgate::screen::dnsbl::query_name(ip.parse().expect("ip"), zone);
        self.records.lock().expect("lock").entry(name).or_default().push(result);
    }

    pub fn answer(&self, mode: Mode) {
        *self.mode.lock().expect("lock") = mode;
    }

    /// The source port of each query so far, in order.
    pub fn source_ports(&self) -> Vec<u16> {
        self.ports.lock().expect("lock").clone()
    }

    /// Queries received so far.
    pub fn asked(&self) -> usize {
        self.asked.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
