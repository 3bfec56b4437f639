//! Runs the real `mxgate` binary on ephemeral loopback ports and talks to it as many
//! peers: each client socket is bound to its own source address in 127.0.0.0/8 (or ::1).

#![allow(dead_code, reason = "each test binary uses a different part of this module")]

pub mod config;
pub mod dns;
pub mod exim;
pub mod nexthop;
pub mod postfix;
pub mod prometheus;
pub mod redis_server;

#[allow(unused_macros, reason = "not every test binary runs end-to-end behaviours")]
/// `for_both_drivers!(a, b)`: tests `uring::a`, `epoll::a`, ... calling `a("uring")`,
/// `a("epoll")`: every end-to-end behaviour is checked on both drivers.
macro_rules! for_both_drivers {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { super::$name("uring") })*
        }
        mod epoll {
            $(#[test] fn $name() { super::$name("epoll") })*
        }
    };
}

#[allow(unused_macros, reason = "not every test binary has behaviours the driver takes no part in")]
/// `on_one_driver!(a, b)`: tests `once::a`, ... calling `a("uring")`: behaviours the
/// driver takes no part in beyond moving bytes (the gate's and abuse control's decisions,
/// SMTP rules, configuration and reload, the control socket, metrics, state files, log
/// lines, TLS settings) run once; the drivers' own paths (accept, the deny line, bytes,
/// timers, connect failures, pooling, drain, DNS sockets) run on both
/// (`for_both_drivers!`). What the drivers share is also tested through the fake I/O
/// (`src/conn/tests.rs`).
macro_rules! on_one_driver {
    ($($name:ident),* $(,)?) => {
        mod once {
            $(#[test] fn $name() { super::$name("uring") })*
        }
    };
}

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

/// Longest any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn mxgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_mxgate")
}

/// A folder holding a config file and its list files.
pub struct Files {
    pub dir: tempfile::TempDir,
}

impl Files {
    pub fn new(config: &str, lists: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("mxgate.toml"), config).expect("write config");
        for (name, text) in lists {
            std::fs::write(dir.path().join(name), text).expect("write list");
        }
        Files { dir }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("mxgate.toml")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A running `mxgate`, killed when dropped.
pub struct Mxgate {
    child: Child,
    pub addrs: Vec<SocketAddr>,
    log: mpsc::Receiver<String>,
    /// Every log line read so far.
    pub seen: Vec<String>,
    pub files: Files,
}

/// Whether `program` runs (`program --version`); where it does not, a skip line naming
/// the Debian `package`, and a failure under CI (`CI` set: `.ci/run` installs it).
pub fn installed(program: &str, package: &str) -> bool {
    let found = Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").is_err(), "{program} is not installed (.ci/run installs {package})");
        eprintln!("SKIPPED: {program} is not installed (apt-get install {package})");
    }
    found
}

/// Whether the tests run as root; where not, a skip line saying `what` needs it, and a
/// failure under CI (`.ci/run` runs as root).
pub fn root(what: &str) -> bool {
    // SAFETY: geteuid reads the process's effective user id
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(std::env::var("CI").is_err(), "{what} needs root in CI");
        eprintln!("SKIPPED: {what} needs root");
    }
    root
}

/// An nftables table (family inet) a test made or had mxgate make, removed when dropped:
/// a failing test (whose mxgate is killed without its exit) leaves nothing behind.
pub struct NftTable(pub String);

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.0]).output();
    }
}

/// A field of a log line, text (`name=value`) or JSON (`"name":"value"`).
pub fn log_field(line: &str, name: &str) -> Option<String> {
    if let Some(rest) = line.split(&format!("\"{name}\":\"")).nth(1) {
        return rest.split('"').next().map(str::to_owned);
    }
    line.split(&format!("{name}=")).nth(1).and_then(|s| s.split_whitespace().next()).map(str::to_owned)
}

impl Mxgate {
    /// Starts `mxgate --config <config> --io <io>` and waits until it listens.
    pub fn start(config: &str, lists: &[(&str, &str)], io: &str) -> Self {
        Mxgate::start_as(config, lists, io, io, |_| {})
    }

