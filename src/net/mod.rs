//! Per-core drivers: N threads, each with its own SO_REUSEPORT listener per configured
//! address and its own event loop, sharing nothing but [`Shared`] (the snapshot, abuse
//! control, counts, the stop flag).
//!
//! Two drivers of one shape: `uring` (io_uring, the default) and `epoll` (mio, where the
//! kernel or a seccomp policy refuses io_uring). Each owns its listeners, sockets and
//! buffers and performs the operations its worker's [`conn::Host`](crate::conn::Host) and
//! connections ask for; the gate, SMTP, the pool and deadlines live there, once.

mod dns;
mod epoll;
mod listen;
mod uring;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::config::IoMode;
use crate::shared::Shared;

/// Bytes one read takes from a peer. A command line is at most 512 octets; this bounds
/// what one read can make a session answer (see `smtp`).
pub const READ_LEN: usize = 4096;

/// The driver a server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Uring,
    Epoll,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Uring => "uring",
            Driver::Epoll => "epoll",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(
        "cannot listen on {0}: address in use (another process listens on it; set [listen] share = true to join it on purpose)"
    )]
    InUse(SocketAddr),
    #[error("io_uring is not usable here ({0}); use `io = \"epoll\"` or `io = \"auto\"`")]
    UringUnavailable(uring::Unavailable),
    #[error("cannot start worker thread {thread}: {source}")]
    Worker { thread: usize, source: io::Error },
}

/// A running server: its workers and how to stop them.
pub struct Server {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    driver: Driver,
    wakers: Vec<Waker>,
    threads: Vec<JoinHandle<()>>,
}

/// Wakes one worker out of its wait.
enum Waker {
    Uring(uring::Waker),
    Epoll(mio::Waker),
}

impl Server {
    /// Binds every listener, starts the workers and returns once all of them serve.
    pub fn start(shared: Arc<Shared>, io: IoMode) -> Result<Server, StartError> {
        let snapshot = shared.snapshot();
        let driver = match io {
            IoMode::Epoll => Driver::Epoll,
            IoMode::Uring => {
                uring::probe().map_err(StartError::UringUnavailable)?;
                Driver::Uring
            }
            IoMode::Auto => match uring::probe() {
                Ok(()) => Driver::Uring,
                Err(why) => {
                    tracing::warn!("io_uring is not usable here ({why}); using epoll");
                    Driver::Epoll
                }
            },
        };
        let threads = snapshot.config.listen.threads_in_force();
        let listen = &snapshot.config.listen;
        let (per_thread, local_addrs) = listen::bind(&listen.addresses, threads, listen.share)?;

        let mut server =
            Server { shared: shared.clone(), local_addrs, driver, wakers: Vec::new(), threads: Vec::new() };
        let (ready_tx, ready_rx) = mpsc::channel();
        for (i, listeners) in per_thread.into_iter().enumerate() {
            let shared = shared.clone();
            let shared_for_guard = shared.clone();
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new().name(format!("mxgate-{driver}-{i}")).spawn(move || {
                let result = match driver {
                    Driver::Uring => uring::Worker::new(shared, listeners)
                        .map(|w| (Waker::Uring(w.waker()), Worker::Uring(Box::new(w)))),
                    Driver::Epoll => epoll::Worker::new(shared, listeners)
                        .and_then(|w| Ok((Waker::Epoll(w.waker()?), Worker::Epoll(Box::new(w))))),
                };
                match result {
                    Ok((waker, worker)) => {
                        let _alive = crate::shared::WorkerAlive(Arc::clone(&shared_for_guard), i);
                        let _ = ready.send(Ok(waker));
                        worker.run();
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            });
            let handle = spawned.map_err(|source| StartError::Worker { thread: i, source })?;
            server.threads.push(handle);
            match ready_rx.recv() {
                Ok(Ok(waker)) => server.wakers.push(waker),
                Ok(Err(source)) => return Err(StartError::Worker { thread: i, source }),
                Err(_) => {
                    return Err(StartError::Worker {
                        thread: i,
                        source: io::Error::other("worker exited while starting"),
                    });
                }
            }
        }
        shared.set_serving();
        Ok(server)
    }

    /// The addresses listened on (with the ports the kernel chose for port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn driver(&self) -> Driver {
        self.driver
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Stops accepting, tells every session the service is shutting down, and lets
    /// them finish within `[listen] drain_timeout`. Returns at once; `join` waits.
    pub fn shutdown(&self) {
        self.shared.stop();
        for w in &self.wakers {
            let woken = match w {
                Waker::Uring(w) => w.wake(),
                Waker::Epoll(w) => w.wake(),
            };
            if let Err(e) = woken {
                tracing::error!("cannot wake a worker to stop it: {e}");
            }
        }
    }

    /// Waits for every worker to finish.
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

enum Worker {
    Uring(Box<uring::Worker>),
    Epoll(Box<epoll::Worker>),
}

impl Worker {
    fn run(self) {
        match self {
            Worker::Uring(w) => w.run(),
            Worker::Epoll(w) => w.run(),
        }
    }
}
