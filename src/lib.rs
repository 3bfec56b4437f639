//! mxgate: an SMTP edge relay that judges every peer before the banner.
//!
//! Layers, from the wire in:
//! - [`net`]: per-core drivers (io_uring, epoll) that accept, run the [`gate`] and move
//!   bytes for [`smtp::Session`]s; the only code that touches sockets.
//! - [`gate`]: the access decision and the deny line, before any session exists.
//! - [`smtp`]: the sans-IO protocol state machine.
//! - [`snapshot`]: config and lists loaded as one immutable value ([`config`], [`access`]).
//! - [`abuse`]: failure counters, bans, connection counts; [`stats`]: what the workers did.
//! - [`cluster`]: the fleet: bans and failure counts shared with other nodes via Redis.
//! - [`statefile`]: the files mxgate writes (ban file, screening cache), atomically and privately.

pub mod abuse;
pub mod access;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod control;
pub mod datetime;
pub mod fuzzing;
pub mod gate;
pub mod histogram;
pub mod kernel;
pub mod logfmt;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod peer;
pub mod problem;
pub mod proxy;
pub mod random;
pub mod screen;
pub mod scripted;
pub mod service;
pub mod shadow;
pub mod shared;
pub mod smtp;
pub mod snapshot;
pub mod statefile;
pub mod stats;
pub mod template;
pub mod tls;
pub mod units;
