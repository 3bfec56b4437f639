//! nf_tables over netlink, spoken directly: the messages mxgate's table needs, built as
//! bytes (sans-IO), and a socket that sends a batch and reads its acknowledgements.
//!
//! Why hand-written: the pure-Rust nftables crate (rustables) is GPL-3.0, and the others
//! (nftnl) bind libnftnl, a GPL-2.0 C library; mxgate is MIT or Apache-2.0. What mxgate
//! needs of nf_tables is small: a table of its own, sets with timeouts, a chain with a
//! rule per set and listening port, and elements added and removed in batches.
//!
//! ```text
//!  batch begin ─ NEWTABLE inet <table> ─ NEWSET addr4 (ipv4_addr, timeout)
//!              ─ NEWSET net4 (ipv4_addr, interval|timeout) ─ NEWSET net6 (ipv6_addr,
//!                interval|timeout)
//!              ─ NEWCHAIN refuse (prerouting, raw priority, policy accept)
//!              ─ NEWRULE per set and port: meta nfproto, meta l4proto tcp, tcp dport,
//!                source address looked up in the set: drop, or reject with a TCP reset
//!              ─ batch end
//!  batch begin ─ DELSETELEM ... ─ NEWSETELEM addr4 { address (timeout) } ...
//!              ─ NEWSETELEM net4 { start (timeout), end (interval end) } ... ─ batch end
//! ```
//!
//! An interval set keeps a range as two elements: its first address (with the timeout)
//! and the address after its last, flagged as an interval's end. Batches are kept under
//! the socket's send buffer ([`PER_BATCH`] elements).
//!
//! Measured on this VM (kernel 6.18, a throwaway test): 1,000,000 IPv4 addresses into an
//! interval set took 55 s in batches of 1,500 (its rbtree's insertions); into a hash set
//! ([`ADDR4`]) 0.85 s, with the kernel's slab 64.5 MiB larger. So addresses go to the
//! hash set, and ranges alone (few: operators' prefixes and escalations) to the interval
//! sets.

use std::io;
use std::time::Duration;

use ipnet::IpNet;

// netlink and nfnetlink (linux/netlink.h, linux/netfilter/nfnetlink.h, nf_tables.h)
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NF_INET_PRE_ROUTING: u32 = 0;
/// The raw priority: before connection tracking.
const NF_IP_PRI_RAW: i32 = -300;
const NF_ACCEPT: u32 = 1;
const NF_DROP: u32 = 0;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_REJECT_TYPE: u16 = 1;
const NFT_REJECT_TCP_RST: u32 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const IPPROTO_TCP: u8 = 6;

/// What the kernel does with a banned address's packets to a listening port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Silently: the peer's SYN goes unanswered.
    Drop,
    /// With a TCP reset: the peer learns at once.
    Reset,
}
impl Action {
    /// As `[kernel] mode` writes it.
    pub fn name(self) -> &'static str {
        match self {
            Action::Drop => "drop",
            Action::Reset => "reset",
        }
    }
}

/// nft's data types for the sets' keys (nftables' datatype.h).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;

/// Prefixes per message: each is two elements of at most 80 bytes (IPv6), and the list
/// that holds them has a 16-bit length.
const PER_MESSAGE: usize = 300;

/// Prefixes per batch: under the socket's default send buffer (about 208 KiB), so a
/// batch goes in one send (a bigger one is refused: EMSGSIZE).
pub const PER_BATCH: usize = 1500;

/// One of mxgate's sets: its name, key, and whether it holds intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetKind {
    pub name: &'static str,
    pub v6: bool,
    pub interval: bool,
}

/// IPv4 addresses (a hash set: a million load in a fraction of the time intervals take).
pub const ADDR4: SetKind = SetKind { name: "addr4", v6: false, interval: false };
/// IPv4 prefixes.
pub const NET4: SetKind = SetKind { name: "net4", v6: false, interval: true };
/// IPv6 prefixes (peers are keyed by a prefix: `ipv6_prefix`).
pub const NET6: SetKind = SetKind { name: "net6", v6: true, interval: true };
/// Every set mxgate's table holds.
pub const SETS: [SetKind; 3] = [ADDR4, NET4, NET6];

/// The set a prefix goes to.
pub fn set_for(net: IpNet) -> SetKind {
    Elem::of(net).set()
}

