//! A real Prometheus (Debian's `prometheus` package) on a free loopback port, scraping
//! one target every 200 ms into a temporary data folder; killed when dropped. Without
//! the package a test skips with a line, and fails in CI (`CI` set), where `.ci/run`
//! installs it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{unused_port, wait_until};

pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scraping `target` (`host:port`, path `/metrics`) as job `mxgate`; `None` (with a
    /// skip line) where Prometheus is not installed.
    pub fn scraping(target: &str) -> Option<Self> {
        if !super::installed("prometheus", "prometheus") {
            return None;
        }
        let dir = tempfile::tempdir().expect("a folder");
        let config = dir.path().join("prometheus.yml");
        let yml = format!(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\n\
             scrape_configs:\n  - job_name: mxgate\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(&config, yml).expect("prometheus.yml");
        let addr = unused_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, addr, _dir: dir };
        wait_until("Prometheus answers", || p.get("/-/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
        Some(p)
    }

    /// One GET to its HTTP API; the whole response, or `None` when it cannot be reached.
    pub fn get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.addr);
        s.write_all(request.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// The API's answer to an instant query (`query` URL-encoded by the caller).
    pub fn query(&self, query: &str) -> String {
        self.get(&format!("/api/v1/query?query={query}")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
