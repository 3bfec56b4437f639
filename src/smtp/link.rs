//! A connection's link to the next hop, apart from the conversation it carries: which
//! next hop (`next_hops` in order), whether a pooled connection will do, dialing, the
//! client on it, whether it is clean, and the failover rule. `conn::Connection` owns it
//! beside the [`Session`](super::Session) (the peer's dialogue, which owns the replies
//! owed to the peer) and lends it to each session call that may forward, answer or fail
//! over; the connection dials, adopts, releases and closes it itself.
//!
//! ```text
//!   None ── MAIL ──► Wanted { hop, pooled_ok } ──driver dials──► Dialing { hop }
//!     ▲                  │ a pooled connection (Host)                │ connected
//!     │                  └──────────────────────► Up(client) ◄───────┘
//!     │                                             │ failed, refused, out of step,
//!     │   detached (pooled, closed) ◄── Release/Close │ timed out, body refused
//!     └─────────────────────────────────────────────┴──► Dropped ──driver closes──► None
//! ```
//!
//! `Release` (clean and idle) or `Close` comes when the session is over, or when it
//! needs another next hop than this one (a transaction of another route: [`Link::leave`]);
//! what it wants instead is taken from the session at `detach`.
//!
//! Failover: before the next hop acknowledged anything, a failed connection that came
//! from the pool (maybe stale) is replaced by a new one to the same hop; any other, by
//! the next hop in order ([`Link::failover`]).

use std::net::SocketAddr;

use super::client::Upstream;

/// What the next hop's socket is wanted for ([`Link::poll`]).
#[derive(Debug, PartialEq, Eq)]
pub enum HopTransmit<'a> {
    Idle,
    /// Connect to `addr`, a next hop of the session's own snapshot (whatever a reload
    /// made current since); a pooled connection to it will do when `pooled_ok`.
    Connect {
        addr: SocketAddr,
        pooled_ok: bool,
    },
    Send(&'a [u8]),
    Receive,
    /// The connection is idle and clean: [`Link::detach`] it into the pool.
    Release,
    /// [`Link::detach`] it and close the connection (or give up connecting).
    Close,
}

/// The connection to the next hop.
#[derive(Debug, Default)]
pub enum Link {
    #[default]
    None,
    Wanted {
        hop: usize,
        pooled_ok: bool,
    },
    Dialing {
        hop: usize,
    },
    Up(Box<UpLink>),
    /// For the driver to close.
    Dropped,
}

#[derive(Debug)]
pub struct UpLink {
    pub(super) up: Upstream,
    pub(super) hop: usize,
    /// Came from the pool, and no reply has come on it since: a failure may be a stale
    /// connection, so the command is tried again on a new one.
    pub(super) untested: bool,
    /// No transaction is open at the next hop: reusable as it is.
    pub(super) clean: bool,
    /// The trace header waits for the body's first bytes, to go out in one segment with
    /// them: a segment of its own costs a send here and a wakeup and an ACK at the next hop.
    pub(super) hold: bool,
    /// The session needs another next hop (a transaction of another route): released to
    /// the pool (clean and idle) or closed, as at the session's end.
    pub(super) leaving: bool,
}

