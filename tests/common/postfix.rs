//! A real Postfix for the tests, as a next hop: an instance of Debian's Postfix in a
//! temporary folder, its smtpd on a loopback port, mail for `example.com` queued (and
//! never delivered: its relayhost is the discard port). Needs root and the postfix
//! package: without them a test skips with a line, and fails in CI (`CI` set), where
//! `.ci/run` installs it. Running an instance from another folder needs that folder in
//! the main instance's `alternate_config_directories`: it is added for the instance's
//! life and taken out again after.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use super::{unused_port, wait_until};

pub struct Postfix {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    /// `alternate_config_directories` before ours was added.
    before: String,
}

fn postconf(args: &[&str]) -> Option<String> {
    let out = Command::new("postconf").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl Postfix {
    /// Starts an instance whose main.cf has `extra` too; `None` (with a skip line) where
    /// Postfix cannot run here.
    pub fn start(extra: &str) -> Option<Self> {
        // SAFETY: geteuid reads the process's effective user id
        let root = unsafe { libc::geteuid() } == 0;
        let found = postconf(&["-h", "mail_version"]).is_some();
        if !root || !found {
            assert!(std::env::var("CI").is_err(), "Postfix is not installed or not root (.ci/run installs it)");
            eprintln!("SKIPPED: Postfix needs root and the postfix package (apt-get install postfix)");
            return None;
        }
        let dir = tempfile::tempdir().expect("a folder");
        let pf = dir.path();
        std::fs::set_permissions(pf, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        for sub in ["conf", "data", "queue/etc"] {
            std::fs::create_dir_all(pf.join(sub)).expect("mkdir");
        }
        let addr = unused_port();
        let main_cf = format!(
            "compatibility_level = 3.6\nqueue_directory = {p}/queue\ndata_directory = {p}/data\n\
             mail_owner = postfix\nsetgid_group = postdrop\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n\
             myhostname = hop.test\nmydestination =\nrelay_domains = example.com\nrelayhost = [127.0.0.1]:9\n\
             mynetworks = 127.0.0.0/8\nsmtpd_recipient_restrictions = permit_auth_destination, reject\n\
             maillog_file = {p}/maillog\nmaillog_file_prefixes = {p}\n{extra}",
            p = pf.display()
        );
        std::fs::write(pf.join("conf/main.cf"), main_cf).expect("main.cf");
        let services = [
            format!("{} inet n - n - - smtpd", addr.port()),
            "pickup unix n - n 60 1 pickup".into(),
            "cleanup unix n - n - 0 cleanup".into(),
            "qmgr unix n - n 300 1 qmgr".into(),
            "rewrite unix - - n - - trivial-rewrite".into(),
            "bounce unix - - n - 0 bounce".into(),
            "defer unix - - n - 0 bounce".into(),
            "trace unix - - n - 0 bounce".into(),
            "verify unix - - n - 1 verify".into(),
            "proxymap unix - - n - - proxymap".into(),
            "smtp unix - - n - - smtp".into(),
            "relay unix - - n - - smtp".into(),
            "error unix - - n - - error".into(),
            "retry unix - - n - - error".into(),
            "discard unix - - n - - discard".into(),
            "anvil unix - - n - 1 anvil".into(),
            "scache unix - - n - 1 scache".into(),
            "postlog unix-dgram n - n - 1 postlogd".into(),
        ];
        std::fs::write(pf.join("conf/master.cf"), services.join("\n") + "\n").expect("master.cf");
        let conf = pf.join("conf").display().to_string();
        let before = postconf(&["-h", "alternate_config_directories"]).unwrap_or_default();
        let with_ours = format!("alternate_config_directories = {before} {conf}");
        assert!(postconf(&["-e", with_ours.trim()]).is_some(), "postconf -e");
        let chown = Command::new("chown").args(["-R", "postfix"]).arg(pf.join("data")).status();
        assert!(chown.is_ok_and(|s| s.success()), "chown");
        let _ = Command::new("postfix").args(["-c", &conf, "set-permissions"]).output();
        let started = Command::new("postfix").args(["-c", &conf, "start"]).output().expect("postfix start");
        let postfix = Postfix { addr, dir, before };
        assert!(started.status.success(), "postfix start: {}", String::from_utf8_lossy(&started.stderr));
        wait_until("Postfix's smtpd answers", || std::net::TcpStream::connect(addr).is_ok());
        Some(postfix)
    }

    /// The instance's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// A queued message's records as `postcat` prints them (its envelope and DSN fields).
    pub fn postcat(&self, queue_id: &str) -> String {
        let out = Command::new("postcat").args(["-c", &self.conf(), "-e", "-q", queue_id]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
            .unwrap_or_default()
    }

    fn conf(&self) -> String {
        Path::new(self.dir.path()).join("conf").display().to_string()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix").args(["-c", &self.conf(), "stop"]).output();
        let _ = postconf(&["-e", &format!("alternate_config_directories = {}", self.before)]);
    }
}
