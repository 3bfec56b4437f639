//! A worker's idle next-hop connections, reused across sessions.
//!
//! A connection comes back only clean (no transaction open at the next hop, nothing
//! pending), so the next session can send MAIL on it at once. One that leaves the pool
//! to be closed (expired, evicted, at exit) says QUIT first. At most
//! `[relay] max_idle_connections` wait per next hop, each at most `[relay] idle_timeout`
//! (shorter than next hops' own idle timeouts, so few go stale; a stale one is noticed
//! at its first command and replaced by the session). Connections are kept apart by the
//! `[relay] tls` they were made under (a reload may change it): a session that requires
//! TLS never gets one that went on in clear.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::HopState;
use crate::config::RelayTls;

struct Idle<S> {
    socket: S,
    hop: Box<HopState>,
    since: Instant,
}

/// Idle connections by next hop and TLS policy; `S` is the driver's socket type.
pub struct Pool<S> {
    idle: HashMap<(SocketAddr, RelayTls), VecDeque<Idle<S>>>,
}

impl<S> Default for Pool<S> {
    fn default() -> Self {
        Pool { idle: HashMap::new() }
    }
}

impl<S> Pool<S> {
    /// The most recently used connection to `addr` made under `tls` (the least likely
    /// to be stale).
    pub fn take(&mut self, addr: SocketAddr, tls: RelayTls) -> Option<(S, Box<HopState>)> {
        let entry = self.idle.get_mut(&(addr, tls))?.pop_back()?;
        Some((entry.socket, entry.hop))
    }

    /// Keeps a clean connection; returns the one to close (with QUIT) when the pool for
    /// `addr` is full.
    pub fn put(
        &mut self,
        addr: SocketAddr,
        socket: S,
        hop: Box<HopState>,
        max: usize,
        now: Instant,
    ) -> Option<(S, Box<HopState>)> {
        if max == 0 {
            return Some((socket, hop));
        }
        let queue = self.idle.entry((addr, hop.up.tls_policy())).or_default();
        let evicted = (queue.len() >= max).then(|| queue.pop_front()).flatten().map(|e| (e.socket, e.hop));
        queue.push_back(Idle { socket, hop, since: now });
        evicted
    }

    /// Removes the connections idle for `timeout` or longer, to be closed (with QUIT).
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<(S, Box<HopState>)> {
        let mut gone = Vec::new();
        for queue in self.idle.values_mut() {
            while queue.front().is_some_and(|e| now.saturating_duration_since(e.since) >= timeout) {
                gone.extend(queue.pop_front().map(|e| (e.socket, e.hop)));
            }
        }
        gone
    }

    /// When the oldest connection expires.
    pub fn next_expiry(&self, timeout: Duration) -> Option<Instant> {
        self.idle.values().filter_map(|q| q.front()).map(|e| e.since + timeout).min()
    }

    /// Idle connections to `addr`.
    #[cfg(test)]
    pub fn len(&self, addr: SocketAddr) -> usize {
        self.idle.iter().filter(|((a, _), _)| *a == addr).map(|(_, q)| q.len()).sum()
    }

    #[cfg(test)]
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut S> {
        self.idle.values_mut().flat_map(|q| q.iter_mut().map(|e| &mut e.socket))
    }

    /// Every connection, for closing (with QUIT) at shutdown.
    pub fn drain(&mut self) -> Vec<(S, Box<HopState>)> {
        self.idle.drain().flat_map(|(_, q)| q.into_iter().map(|e| (e.socket, e.hop))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::client::Upstream;

    fn plain(tls: RelayTls) -> Box<HopState> {
        Box::new(HopState { up: Upstream::new("h", tls), tls: None })
    }

    #[test]
    fn bounded_most_recent_first_and_expiring() {
        let hop: SocketAddr = "127.0.0.1:2526".parse().unwrap();
        let other: SocketAddr = "127.0.0.1:2527".parse().unwrap();
        let t0 = Instant::now();
        let mut pool: Pool<u32> = Pool::default();
        assert!(pool.put(hop, 1, plain(RelayTls::Off), 2, t0).is_none());
        assert!(pool.put(hop, 2, plain(RelayTls::Off), 2, t0 + Duration::from_secs(1)).is_none());
        let socket = |gone: Option<(u32, Box<HopState>)>| gone.map(|(s, _)| s);
        let sockets = |gone: Vec<(u32, Box<HopState>)>| gone.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
        assert_eq!(
            socket(pool.put(hop, 3, plain(RelayTls::Off), 2, t0 + Duration::from_secs(2))),
            Some(1),
            "full: the oldest goes"
        );
        assert_eq!(pool.take(other, RelayTls::Off).map(|e| e.0), None);
        assert_eq!(pool.take(hop, RelayTls::Required).map(|e| e.0), None, "made under another policy");
        assert_eq!(pool.take(hop, RelayTls::Off).map(|e| e.0), Some(3));
        assert_eq!(pool.next_expiry(Duration::from_secs(30)), Some(t0 + Duration::from_secs(31)));
        assert_eq!(sockets(pool.expire(t0 + Duration::from_secs(30), Duration::from_secs(30))), Vec::<u32>::new());
        assert_eq!(sockets(pool.expire(t0 + Duration::from_secs(31), Duration::from_secs(30))), [2]);
        assert_eq!(socket(pool.put(hop, 4, plain(RelayTls::Off), 0, t0)), Some(4), "max 0: no pooling");
        assert!(pool.drain().is_empty());
    }
}
