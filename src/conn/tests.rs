//! The connection layer driven by a third, fake I/O: sockets are byte queues, next hops
//! are scripted SMTP servers that record what they receive, and the clock is the test's.
//! What the two real drivers share is tested here once; what only a real socket shows is
//! tested end to end on both (`tests/`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::Config;
use crate::datetime::UnixTime;
use crate::scripted::ScriptedHop;
use crate::shared::Shared;
use crate::snapshot::Snapshot;

const A: &str = "127.0.0.1:2601";
const B: &str = "127.0.0.1:2602";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn config(next_hops: &[&str]) -> Config {
    let hops: Vec<String> = next_hops.iter().map(|h| format!("\"{h}\"")).collect();
    let text = format!(
        "hostname = \"mx.test\"\n[listen]\ndrain_timeout = \"10s\"\n[smtp]\ncommand_timeout = \"60s\"\n\
         [relay]\ndomains = [\"example.com\"]\nnext_hops = [{}]\nreply_timeout = \"20s\"\nidle_timeout = \"30s\"\n",
        hops.join(", ")
    );
    Config::parse(&text, Path::new("t.toml"), Path::new(".")).unwrap()
}

/// What one next hop received, over all its connections.
#[derive(Default)]
struct HopLog {
    connections: usize,
    messages: Vec<Vec<u8>>,
    commands: Vec<String>,
}

/// One connection to a next hop: the scripted server on it, what it has to say, and what
/// it received recorded in its next hop's log.
struct Server {
    log: Rc<RefCell<HopLog>>,
    script: ScriptedHop,
    out: Vec<u8>,
    /// The server closed the connection (a pooled connection gone stale).
    gone: bool,
}

impl Server {
    fn new(log: Rc<RefCell<HopLog>>) -> Self {
        let script = ScriptedHop::offering(&["PIPELINING", "8BITMIME"]);
        Server { log, script, out: b"220 hop.test\r\n".to_vec(), gone: false }
    }

    fn receive(&mut self, bytes: &[u8]) {
        if self.gone {
            return;
        }
        let answers = self.script.receive(bytes);
        self.out.extend_from_slice(&answers);
        let mut log = self.log.borrow_mut();
        log.commands.append(&mut self.script.commands);
        log.messages.append(&mut self.script.messages);
    }
}

/// A connection to a next hop: its server, and whether the connect completed.
struct HopConn {
    server: Server,
    connecting: bool,
}

#[derive(Default)]
struct FakeSockets {
    peer_open: bool,
    /// Sent by the peer, not yet read.
    peer_in: Vec<u8>,
    peer_eof: bool,
    /// A receive asked while the peer had sent nothing: done when it does.
    peer_receive: bool,
    hop: Option<HopConn>,
    /// A receive asked while the next hop had said nothing: done when it does.
    hop_receive: bool,
}

/// The fake I/O: next hops by address.
#[derive(Default)]
struct Fake {
    hops: HashMap<SocketAddr, Rc<RefCell<HopLog>>>,
    /// Addresses where connecting fails at once.
    unreachable: Vec<SocketAddr>,
    dials: Vec<SocketAddr>,
    /// What each peer received (kept after its connection is freed).
    got: HashMap<ConnId, Vec<u8>>,
    /// Operations performed, to tell when everything has settled.
    ops: usize,
    /// DNS queries sent, for the test to answer.
    dns_sent: Vec<(SocketAddr, Vec<u8>)>,
    /// The bytes of the last receive.
    read: Vec<u8>,
}

impl Fake {
    fn log(&mut self, addr: SocketAddr) -> Rc<RefCell<HopLog>> {
        self.hops.entry(addr).or_default().clone()
    }

    /// The peer's next bytes (or its end), if it sent any since the receive was asked.
    fn peer_read(&mut self, s: &mut FakeSockets) -> Option<Input<'_>> {
        if !s.peer_in.is_empty() {
            self.read = std::mem::take(&mut s.peer_in);
            return Some(Input::PeerBytes(&self.read));
        }
        s.peer_eof.then_some(Input::PeerEof)
    }

    /// The next hop's answers (or its end), if it said anything since the receive was
    /// asked.
    fn hop_read(&mut self, s: &mut FakeSockets) -> Option<Input<'_>> {
        let server = &mut s.hop.as_mut()?.server;
        if server.gone {
            return Some(Input::HopFailed);
        }
        if server.out.is_empty() {
            return None;
        }
        self.read = std::mem::take(&mut server.out);
        Some(Input::HopBytes(&self.read))
    }
}

