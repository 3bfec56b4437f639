//! A real Exim for the tests, as a sending client: Debian's `exim4-daemon-light`, whose
//! package conflicts with Postfix's (the next hop of other tests), so `.ci/run` unpacks it
//! (`apt-get download` + `dpkg -x`) into `target/exim` instead of installing it, with the
//! user its binary was built for (`Debian-exim`) and the library it needs. Each run has
//! its own configuration, spool and log in a temporary folder; the one router sends every
//! message to mxgate. Needs root: without it or the binary a test skips with a line, and
//! fails in CI (`CI` set).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the binary is: installed, or unpacked by `.ci/run`.
fn binary() -> Option<PathBuf> {
    let unpacked = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/exim/usr/sbin/exim4");
    [PathBuf::from("/usr/sbin/exim4"), unpacked].into_iter().find(|p| p.exists())
}

/// What one `exim -odi -v` delivery printed, and how it ended.
pub struct Sent {
    /// Its verbose SMTP dialogue and log lines.
    pub transcript: String,
    pub ok: bool,
}

/// Submits `message` for `rcpt` and delivers it at once to `to` over SMTP, CHUNKING
/// allowed; `None` (with a skip line) where Exim cannot run here.
pub fn send(to: SocketAddr, rcpt: &str, message: &[u8]) -> Option<Sent> {
    // SAFETY: geteuid reads the process's effective user id
    let root = unsafe { libc::geteuid() } == 0;
    let user = Command::new("id").arg("Debian-exim").output().is_ok_and(|o| o.status.success());
    let Some(exim) = binary().filter(|_| root && user) else {
        assert!(std::env::var("CI").is_err(), "Exim is not unpacked, or not root (.ci/run unpacks it)");
        eprintln!("SKIPPED: Exim needs root, the Debian-exim user and exim4 (see .ci/run)");
        return None;
    };
    let dir = tempfile::tempdir().expect("a folder");
    let d = dir.path();
    for sub in ["spool", "log"] {
        std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        let chown = Command::new("chown").args(["-R", "Debian-exim:Debian-exim"]).arg(d.join(sub)).status();
        assert!(chown.is_ok_and(|s| s.success()), "chown the spool");
    }
    let conf = format!(
        "primary_hostname = sender.test\nspool_directory = {d}/spool\nlog_file_path = {d}/log/%slog\n\
         exim_path = {exim}\nkeep_environment =\n\
         begin routers\nto_mxgate:\n  driver = manualroute\n  route_list = * {ip}\n  transport = to_mxgate\n  self = send\n\
         begin transports\nto_mxgate:\n  driver = smtp\n  port = {port}\n  hosts_try_chunking = *\n  hosts_avoid_tls = *\n  allow_localhost\n\
         begin retry\n* * F,1m,1m\n",
        d = d.display(),
        exim = exim.display(),
        ip = to.ip(),
        port = to.port()
    );
    std::fs::write(d.join("exim.conf"), conf).expect("exim.conf");
    // bounded: a stuck conversation ends the test, not the suite
    let mut child = Command::new("timeout")
        .arg("60")
        .arg(&exim)
        .arg("-C")
        .arg(d.join("exim.conf"))
        .args(["-odi", "-v", rcpt])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run exim");
    child.stdin.take().expect("stdin").write_all(message).expect("the message to exim");
    let out = child.wait_with_output().expect("exim ends");
    let mut transcript = String::from_utf8_lossy(&out.stdout).into_owned();
    transcript += &String::from_utf8_lossy(&out.stderr);
    transcript += &std::fs::read_to_string(d.join("log/mainlog")).unwrap_or_default();
    let ok = transcript.contains(&format!("=> {rcpt}"));
    Some(Sent { transcript, ok })
}
