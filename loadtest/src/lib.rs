//! mxgate's load-test harness (`mxgate-loadtest`): many peers at once, honest and hostile,
//! from many loopback addresses, every answer checked; and the synthetic access lists
//! shaped like real blocklists that the benchmarks load.
//!
//! - [`peer`]: one peer's conversation, sans-IO (what it sends, what it expects);
//!   [`attack`]: the hostile ones (dictionary attackers, slow peers);
//! - [`engine`]: threads of non-blocking connections running peers, latencies in
//!   HdrHistograms;
//! - [`sink`]: the next hop that counts and hashes every message relayed to it;
//! - [`scenario`]: the scenarios and the mxgate a run may start for itself;
//! - [`report`]: the summary table and the JSON;
//! - [`tls`]: the client side of STARTTLS and self-signed certificates;
//! - [`sources`]: loopback source ranges; [`prefixes`]: synthetic prefixes;
//! - [`probe`]: one blocking connection at a time, for the small measuring tools;
//!   [`spread`]: an attack spread over many addresses, each below the threshold;
//!   [`stallhop`]: a next hop that sits on MAIL.

pub mod attack;
pub mod engine;
pub mod flood;
pub mod peer;
pub mod plot;
pub mod prefixes;
pub mod probe;
pub mod proxy;
pub mod report;
pub mod scenario;
pub mod sink;
pub mod sources;
pub mod spread;
pub mod stallhop;
pub mod tls;