/// One element of mxgate's sets: an IPv4 address (the hash set), or a range of
/// addresses, from its first to the one after its last (`None`: to the end of the
/// address space).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Elem {
    Addr4(u32),
    Range4(u32, Option<u32>),
    Range6(u128, Option<u128>),
}

impl Elem {
    /// A prefix as an element: an IPv4 /32 an address, any other a range.
    pub fn of(net: IpNet) -> Elem {
        match net {
            IpNet::V4(n) if n.prefix_len() == 32 => Elem::Addr4(u32::from(n.addr())),
            IpNet::V4(n) => Elem::Range4(u32::from(n.network()), u32::from(n.broadcast()).checked_add(1)),
            IpNet::V6(n) => Elem::Range6(u128::from(n.network()), u128::from(n.broadcast()).checked_add(1)),
        }
    }

    /// The set it goes to.
    pub fn set(self) -> SetKind {
        match self {
            Elem::Addr4(_) => ADDR4,
            Elem::Range4(..) => NET4,
            Elem::Range6(..) => NET6,
        }
    }

    /// Its key, and the interval's end's key (none for an address, or a range to the end).
    fn keys(self) -> (Vec<u8>, Option<Vec<u8>>) {
        match self {
            Elem::Addr4(a) => (a.to_be_bytes().to_vec(), None),
            Elem::Range4(a, end) => (a.to_be_bytes().to_vec(), end.map(|e| e.to_be_bytes().to_vec())),
            Elem::Range6(a, end) => (a.to_be_bytes().to_vec(), end.map(|e| e.to_be_bytes().to_vec())),
        }
    }
}

/// A batch of nf_tables messages, applied by the kernel as one transaction.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// Messages in it but the batch's begin and end (each gets an acknowledgement).
    messages: u32,
}

impl Batch {
    /// A batch whose messages are numbered from `seq`.
    pub fn new(seq: u32) -> Self {
        let mut b = Batch { buf: Vec::with_capacity(4096), seq, messages: 0 };
        b.header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        b.finish_message(0);
        b
    }

    /// The table (family inet), created if it is not there.
    pub fn new_table(&mut self, table: &str) {
        let at = self.message(NFT_MSG_NEWTABLE, NLM_F_CREATE);
        self.attr_str(NFTA_TABLE_NAME, table);
        self.finish_message(at);
    }

    /// The table (family inet) with every set of [`SETS`] in it.
    pub fn new_table_with_sets(&mut self, table: &str) {
        self.new_table(table);
        for (id, set) in (1..).zip(SETS) {
            self.new_set(table, set, id);
        }
    }

    /// The table and all in it, removed.
    pub fn del_table(&mut self, table: &str) {
        let at = self.message(NFT_MSG_DELTABLE, 0);
        self.attr_str(NFTA_TABLE_NAME, table);
        self.finish_message(at);
    }

    /// A set with timeouts, as `kind` says.
    pub fn new_set(&mut self, table: &str, kind: SetKind, id: u32) {
        let at = self.message(NFT_MSG_NEWSET, NLM_F_CREATE);
        self.attr_str(NFTA_SET_TABLE, table);
        self.attr_str(NFTA_SET_NAME, kind.name);
        let interval = if kind.interval { NFT_SET_INTERVAL } else { 0 };
        self.attr_u32(NFTA_SET_FLAGS, interval | NFT_SET_TIMEOUT);
        self.attr_u32(NFTA_SET_KEY_TYPE, if kind.v6 { TYPE_IP6ADDR } else { TYPE_IPADDR });
        self.attr_u32(NFTA_SET_KEY_LEN, if kind.v6 { 16 } else { 4 });
        self.attr_u32(NFTA_SET_ID, id);
        self.finish_message(at);
    }

    /// mxgate's base chain: on prerouting at raw priority (before connection tracking),
    /// accepting what its rules do not stop.
    pub fn new_chain(&mut self, table: &str, chain: &str) {
        let at = self.message(NFT_MSG_NEWCHAIN, NLM_F_CREATE);
        self.attr_str(NFTA_CHAIN_TABLE, table);
        self.attr_str(NFTA_CHAIN_NAME, chain);
        let hook = self.nest(NFTA_CHAIN_HOOK);
        self.attr_u32(NFTA_HOOK_HOOKNUM, NF_INET_PRE_ROUTING);
        self.attr_u32(NFTA_HOOK_PRIORITY, NF_IP_PRI_RAW as u32);
        self.end_nest(hook);
        self.attr_u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        self.attr_str(NFTA_CHAIN_TYPE, "filter");
        self.finish_message(at);
    }