impl Io for Fake {
    type Sockets = FakeSockets;
    type Pooled = HopConn;

    fn perform<'s>(&'s mut self, id: ConnId, s: &mut FakeSockets, op: Output<'_>) -> Option<Input<'s>> {
        self.ops += 1;
        match (op, s.hop.as_mut()) {
            (Output::PeerSend(bytes), _) => {
                self.got.entry(id).or_default().extend_from_slice(bytes);
                Some(Input::PeerSent(bytes.len()))
            }
            (Output::PeerReceive, _) => {
                s.peer_receive = s.peer_in.is_empty() && !s.peer_eof;
                self.peer_read(s)
            }
            (Output::PeerLast(line), _) => {
                self.got.entry(id).or_default().extend_from_slice(line);
                s.peer_open = false;
                None
            }
            (Output::PeerClose, _) => {
                s.peer_open = false;
                None
            }
            (Output::HopSend(bytes), Some(h)) => {
                h.server.receive(bytes);
                Some(Input::HopSent(bytes.len()))
            }
            (Output::HopReceive, Some(_)) => {
                let input = self.hop_read(s);
                s.hop_receive = input.is_none();
                input
            }
            (Output::HopSend(_) | Output::HopReceive, None) => Some(Input::HopFailed),
            (Output::HopClose, _) => {
                s.hop = None;
                s.hop_receive = false;
                Some(Input::HopClosed)
            }
            _ => None,
        }
    }

    fn dial(&mut self, _: ConnId, s: &mut FakeSockets, addr: SocketAddr) -> io::Result<()> {
        self.dials.push(addr);
        if self.unreachable.contains(&addr) {
            return Err(io::ErrorKind::ConnectionRefused.into());
        }
        let log = self.log(addr);
        log.borrow_mut().connections += 1;
        let server = Server::new(log);
        s.hop = Some(HopConn { server, connecting: true });
        Ok(())
    }

    fn adopt(&mut self, _: ConnId, s: &mut FakeSockets, pooled: HopConn) -> bool {
        s.hop = Some(pooled);
        true
    }

    fn unplug(&mut self, s: &mut FakeSockets) -> Option<HopConn> {
        if s.hop_receive {
            return None;
        }
        s.hop.take()
    }

    fn retire(&mut self, mut pooled: HopConn, last: &[u8]) {
        pooled.server.receive(last);
    }

    fn closed(&self, s: &FakeSockets) -> bool {
        !s.peer_open && s.hop.is_none()
    }

    fn dns_send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.dns_sent.push((to, datagram.to_vec()));
    }
}

/// A worker's host over the fake I/O, with the test's clock.
struct World {
    shared: Arc<Shared>,
    host: Host<Fake>,
    io: Fake,
    now: Instant,
    unix: UnixTime,
    next_peer: u8,
}

impl World {
    fn new(next_hops: &[&str]) -> Self {
        Self::with(config(next_hops))
    }

    fn with(config: Config) -> Self {
        let shared = Shared::new(Snapshot::without_lists(config)).unwrap();
        World {
            host: Host::new(shared.clone()),
            shared,
            io: Fake::default(),
            now: Instant::now(),
            unix: UnixTime(1_795_894_760),
            next_peer: 1,
        }
    }

    /// A new peer connects; returns its id and the banner it got.
    fn connect(&mut self) -> (ConnId, String) {
        let peer = SocketAddr::from(([192, 0, 2, self.next_peer], 40000));
        self.next_peer += 1;
        self.connect_from(peer).expect("refused")
    }

    /// `peer` connects: its id and the banner it got, or the line it was refused with.
    fn connect_from(&mut self, peer: SocketAddr) -> Result<(ConnId, String), String> {
        let conn = match self.host.admit(peer, self.now, self.unix) {
            Admit::Serve(conn) => conn,
            Admit::Refuse(line) => return Err(String::from_utf8_lossy(line).into_owned()),
        };
        let sockets = FakeSockets { peer_open: true, ..FakeSockets::default() };
        let id = self.host.open(conn, sockets, self.now, &mut self.io);
        self.settle();
        Ok((id, self.take(id)))
    }