impl Link {
    /// What the driver does next on the next hop's side; `open`: the session goes on.
    pub fn poll<'a>(&'a self, open: bool, next_hops: &[SocketAddr]) -> HopTransmit<'a> {
        match self {
            Link::None => HopTransmit::Idle,
            Link::Wanted { hop, pooled_ok } if open => match next_hops.get(*hop) {
                Some(&addr) => HopTransmit::Connect { addr, pooled_ok: *pooled_ok },
                // the session only asks for hops the settings have
                None => HopTransmit::Idle,
            },
            Link::Wanted { .. } => HopTransmit::Idle,
            Link::Dialing { .. } if open => HopTransmit::Idle,
            Link::Dialing { .. } | Link::Dropped => HopTransmit::Close,
            Link::Up(l) if !open || l.leaving => {
                if l.clean && l.up.is_idle() {
                    HopTransmit::Release
                } else {
                    HopTransmit::Close
                }
            }
            Link::Up(l) if !l.up.output().is_empty() && !l.hold => HopTransmit::Send(l.up.output()),
            Link::Up(l) if l.up.awaits_reply() => HopTransmit::Receive,
            Link::Up(_) => HopTransmit::Idle,
        }
    }

    /// A connection to `next_hops[hop]` is wanted (from the pool when `pooled_ok`),
    /// unless one is there or coming.
    pub(super) fn want(&mut self, hop: usize, pooled_ok: bool) {
        if matches!(self, Link::None) {
            *self = Link::Wanted { hop, pooled_ok };
        }
    }

    /// The driver started connecting.
    pub fn dialing(&mut self) {
        if let Link::Wanted { hop, .. } = *self {
            *self = Link::Dialing { hop };
        }
    }

    /// The connection asked for: new (its greeting still to come) or, when `reused`,
    /// from the pool.
    pub fn attach(&mut self, up: Upstream, reused: bool) {
        let hop = match *self {
            Link::Wanted { hop, .. } | Link::Dialing { hop } => hop,
            _ => 0,
        };
        *self = Link::Up(Box::new(UpLink { up, hop, untested: reused, clean: true, hold: false, leaving: false }));
    }

    /// Takes the connection for the driver (to pool after `Release`, to close after
    /// `Close`), with its next hop's address; `wanted` is what the session still needs
    /// (a connection for MAIL, after a failed one: `Session::wanted_link`).
    pub fn detach(
        &mut self,
        next_hops: &[SocketAddr],
        wanted: Option<(usize, bool)>,
    ) -> Option<(Upstream, SocketAddr)> {
        let old = std::mem::replace(self, Link::None);
        if let Some((hop, pooled_ok)) = wanted {
            *self = Link::Wanted { hop, pooled_ok };
        }
        match old {
            Link::Up(l) => next_hops.get(l.hop).map(|&addr| (l.up, addr)),
            _ => None,
        }
    }

    /// Drops the connection (the driver closes it).
    pub(super) fn drop(&mut self) {
        *self = match std::mem::replace(self, Link::None) {
            Link::None | Link::Wanted { .. } => Link::None,
            Link::Dialing { .. } | Link::Up(_) | Link::Dropped => Link::Dropped,
        };
    }

    /// The session needs a next hop other than this one: a connection goes (to the pool
    /// when clean and idle), one being made is given up.
    pub(super) fn leave(&mut self) {
        match self {
            Link::Up(l) => l.leaving = true,
            Link::Wanted { .. } => *self = Link::None,
            Link::Dialing { .. } => self.drop(),
            Link::None | Link::Dropped => {}
        }
    }

    /// The next hop (its index in `next_hops`) it is, or is to be, connected to.
    pub(super) fn hop(&self) -> Option<usize> {
        match self {
            Link::Wanted { hop, .. } | Link::Dialing { hop } => Some(*hop),
            Link::Up(l) => Some(l.hop),
            Link::None | Link::Dropped => None,
        }
    }

    /// Being connected: dialing, or connected and not yet greeted (not a pooled one).
    pub(super) fn connecting(&self) -> bool {
        match self {
            Link::Wanted { .. } | Link::Dialing { .. } => true,
            Link::Up(l) => !l.untested && !l.up.is_ready(),
            Link::None | Link::Dropped => false,
        }
    }

    /// Connected and greeted, with what it offers.
    pub(super) fn ready(&self) -> bool {
        matches!(self, Link::Up(l) if l.up.is_ready())
    }

    /// The next hop said 220 to STARTTLS: its address (as `next_hops` names it), once,
    /// for the connection's TLS layer to start the handshake.
    pub fn take_starttls(&mut self, next_hops: &[SocketAddr]) -> Option<SocketAddr> {
        let Link::Up(l) = self else { return None };
        if !l.up.take_starttls() {
            return None;
        }
        next_hops.get(l.hop).copied()
    }

    /// The handshake with the next hop is done: EHLO again, under TLS.
    pub fn tls_started(&mut self) {
        if let Link::Up(l) = self {
            l.up.tls_started();
        }
    }

    /// No transaction is open at the next hop (so far as its replies say) from now on.
    pub(super) fn set_clean(&mut self) {
        if let Link::Up(l) = self {
            l.clean = true;
        }
    }

    /// The connection failed before the next hop acknowledged anything: where to try
    /// next, within the route's `hops` (places in `next_hops`, in order). A pooled
    /// connection that failed untested may just have been stale: a new one to the same
    /// hop; any other: the route's next hop, and the ones after it (from the pool when
    /// `true`).
    pub(super) fn failover<'h>(&self, hops: &'h [usize]) -> Option<(&'h [usize], bool)> {
        let (hop, stale) = match self {
            Link::Up(l) => (l.hop, l.untested),
            Link::Wanted { hop, .. } | Link::Dialing { hop } => (*hop, false),
            Link::None | Link::Dropped => return None,
        };
        let at = hops.iter().position(|&h| h == hop)?;
        let next = if stale { &hops[at..=at] } else { &hops[at + 1..] };
        (!next.is_empty()).then_some((next, !stale))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RelayTls;

    #[test]
    fn failover_is_a_new_connection_for_a_stale_one_else_the_next_hop() {
        let hops: Vec<SocketAddr> = vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()];
        let mut l = Link::None;
        l.want(0, true);
        assert_eq!(l.poll(true, &hops), HopTransmit::Connect { addr: hops[0], pooled_ok: true });
        assert_eq!(l.poll(false, &hops), HopTransmit::Idle, "a session that ends dials nothing");
        assert_eq!(l.failover(&[0, 1]), Some((&[1][..], true)), "hop 0 unreachable: the next one");
        assert_eq!(l.failover(&[1, 0]), None, "in the route's order: none after it");
        l.attach(Upstream::new("mx.test", RelayTls::Off), true);
        assert_eq!(l.failover(&[0, 1]), Some((&[0][..], false)), "pooled and untested: maybe stale, a new one");
        let mut l = Link::Wanted { hop: 1, pooled_ok: true };
        l.dialing();
        assert!(matches!(l, Link::Dialing { hop: 1 }));
        assert_eq!(l.failover(&[0, 1]), None, "no hop after the last");
        l.drop();
        assert!(matches!(l, Link::Dropped));
        assert_eq!(l.poll(true, &hops), HopTransmit::Close);
        assert!(l.detach(&hops, Some((0, false))).is_none());
        assert!(matches!(l, Link::Wanted { hop: 0, pooled_ok: false }), "what the session still needs");
    }
}
