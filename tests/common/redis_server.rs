//! A real `redis-server` (Debian's package) on a free loopback port, with no persistence:
//! killed when dropped, and killable and restartable on the same port.

use std::process::{Child, Command, Stdio};

use super::{unused_port, wait_until};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// TLS only (a self-signed certificate for 127.0.0.1, in `ca.pem`), and a password.
    tls: bool,
    password: Option<String>,
}

impl RedisServer {
    /// `None` (with a skip line) when `redis-server` is not installed; in CI (`CI` set)
    /// its absence fails the test instead.
    pub fn start() -> Option<Self> {
        RedisServer::start_with(false, None)
    }

    /// Speaking TLS only (its certificate, for 127.0.0.1, is [`RedisServer::ca_file`]),
    /// and asking for `password` when given.
    pub fn start_with(tls: bool, password: Option<&str>) -> Option<Self> {
        if !super::installed("redis-server", "redis-server") {
            return None;
        }
        let dir = tempfile::tempdir().expect("a folder");
        let port = unused_port().port();
        if tls {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a key");
            let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("parameters");
            let cert = params.self_signed(&key).expect("a certificate");
            std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write ca.pem");
            std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).expect("write key.pem");
        }
        let password = password.map(str::to_owned);
        let mut server = RedisServer { child: None, port, dir, tls, password };
        server.restart();
        Some(server)
    }

    /// `redis://127.0.0.1:PORT/0` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        format!("redis{}://127.0.0.1:{}/0", if self.tls { "s" } else { "" }, self.port)
    }

    /// The certificate a client must trust (with TLS).
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Kills it (SIGKILL: nothing said to its clients) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on its port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning", "--dir"]);
        command.arg(self.dir.path());
        if self.tls {
            let (cert, key) = (self.ca_file(), self.dir.path().join("key.pem"));
            command.args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no"]);
            command
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(&cert);
        } else {
            command.args(["--port", &port]);
        }
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command.stdout(Stdio::null()).spawn().expect("start redis-server");
        self.child = Some(child);
        wait_until("redis-server answers", || self.try_cmd(&["PING"]).is_ok());
    }

    /// Runs one command; its reply.
    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        self.try_cmd(args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    fn try_cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let password = self.password.as_ref().map(|p| format!(":{p}@")).unwrap_or_default();
        let client = match self.tls {
            true => {
                let url = format!("rediss://{password}127.0.0.1:{}/0", self.port);
                let root_cert = std::fs::read(self.ca_file()).ok();
                redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls: None, root_cert })?
            }
            false => redis::Client::open(format!("redis://{password}127.0.0.1:{}/0", self.port))?,
        };
        let mut con = client.get_connection_with_timeout(std::time::Duration::from_secs(2))?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut con)
    }

    /// A key's value as text, if it is set.
    pub fn get(&self, key: &str) -> Option<String> {
        match self.cmd(&["GET", key]) {
            redis::Value::BulkString(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
            _ => None,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