    /// A rule: TCP to `port` from an address in `set`: `action`.
    pub fn new_rule(&mut self, table: &str, chain: &str, set: SetKind, port: u16, action: Action) {
        let at = self.message(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
        self.attr_str(NFTA_RULE_TABLE, table);
        self.attr_str(NFTA_RULE_CHAIN, chain);
        let list = self.nest(NFTA_RULE_EXPRESSIONS);
        // the family (an inet table sees both), TCP, the port, the source in the set
        self.expr_meta(NFT_META_NFPROTO);
        self.expr_cmp(&[if set.v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 }]);
        self.expr_meta(NFT_META_L4PROTO);
        self.expr_cmp(&[IPPROTO_TCP]);
        self.expr_payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
        self.expr_cmp(&port.to_be_bytes());
        let (offset, len) = if set.v6 { (8, 16) } else { (12, 4) };
        self.expr_payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len);
        let e = self.expr("lookup");
        self.attr_str(NFTA_LOOKUP_SET, set.name);
        self.attr_u32(NFTA_LOOKUP_SREG, NFT_REG_1);
        self.end_expr(e);
        match action {
            Action::Drop => {
                let e = self.expr("immediate");
                self.attr_u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                let data = self.nest(NFTA_IMMEDIATE_DATA);
                let verdict = self.nest(NFTA_DATA_VERDICT);
                self.attr_u32(NFTA_VERDICT_CODE, NF_DROP);
                self.end_nest(verdict);
                self.end_nest(data);
                self.end_expr(e);
            }
            Action::Reset => {
                let e = self.expr("reject");
                self.attr_u32(NFTA_REJECT_TYPE, NFT_REJECT_TCP_RST);
                self.end_expr(e);
            }
        }
        self.end_nest(list);
        self.finish_message(at);
    }

    /// An expression named `name`: its list element and data nest, ended by `end_expr`.
    fn expr(&mut self, name: &str) -> (usize, usize) {
        let elem = self.nest(NFTA_LIST_ELEM);
        self.attr_str(NFTA_EXPR_NAME, name);
        (elem, self.nest(NFTA_EXPR_DATA))
    }

    fn end_expr(&mut self, (elem, data): (usize, usize)) {
        self.end_nest(data);
        self.end_nest(elem);
    }

    fn expr_meta(&mut self, key: u32) {
        let e = self.expr("meta");
        self.attr_u32(NFTA_META_KEY, key);
        self.attr_u32(NFTA_META_DREG, NFT_REG_1);
        self.end_expr(e);
    }

    fn expr_cmp(&mut self, value: &[u8]) {
        let e = self.expr("cmp");
        self.attr_u32(NFTA_CMP_SREG, NFT_REG_1);
        self.attr_u32(NFTA_CMP_OP, NFT_CMP_EQ);
        let data = self.nest(NFTA_CMP_DATA);
        self.attr(NFTA_DATA_VALUE, value);
        self.end_nest(data);
        self.end_expr(e);
    }

    fn expr_payload(&mut self, base: u32, offset: u32, len: u32) {
        let e = self.expr("payload");
        self.attr_u32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        self.attr_u32(NFTA_PAYLOAD_BASE, base);
        self.attr_u32(NFTA_PAYLOAD_OFFSET, offset);
        self.attr_u32(NFTA_PAYLOAD_LEN, len);
        self.end_expr(e);
    }

    /// Prefixes into their family's set, each for its timeout (at least 1 ms).
    pub fn add_prefixes(&mut self, table: &str, prefixes: &[(IpNet, Duration)]) {
        let elems: Vec<_> = prefixes.iter().map(|&(net, t)| (Elem::of(net), t)).collect();
        self.add_elements(table, &elems);
    }

    /// Prefixes out of their family's set.
    pub fn del_prefixes(&mut self, table: &str, prefixes: &[IpNet]) {
        let elems: Vec<_> = prefixes.iter().map(|&net| Elem::of(net)).collect();
        self.del_elements(table, &elems);
    }

    /// Every element of `set` removed (a removal naming no element).
    pub fn flush_set(&mut self, table: &str, set: SetKind) {
        let at = self.message(NFT_MSG_DELSETELEM, 0);
        self.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
        self.attr_str(NFTA_SET_ELEM_LIST_SET, set.name);
        self.finish_message(at);
    }

    /// Elements into their sets, each for its timeout (at least 1 ms).
    pub fn add_elements(&mut self, table: &str, elems: &[(Elem, Duration)]) {
        self.elements(NFT_MSG_NEWSETELEM, NLM_F_CREATE, table, elems.iter().map(|&(e, t)| (e, Some(t))));
    }

    /// Elements out of their sets (the kernel refuses the batch if one is not there).
    pub fn del_elements(&mut self, table: &str, elems: &[Elem]) {
        self.elements(NFT_MSG_DELSETELEM, 0, table, elems.iter().map(|&e| (e, None)));
    }

    fn elements(&mut self, kind: u16, flags: u16, table: &str, items: impl Iterator<Item = (Elem, Option<Duration>)>) {
        let items: Vec<_> = items.collect();
        for set in SETS {
            let of_set: Vec<_> = items.iter().copied().filter(|(e, _)| e.set() == set).collect();
            // an attribute's length is 16 bits: a message holds a few hundred elements
            for chunk in of_set.chunks(PER_MESSAGE) {
                self.element_list(kind, flags, table, set, chunk);
            }
        }
    }

    fn element_list(&mut self, kind: u16, flags: u16, table: &str, set: SetKind, items: &[(Elem, Option<Duration>)]) {
        let at = self.message(kind, flags);
        self.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
        self.attr_str(NFTA_SET_ELEM_LIST_SET, set.name);
        let list = self.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        for &(elem, timeout) in items {
            let (start, end) = elem.keys();
            let elem = self.nest(NFTA_LIST_ELEM);
            self.key(&start);
            if let Some(t) = timeout {
                self.attr_u64(NFTA_SET_ELEM_TIMEOUT, u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1));
            }
            self.end_nest(elem);
            if let (true, Some(end)) = (set.interval, end) {
                let elem = self.nest(NFTA_LIST_ELEM);
                self.attr_u32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
                self.key(&end);
                self.end_nest(elem);
            }
        }
        self.end_nest(list);
        self.finish_message(at);
    }

    /// The batch's bytes, ended; and how many acknowledgements to await.
    pub fn finish(mut self) -> (Vec<u8>, u32) {
        let at = self.buf.len();
        self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.finish_message(at);
        (self.buf, self.messages)
    }

    // ---- encoding ------------------------------------------------------------------------

    fn message(&mut self, kind: u16, flags: u16) -> usize {
        let at = self.buf.len();
        self.messages += 1;
        self.header((NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | NLM_F_ACK | flags, NFPROTO_INET, 0);
        at
    }

    /// nlmsghdr (length filled in by `finish_message`) and nfgenmsg.
    fn header(&mut self, kind: u16, flags: u16, family: u8, res_id: u16) {
        self.seq = self.seq.wrapping_add(1);
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    fn finish_message(&mut self, at: usize) {
        let len = u32::try_from(self.buf.len() - at).unwrap_or(u32::MAX);
        self.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn attr_str(&mut self, kind: u16, s: &str) {
        let mut payload = s.as_bytes().to_vec();
        payload.push(0);
        self.attr(kind, &payload);
    }

    fn attr_u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    fn attr_u64(&mut self, kind: u16, v: u64) {
        self.attr(kind, &v.to_be_bytes());
    }

    fn key(&mut self, addr: &[u8]) {
        let key = self.nest(NFTA_SET_ELEM_KEY);
        self.attr(NFTA_DATA_VALUE, addr);
        self.end_nest(key);
    }

    fn nest(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end_nest(&mut self, at: usize) {
        let len = u16::try_from(self.buf.len() - at).unwrap_or(u16::MAX);
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// A netfilter netlink socket.
#[derive(Debug)]
pub struct Socket {
    fd: std::os::fd::OwnedFd,
}

impl Socket {
    /// Opens one; refused without CAP_NET_ADMIN (at the first batch) or without netlink.
    pub fn open() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: socket(2) with constant arguments; the descriptor is owned below
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nothing else owns
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(Socket { fd })
    }

    /// Adds `prefixes` to their sets in batches of [`PER_BATCH`] (each a transaction of
    /// its own), numbering messages from `seq`.
    pub fn add_all(&self, table: &str, prefixes: &[(IpNet, Duration)], seq: u32) -> io::Result<()> {
        for (i, chunk) in prefixes.chunks(PER_BATCH).enumerate() {
            let mut b = Batch::new(seq.wrapping_add(u32::try_from(i).unwrap_or(0).wrapping_mul(64)));
            b.add_prefixes(table, chunk);
            self.apply(b)?;
        }
        Ok(())
    }

    /// Sends `batch` and reads its acknowledgements: the first error the kernel gives
    /// (the whole batch is then undone), or Ok.
    pub fn apply(&self, batch: Batch) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (bytes, mut awaited) = batch.finish();
        // SAFETY: sends `bytes` from a live buffer on our descriptor
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 65536];
        while awaited > 0 {
            // SAFETY: receives into a live buffer of its length on our descriptor
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let answer = buf.get(..usize::try_from(n).unwrap_or(0)).unwrap_or_default();
            awaited = awaited.saturating_sub(acknowledgements(answer)?);
        }
        Ok(())
    }
}

/// Reads one netlink answer from the kernel: how many acknowledgements it holds, or the
/// first error it reports (or that it is malformed).
pub fn acknowledgements(answer: &[u8]) -> io::Result<u32> {
    let mut acks = 0u32;
    let mut rest = answer;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < 16 || len > rest.len() {
            return Err(io::Error::other("a malformed netlink answer"));
        }
        if kind == NLMSG_ERROR {
            let code = rest.get(16..20).map_or(0, |c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
            if code != 0 {
                // the kernel sends the error negated
                return Err(io::Error::from_raw_os_error(code.checked_neg().unwrap_or(i32::MAX)));
            }
            acks = acks.saturating_add(1);
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Ok(acks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_frames_each_message_and_counts_its_acknowledgements() {
        let mut b = Batch::new(100);
        b.new_table("mxgate");
        b.add_prefixes("mxgate", &[("192.0.2.0/24".parse().unwrap(), Duration::from_secs(60))]);
        let (bytes, acks) = b.finish();
        assert_eq!(acks, 2, "the table and one element list; not the batch's begin and end");
        // walk the messages: each length fits, the sequence numbers follow on
        let mut rest = &bytes[..];
        let mut seqs = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
            assert!(len >= 20 && len.is_multiple_of(4) && len <= rest.len(), "{len}");
            seqs.push(u32::from_ne_bytes(rest[8..12].try_into().unwrap()));
            rest = &rest[len..];
        }
        assert_eq!(seqs, [101, 102, 103, 104]);
    }

    #[test]
    fn answers_are_counted_and_errors_and_garbage_refused() {
        let message = |kind: u16, code: i32| {
            let mut m = 36u32.to_ne_bytes().to_vec();
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(&code.to_ne_bytes());
            m.extend_from_slice(&[0; 16]);
            m
        };
        let two = [message(NLMSG_ERROR, 0), message(NLMSG_ERROR, 0)].concat();
        assert_eq!(acknowledgements(&two).unwrap(), 2);
        let refused = acknowledgements(&message(NLMSG_ERROR, -libc::ENOENT)).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ENOENT));
        assert!(acknowledgements(&message(NLMSG_ERROR, i32::MIN)).is_err(), "no overflow");
        assert!(acknowledgements(&[0xff; 20]).is_err(), "a length past the answer");
        assert_eq!(acknowledgements(&[0; 10]).unwrap(), 0, "too short for a header: nothing");
    }

    #[test]
    fn a_prefix_is_its_first_address_and_the_one_after_its_last() {
        let bounds = |net: &str| Elem::of(net.parse().unwrap()).keys();
        let (start, end) = bounds("192.0.2.0/24");
        assert_eq!((start, end), (vec![192, 0, 2, 0], Some(vec![192, 0, 3, 0])));
        let (_, end) = bounds("255.255.255.0/24");
        assert_eq!(end, None, "to the end of the address space");
        assert_eq!(bounds("192.0.2.7/32"), (vec![192, 0, 2, 7], None), "an address: no interval");
        let (start, end) = bounds("2001:db8::/32");
        assert_eq!(start[..4], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(end.unwrap()[..4], [0x20, 0x01, 0x0d, 0xb9]);
    }
}
