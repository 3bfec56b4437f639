//! Where the kernel or a seccomp policy refuses io_uring (container runtimes' default
//! profiles do), `io = "auto"` serves on epoll and says so once; `io = "uring"` refuses to
//! start with a clear error. The refusal is real: a seccomp filter in the child process.

#![cfg(target_arch = "x86_64")]

mod common;

use std::process::Command;

use common::{Files, Mxgate, connect_from, read_replies, read_to_end, refuse_io_uring, send};

const CONFIG: &str =
    "hostname = \"mx.test\"\n[listen]\naddresses = [\"127.0.0.1:0\"]\n[access]\nlist = \"access.list\"\n";

#[test]
fn auto_falls_back_to_epoll_and_says_so_once() {
    let m = Mxgate::start_as(CONFIG, &[("access.list", "127.0.9.9\n")], "auto", "epoll", refuse_io_uring);
    let warnings: Vec<&String> = m.seen.iter().filter(|l| l.contains("io_uring is not usable here")).collect();
    assert_eq!(warnings.len(), 1, "{:?}", m.seen);
    assert!(warnings[0].contains("WARN") && warnings[0].contains("using epoll"), "{}", warnings[0]);

    let mut denied = connect_from("127.0.9.9", m.addr());
    let (got, _) = read_to_end(&mut denied);
    assert!(got.starts_with("530 5.7.1 mx.test ESMTP denied access at "), "{got:?}");
    let mut allowed = connect_from("127.0.9.10", m.addr());
    assert_eq!(read_replies(&mut allowed, 1), "220 mx.test ESMTP mxgate\r\n");
    send(&mut allowed, b"QUIT\r\n");
    assert_eq!(read_to_end(&mut allowed).0, "221 2.0.0 mx.test closing connection\r\n");
}

#[test]
fn uring_demanded_but_refused_is_a_clear_error() {
    let files = Files::new(CONFIG, &[("access.list", "")]);
    let mut command = Command::new(common::mxgate_bin());
    command.arg("--config").arg(files.config()).args(["--io", "uring"]);
    refuse_io_uring(&mut command);
    let out = command.output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("io_uring is not usable here") && stderr.contains("Operation not permitted"), "{stderr}");
    assert!(!stderr.contains("mxgate listening"), "{stderr}");
}