    /// Completes pending connects and advances every connection until nothing moves.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            for key in 0..64 {
                let Some((conn, s)) = self.host.get(key) else { continue };
                if let Some(h) = s.hop.as_mut().filter(|h| h.connecting) {
                    h.connecting = false;
                    conn.handle(Input::HopConnected, self.now);
                    moved = true;
                }
                if s.peer_receive
                    && let Some(input) = self.io.peer_read(s)
                {
                    s.peer_receive = false;
                    conn.handle(input, self.now);
                    moved = true;
                }
                if s.hop_receive
                    && let Some(input) = self.io.hop_read(s)
                {
                    s.hop_receive = false;
                    conn.handle(input, self.now);
                    moved = true;
                }
                let before = self.io.ops;
                self.host.advance(key, self.now, &mut self.io);
                moved |= self.io.ops != before;
            }
            self.host.tick(self.now, self.unix, &mut self.io);
            if !moved {
                return;
            }
        }
        panic!("the connections never settle");
    }

    /// The peer `id` sends; returns what it got back.
    fn send(&mut self, id: ConnId, bytes: &str) -> String {
        self.send_bytes(id, bytes.as_bytes())
    }

    fn send_bytes(&mut self, id: ConnId, bytes: &[u8]) -> String {
        let (_, s) = self.host.get_current(id).expect("open");
        s.peer_in.extend_from_slice(bytes);
        self.host.advance(id.0, self.now, &mut self.io);
        self.settle();
        self.take(id)
    }

    /// What the peer received since the last look.
    fn take(&mut self, id: ConnId) -> String {
        String::from_utf8(self.io.got.remove(&id).unwrap_or_default()).unwrap()
    }

    fn open(&mut self, id: ConnId) -> bool {
        self.host.get_current(id).is_some()
    }

    /// Moves the clock and runs the host's timers.
    fn wait(&mut self, d: Duration) {
        self.now += d;
        self.host.tick(self.now, self.unix, &mut self.io);
        self.settle();
    }

    /// One message over an open session; returns the reply to its final dot.
    fn deliver(&mut self, id: ConnId, subject: &str) -> String {
        let got = self.send(id, "MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
        assert!(got.ends_with("354 end data with <CR><LF>.<CR><LF>\r\n"), "{got}");
        self.send(id, &format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n"))
    }

    fn session(&mut self) -> ConnId {
        let (id, banner) = self.connect();
        assert_eq!(banner, "220 mx.test ESMTP mxgate\r\n");
        assert!(self.send(id, "EHLO client.test\r\n").starts_with("250-mx.test"));
        id
    }

    fn subjects(&mut self, hop: &str) -> Vec<String> {
        let log = self.io.log(addr(hop));
        let log = log.borrow();
        log.messages
            .iter()
            .filter_map(|m| {
                let text = String::from_utf8_lossy(m);
                text.lines().find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
            })
            .collect()
    }
}

const QUEUED: &str = "250 2.0.0 OK: queued as ";
const SHUTTING_DOWN: &str = "421 4.3.2 mx.test service shutting down, closing connection\r\n";

#[test]
fn a_clean_connection_is_pooled_and_serves_the_next_session() {
    let mut w = World::new(&[A]);
    let s1 = w.session();
    assert!(w.deliver(s1, "one").starts_with(QUEUED));
    assert_eq!(w.send(s1, "QUIT\r\n"), "221 2.0.0 mx.test closing connection\r\n");
    assert!(!w.open(s1), "freed once its sockets are closed");
    assert_eq!(w.host.pooled(addr(A)), 1);

    let s2 = w.session();
    assert!(w.deliver(s2, "two").starts_with(QUEUED));
    assert_eq!(w.io.dials, [addr(A)], "the second session used the pooled connection");
    assert_eq!(w.subjects(A), ["one", "two"]);
    assert_eq!(w.host.pooled(addr(A)), 0, "in use");
}

#[test]
fn a_stale_pooled_connection_is_replaced_without_the_peer_noticing() {
    let mut w = World::new(&[A]);
    let s1 = w.session();
    assert!(w.deliver(s1, "one").starts_with(QUEUED));
    w.send(s1, "QUIT\r\n");
    assert_eq!(w.host.pooled(addr(A)), 1);
    // the next hop closed the idle connection meanwhile
    w.host.pooled_mut().for_each(|h| h.server.gone = true);

    let s2 = w.session();
    assert!(w.deliver(s2, "two").starts_with(QUEUED));
    assert_eq!(w.io.dials, [addr(A), addr(A)], "a new connection after the stale one");
    assert_eq!(w.subjects(A), ["one", "two"]);
}

/// A world where one message went through A and its connection waits in the pool.
fn one_pooled() -> World {
    let mut w = World::new(&[A]);
    let s1 = w.session();
    w.deliver(s1, "one");
    w.send(s1, "QUIT\r\n");
    assert_eq!(w.host.pooled(addr(A)), 1);
    w
}

/// What A received last.
fn last_command(w: &mut World) -> Option<String> {
    w.io.log(addr(A)).borrow().commands.last().cloned()
}

#[test]
fn pooled_connections_expire_after_idle_timeout() {
    let mut w = one_pooled();
    w.wait(Duration::from_secs(29));
    assert_eq!(w.host.pooled(addr(A)), 1);
    w.wait(Duration::from_secs(1));
    assert_eq!(w.host.pooled(addr(A)), 0, "idle_timeout (30s) closes it");
    assert_eq!(last_command(&mut w).as_deref(), Some("QUIT"), "saying QUIT first");
}

#[test]
fn pooled_connections_say_quit_at_exit() {
    let mut w = one_pooled();
    w.host.close_pool(&mut w.io);
    assert_eq!(w.host.pooled(addr(A)), 0);
    assert_eq!(last_command(&mut w).as_deref(), Some("QUIT"));
}

#[test]
fn an_unreachable_next_hop_fails_over_to_the_next() {
    let mut w = World::new(&[A, B]);
    w.io.unreachable = vec![addr(A)];
    let s = w.session();
    assert!(w.deliver(s, "one").starts_with(QUEUED));
    assert_eq!(w.io.dials, [addr(A), addr(B)]);
    assert_eq!(w.subjects(B), ["one"]);

    // none reachable: 451, never 250
    let mut w = World::new(&[A, B]);
    w.io.unreachable = vec![addr(A), addr(B)];
    let s = w.session();
    assert_eq!(w.send(s, "MAIL FROM:<a@client.test>\r\n"), "451 4.4.1 next hop unavailable, try again later\r\n");
}

#[test]
fn an_idle_peer_is_timed_out_and_freed() {
    let mut w = World::new(&[A]);
    let s = w.session();
    w.wait(Duration::from_secs(59));
    assert!(w.open(s));
    assert_eq!(w.take(s), "");
    w.wait(Duration::from_secs(1));
    assert_eq!(w.take(s), "421 4.4.2 mx.test timeout exceeded, closing connection\r\n");
    assert!(!w.open(s), "closed and freed");
    assert_eq!(w.host.open_connections(), 0);
}

#[test]
fn a_silent_next_hop_times_out_with_451_and_its_connection_is_closed() {
    let mut w = World::new(&[A]);
    let s = w.session();
    let got = w.send(s, "MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
    assert!(got.ends_with("354 end data with <CR><LF>.<CR><LF>\r\n"));
    w.host.get_current(s).unwrap().1.hop.as_mut().unwrap().server.script.silent = true;
    assert_eq!(w.send(s, "Subject: x\r\n\r\nbody\r\n.\r\n"), "");
    w.wait(Duration::from_secs(19));
    assert_eq!(w.take(s), "");
    w.wait(Duration::from_secs(1));
    assert_eq!(w.take(s), "451 4.4.1 next hop unavailable, try again later\r\n");
    assert!(w.host.get_current(s).unwrap().1.hop.is_none(), "closed, not pooled");
    assert_eq!(w.host.pooled(addr(A)), 0);
    assert_eq!(w.send(s, "NOOP\r\n"), "250 2.0.0 OK\r\n", "the session goes on");
}

#[test]
fn drain_finishes_the_transaction_under_way_and_tells_the_rest_421() {
    let mut w = World::new(&[A]);
    let busy = w.session();
    let idle = w.session();
    let got = w.send(busy, "MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
    assert!(got.ends_with("354 end data with <CR><LF>.<CR><LF>\r\n"));
    assert_eq!(w.send(busy, "Subject: drained\r\n\r\nfirst half\r\n"), "");

    assert!(w.host.start_drain(w.now, &mut w.io));
    assert!(!w.host.start_drain(w.now, &mut w.io), "once");
    w.settle();
    assert_eq!(w.take(idle), SHUTTING_DOWN);
    assert!(!w.open(idle), "the idle session was told and closed");
    assert!(w.send(busy, "second half\r\n.\r\n").starts_with(QUEUED));
    assert_eq!(w.subjects(A), ["drained"]);
    assert_eq!(w.send(busy, "MAIL FROM:<b@client.test>\r\n"), SHUTTING_DOWN);
    assert!(!w.open(busy));
    assert!(w.host.finished());

    // a connection accepted while draining is told at once
    let (late, banner) = w.connect();
    assert_eq!(banner, format!("220 mx.test ESMTP mxgate\r\n{SHUTTING_DOWN}"));
    assert!(!w.open(late));
}

#[test]
fn drain_timeout_cuts_off_what_is_left_without_250() {
    let mut w = World::new(&[A]);
    let s = w.session();
    w.send(s, "MAIL FROM:<a@client.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n");
    w.send(s, "Subject: slow\r\n\r\n");
    w.host.start_drain(w.now, &mut w.io);
    w.wait(Duration::from_secs(9));
    assert!(w.open(s), "still within drain_timeout (10s)");
    w.wait(Duration::from_secs(1));
    assert_eq!(w.take(s), SHUTTING_DOWN);
    assert!(!w.open(s));
    assert!(w.host.finished());
    assert!(w.subjects(A).is_empty(), "the message was not delivered");
    assert_eq!(w.io.log(addr(A)).borrow().connections, 1);
}

#[test]
fn a_reload_that_replaces_next_hops_leaves_open_sessions_on_theirs() {
    let mut w = World::new(&[A]);
    let old = w.session();
    w.shared.store(Snapshot::without_lists(config(&[B])));
    let new = w.session();
    assert!(w.deliver(old, "old").starts_with(QUEUED));
    assert!(w.deliver(new, "new").starts_with(QUEUED));
    assert_eq!(w.subjects(A), ["old"]);
    assert_eq!(w.subjects(B), ["new"]);
    w.send(old, "QUIT\r\n");
    w.send(new, "QUIT\r\n");
    assert_eq!((w.host.pooled(addr(A)), w.host.pooled(addr(B))), (1, 1), "each pooled under its own hop");

    // a newer session takes B's pooled connection, never A's
    let newer = w.session();
    assert!(w.deliver(newer, "newer").starts_with(QUEUED));
    assert_eq!(w.subjects(B), ["new", "newer"]);
    assert_eq!(w.io.dials, [addr(A), addr(B)], "no new connection");
    assert_eq!(w.host.pooled(addr(A)), 1);
}

/// Peers 192.0.2.x are a trusted balancer: each connection's PROXY header comes first,
/// whatever the pieces it arrives in, then the session is the client's.
#[test]
fn a_balancers_header_in_pieces_then_the_clients_session() {
    let text = "hostname = \"mx.test\"\n[listen]\nproxy_protocol_from = [\"192.0.2.0/24\"]\nproxy_timeout = \"5s\"\n";
    let mut w = World::with(Config::parse(text, Path::new("t.toml"), Path::new(".")).unwrap());
    let (id, banner) = w.connect();
    assert_eq!(banner, "", "nothing before the header");
    let header = loadtest::proxy::v2_header(addr("198.51.100.7:4000"), addr("127.0.0.1:25"), &[]);
    let (last, pieces) = header.split_last().unwrap();
    for b in pieces {
        assert_eq!(w.send_bytes(id, &[*b]), "");
    }
    let got = w.send_bytes(id, &[&[*last][..], b"EHLO client.test\r\n"].concat());
    assert!(got.starts_with("220 mx.test ESMTP mxgate\r\n250-mx.test"), "{got}");
    assert_eq!(w.host.get_current(id).unwrap().0.session().peer().to_string(), "198.51.100.7");
    // a balancer that says nothing is closed without a word at proxy_timeout
    let (quiet, _) = w.connect();
    w.wait(Duration::from_secs(4));
    assert!(w.open(quiet));
    w.wait(Duration::from_secs(1));
    assert!(!w.open(quiet) && w.take(quiet).is_empty());
    assert!(w.open(id), "the served one goes on");
}

/// The pregreet test on the test's clock: silence for greet_wait passes (the banner ends
/// the greeting, the peer is remembered); a byte first fails; a drain during the wait
/// ends the greeting and gets the session's 421.
#[test]
fn the_pregreet_test() {
    let text = "hostname = \"mx.test\"\n[screen]\npregreet = true\ngreet_wait = \"6s\"\n";
    let mut w = World::with(Config::parse(text, Path::new("t.toml"), Path::new(".")).unwrap());
    let (id, first) = w.connect();
    assert_eq!(first, "220-mx.test ESMTP\r\n");
    w.wait(Duration::from_secs(5));
    assert_eq!(w.take(id), "", "still waiting");
    w.wait(Duration::from_secs(1));
    assert_eq!(w.take(id), "220 mx.test ESMTP mxgate\r\n");
    assert!(w.send(id, "EHLO client.test\r\n").starts_with("250-mx.test"));
    let passed = w.host.get_current(id).unwrap().0.session().peer().ip();
    assert!(w.shared.passed().holds(passed, w.unix));

    let (early, _) = w.connect();
    assert_eq!(w.send(early, "EHLO bot\r\n"), "554 5.7.1 protocol error: talked before the greeting\r\n");
    assert!(!w.open(early), "closed");

    let (waiting, _) = w.connect();
    w.host.start_drain(w.now, &mut w.io);
    w.settle();
    // the greeting ends, then the 421 (a reply cannot change its code mid-way)
    let got = w.take(waiting);
    assert!(got.starts_with("220 mx.test ESMTP mxgate\r\n421 4.3.2 mx.test service shutting down"), "{got}");
}

/// The blocklists and the pregreet test side by side, on the test's clock: a listing
/// refuses at once with the 550; a peer that talked first keeps its 554 whatever the
/// answers say later; a clean peer waits for both tests.
#[test]
fn blocklists_beside_the_pregreet_test() {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{RData, Record, rdata::A};
    let text = "hostname = \"mx.test\"\n[screen]\npregreet = true\ngreet_wait = \"6s\"\nresolvers = [\"127.0.0.1:53\"]\n\
                [[screen.dnsbl]]\nzone = \"bl.test\"\nweight = 1\n";
    let mut w = World::with(Config::parse(text, Path::new("t.toml"), Path::new(".")).unwrap());
    let answer = |query: &[u8], listed: bool| {
        let q = Message::from_vec(query).unwrap();
        let mut r = Message::new();
        r.set_id(q.id()).set_message_type(MessageType::Response).add_query(q.queries()[0].clone());
        if listed {
            let a = RData::A(A("127.0.0.2".parse().unwrap()));
            r.add_answer(Record::from_rdata(q.queries()[0].name().clone(), 60, a));
        } else {
            r.set_response_code(ResponseCode::NXDomain);
        }
        r.to_vec().unwrap()
    };
    let dns: SocketAddr = "127.0.0.1:53".parse().unwrap();

    // listed: the 550 at once, during the pregreet wait
    let (listed, _) = w.connect();
    let (to, query) = w.io.dns_sent.pop().expect("a query");
    assert_eq!(to, dns);
    w.host.dns_input(to, &answer(&query, true), w.now, &mut w.io);
    w.settle();
    assert_eq!(w.take(listed), "550 5.7.1 Service unavailable; client [192.0.2.1] blocked using bl.test\r\n");
    assert!(!w.open(listed));

    // talked first: 554; the answer that comes later changes nothing
    let (early, _) = w.connect();
    let (_, query) = w.io.dns_sent.pop().expect("a query");
    assert!(w.send(early, "EHLO bot\r\n").starts_with("554 5.7.1"));
    w.host.dns_input(dns, &answer(&query, true), w.now, &mut w.io);
    w.settle();
    assert_eq!(w.take(early), "");

    // clean: the greeting ends when both tests are behind it
    let (clean, _) = w.connect();
    let (_, query) = w.io.dns_sent.pop().expect("a query");
    w.host.dns_input(dns, &answer(&query, false), w.now, &mut w.io);
    w.settle();
    assert_eq!(w.take(clean), "", "the pregreet wait goes on");
    w.wait(Duration::from_secs(6));
    assert_eq!(w.take(clean), "220 mx.test ESMTP mxgate\r\n");
    let ip = w.host.get_current(clean).unwrap().0.session().peer().ip();
    assert!(w.shared.passed().holds(ip, w.unix));
}

#[test]
fn failures_add_up_across_conversations_and_the_threshold_is_exact() {
    let mut config = config(&[A]);
    config.abuse.failure_threshold = 5;
    let mut w = World::with(config);
    let peer = addr("192.0.2.77:40000");
    let fail = |w: &mut World, n: usize| {
        let (id, banner) = w.connect_from(peer).expect("served");
        assert_eq!(banner, "220 mx.test ESMTP mxgate\r\n");
        let got = w.send(id, &"BOGUS\r\n".repeat(n));
        assert_eq!(got.matches("500 5.5.2").count(), n, "{got}");
        assert_eq!(w.send(id, "QUIT\r\n"), "221 2.0.0 mx.test closing connection\r\n");
        assert!(!w.open(id));
    };
    fail(&mut w, 2);
    fail(&mut w, 2);
    fail(&mut w, 0);
    fail(&mut w, 1);
    let refused = w.connect_from(peer).expect_err("the fifth failure bans");
    assert!(refused.starts_with("530 5.7.1 mx.test ESMTP denied access at "), "{refused}");
    assert!(w.connect_from(addr("192.0.2.78:40000")).is_ok(), "a neighbour is still served");
}

#[test]
fn a_next_hops_refusals_reach_the_peer_as_they_are_never_as_250() {
    let mut w = World::new(&[A]);
    let s = w.session();
    assert_eq!(w.send(s, "MAIL FROM:<a@client.test>\r\n"), "250 2.1.0 sender OK\r\n");
    w.host.get_current(s).unwrap().1.hop.as_mut().unwrap().server.script.refuse_rcpt =
        Some(("u@example.com", "550 5.1.1 no such user"));
    assert_eq!(w.send(s, "RCPT TO:<u@example.com>\r\n"), "550 5.1.1 no such user\r\n");
    assert_eq!(w.send(s, "DATA\r\n"), "554 5.5.1 no valid recipients\r\n");
    assert_eq!(w.send(s, "RSET\r\n"), "250 2.0.0 OK\r\n");
    let script = &mut w.host.get_current(s).unwrap().1.hop.as_mut().unwrap().server.script;
    script.refuse_rcpt = None;
    script.dot_reply = Some("554 5.7.1 rejected by policy");
    assert_eq!(w.deliver(s, "refused"), "554 5.7.1 rejected by policy\r\n");
    assert_eq!(w.send(s, "QUIT\r\n"), "221 2.0.0 mx.test closing connection\r\n");
    assert_eq!(w.host.pooled(addr(A)), 1, "the hop said 250 to our RSET after its refusal: clean, pooled");
}

#[test]
fn a_freed_connection_gives_its_place_back() {
    let mut config = config(&[A]);
    config.abuse.max_connections_per_ip = 2;
    let mut w = World::with(config);
    let peer = addr("192.0.2.90:40000");
    let (first, _) = w.connect_from(peer).expect("served");
    w.connect_from(peer).expect("served");
    let refused = w.connect_from(peer).expect_err("a third at once");
    assert_eq!(refused, "421 4.7.0 too many connections from your address\r\n");
    assert!(w.connect_from(addr("192.0.2.91:40000")).is_ok(), "another address is not held back");
    assert_eq!(w.send(first, "QUIT\r\n"), "221 2.0.0 mx.test closing connection\r\n");
    assert!(!w.open(first), "freed");
    assert!(w.connect_from(peer).is_ok(), "its place is free again");
}

#[test]
fn ban_on_drop_bans_the_address_of_a_dropped_conversation() {
    let mut config = config(&[A]);
    config.abuse.max_failed_commands = 2;
    config.abuse.ban_on_drop = true;
    let mut w = World::with(config);
    let peer = addr("192.0.2.95:40000");
    let (id, _) = w.connect_from(peer).expect("served");
    let got = w.send(id, &"BOGUS\r\n".repeat(3));
    assert!(got.ends_with("421 4.7.0 mx.test too many errors\r\n"), "{got}");
    w.wait(Duration::from_secs(5));
    assert!(!w.open(id), "dropped");
    let refused = w.connect_from(peer).expect_err("banned");
    assert!(refused.starts_with("530 5.7.1 mx.test ESMTP denied access at "), "{refused}");
}
