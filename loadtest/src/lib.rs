//! Load-test tools for mxgate. For now: synthetic access lists shaped like real
//! blocklists, for the lookup benchmark and for whole-server measurements. The load
//! harness itself comes with its own issue.

pub mod prefixes;