    /// Starts `mxgate --io <io>` with `prepare` applied to the command, and checks that it
    /// listens on the driver `expect_driver`.
    pub fn start_as(
        config: &str,
        lists: &[(&str, &str)],
        io: &str,
        expect_driver: &str,
        prepare: impl FnOnce(&mut Command),
    ) -> Self {
        Mxgate::spawn(Files::new(config, lists), io, expect_driver, prepare)
    }

    /// Kills the process with SIGKILL (no chance to save anything) and starts it again
    /// on the same files.
    pub fn kill_and_restart(mut self, io: &str) -> Self {
        self.signal(libc::SIGKILL);
        self.wait_exit();
        let files = std::mem::replace(&mut self.files, Files::new("", &[]));
        drop(self);
        Mxgate::spawn(files, io, io, |_| {})
    }

    /// Starts mxgate as `wrapper` runs it (`wrapper` then mxgate's path and arguments:
    /// e.g. capsh dropping a capability).
    pub fn start_under(wrapper: &[&str], config: &str, lists: &[(&str, &str)], io: &str) -> Self {
        Mxgate::spawn_as(Files::new(config, lists), wrapper, io, io, |_| {})
    }

    fn spawn(files: Files, io: &str, expect_driver: &str, prepare: impl FnOnce(&mut Command)) -> Self {
        Mxgate::spawn_as(files, &[], io, expect_driver, prepare)
    }

    fn spawn_as(
        files: Files,
        wrapper: &[&str],
        io: &str,
        expect_driver: &str,
        prepare: impl FnOnce(&mut Command),
    ) -> Self {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(mxgate_bin());
                c
            }
            None => Command::new(mxgate_bin()),
        };
        command.arg("--config").arg(files.config()).args(["--io", io]).env("MXGATE_LOG", "info");
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        prepare(&mut command);
        let mut child = command.spawn().expect("spawn mxgate");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[mxgate] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut m = Mxgate { child, addrs: Vec::new(), log, seen: Vec::new(), files };
        let line = m.wait_for_log("mxgate listening");
        let addrs = log_field(&line, "addresses").expect("addresses in the start-up line");
        m.addrs = addrs.split(',').map(|a| a.parse().expect("a socket address")).collect();
        let io = log_field(&line, "io");
        assert_eq!(io.as_deref(), Some(expect_driver), "driver {expect_driver} expected: {line}");
        m
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The process's CPU time so far (user and system).
    pub fn cpu_time(&self) -> std::time::Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("/proc/PID/stat");
        // the fields after the command name, which is in parentheses
        let fields: Vec<&str> = stat.rsplit_once(") ").expect("stat").1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // SAFETY: sysconf only reads a system constant
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        std::time::Duration::from_millis(ticks * 1000 / hz)
    }

    /// A line containing `text` among those read so far (those before start-up included).
    pub fn saw(&self, text: &str) -> Option<&str> {
        self.seen.iter().find(|l| l.contains(text)).map(String::as_str)
    }

    /// Waits (bounded) for a log line containing `text`.
    pub fn wait_for_log(&mut self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line with {text:?} within {WAIT:?} (exited: {:?})", self.child.try_wait()),
            }
        }
    }

    /// Reads the log lines written so far (without waiting) into `seen`.
    pub fn drain_log(&mut self) {
        while let Ok(line) = self.log.try_recv() {
            self.seen.push(line);
        }
    }

    /// Waits (bounded) for a log line containing `text`, unless one was read already.
    pub fn wait_for_log_once(&mut self, text: &str) -> String {
        self.drain_log();
        match self.saw(text) {
            Some(line) => line.to_owned(),
            None => self.wait_for_log(text),
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0);
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "mxgate did not exit within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Mxgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection from `source` (any port) to `to`, with bounded reads and writes.
pub fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let source: IpAddr = source.parse().expect("source address");
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::new(source, 0).into()).expect("bind the source address");
    socket.connect_timeout(&to.into(), WAIT).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    stream
}

/// How a read of everything up to the end ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Eof,
    Error(std::io::ErrorKind),
}

/// Reads until the peer closes (or an error, or WAIT).
pub fn read_to_end(stream: &mut TcpStream) -> (String, End) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break End::Error(e.kind()),
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), end)
}

/// Reads until `want` replies (lines whose 4th byte is a space) have arrived.
pub fn read_replies(stream: &mut impl Read, want: usize) -> String {
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while got.split("\r\n").filter(|l| l.len() >= 4 && l.as_bytes()[3] == b' ').count() < want {
        match stream.read(&mut buf) {
            Ok(0) => panic!("connection closed after {got:?}"),
            Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => panic!("read failed ({e}) after {got:?}"),
        }
    }
    got
}

pub fn send(stream: &mut impl Write, bytes: &[u8]) {
    stream.write_all(bytes).expect("write");
}

/// `mxgate <args>`: exit code and stdout+stderr.
pub fn run_cli(args: &[&str], config: &Path) -> (i32, String) {
    let out = Command::new(mxgate_bin()).args(args).arg("--config").arg(config).output().expect("run mxgate");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Makes the command's process refuse `io_uring_setup` with EPERM, as the default seccomp
/// profiles of container runtimes do.
#[cfg(target_arch = "x86_64")]
pub fn refuse_io_uring(command: &mut Command) {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JUMP, BPF_K, BPF_LD, BPF_RET, BPF_STMT, BPF_W};
    use std::os::unix::process::CommandExt;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // struct seccomp_data: the syscall number at offset 0, the architecture at 4
    // SAFETY: BPF_STMT and BPF_JUMP only build structs.
    let filter = unsafe {
        [
            BPF_STMT((BPF_LD | BPF_W | BPF_ABS) as u16, 4),
            BPF_JUMP((BPF_JMP | BPF_JEQ | BPF_K) as u16, AUDIT_ARCH_X86_64, 1, 0),
            BPF_STMT((BPF_RET | BPF_K) as u16, libc::SECCOMP_RET_ALLOW),
            BPF_STMT((BPF_LD | BPF_W | BPF_ABS) as u16, 0),
            BPF_JUMP((BPF_JMP | BPF_JEQ | BPF_K) as u16, libc::SYS_io_uring_setup as u32, 0, 1),
            BPF_STMT((BPF_RET | BPF_K) as u16, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
            BPF_STMT((BPF_RET | BPF_K) as u16, libc::SECCOMP_RET_ALLOW),
        ]
    };
    // SAFETY: between fork and exec the closure only calls prctl, which is
    // async-signal-safe, on memory the closure owns.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

/// An address on loopback where nothing listens: a port bound, noted and released.
pub fn unused_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

pub const DENY_PREFIX: &str = "530 5.7.1 mx.test ESMTP denied access at ";

/// The peer reads exactly one deny line, then EOF; never a banner.
pub fn assert_denied(m: &Mxgate, source: &str, addr_index: usize) {
    let mut s = connect_from(source, m.addrs[addr_index]);
    let (got, end) = read_to_end(&mut s);
    assert!(got.starts_with(DENY_PREFIX) && got.ends_with(" +0000\r\n"), "{source}: {got:?}");
    assert_eq!(got.matches("\r\n").count(), 1, "{source}: exactly one line: {got:?}");
    assert!(!got.contains("220"), "{source}: no banner: {got:?}");
    assert_eq!(end, End::Eof, "{source}: closed after the line");
}

/// The peer gets the banner and a working session.
pub fn assert_allowed(m: &Mxgate, source: &str, addr_index: usize) {
    let mut s = connect_from(source, m.addrs[addr_index]);
    assert_eq!(read_replies(&mut s, 1), "220 mx.test ESMTP mxgate\r\n", "{source}");
    send(&mut s, b"QUIT\r\n");
    let (got, end) = read_to_end(&mut s);
    assert_eq!((got.as_str(), end), ("221 2.0.0 mx.test closing connection\r\n", End::Eof), "{source}");
}

/// Waits (bounded) until `done` holds.
/// The minute now (seconds since the epoch / 60): what once-a-minute sampling counts in.
pub fn minute() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 60)
}

pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
