//! The control socket: a Unix socket (mode 0600) on which the running instance answers
//! one request a connection, a line of text in, lines of text out.
//!
//! Requests: `explain IP` — the address's live state: failures counted within the
//! window, open connections, and the ban in force; `reload` — load the configuration and
//! lists again, as SIGHUP does, and say what came of it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::abuse::AbuseKey;
use crate::datetime::UnixTime;
use crate::gate::PeerIp;
use crate::net::Shared;

/// Longest request line; a client gets this long to send it and to read the answer.
const MAX_REQUEST: u64 = 512;
const TIMEOUT: Duration = Duration::from_secs(2);

/// Listens on `path` (replacing a stale socket file) and answers requests on a thread
/// of its own for the life of the process.
pub fn serve(path: &Path, shared: Arc<Shared>) -> io::Result<()> {
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, "another mxgate answers on it"));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // created 0600 (not made so afterwards): no moment when others may connect
    // SAFETY: umask(2) only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new().name("mxgate-control".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Err(e) = answer(stream, &shared) {
                tracing::debug!("control request: {e}");
            }
        }
    })?;
    Ok(())
}

fn answer(stream: UnixStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let request = line.trim();
    let reply = match request.split_once(' ').unwrap_or((request, "")) {
        ("explain", ip) => match ip.trim().parse::<IpAddr>() {
            Ok(ip) => explain(shared, PeerIp::new(ip)),
            Err(_) => format!("error: `{}` is not an IP address\n", ip.trim()),
        },
        ("reload", "") => reload(shared),
        _ => "error: unknown request (known: explain IP, reload)\n".to_owned(),
    };
    (&stream).write_all(reply.as_bytes())
}

fn explain(shared: &Shared, peer: PeerIp) -> String {
    let snapshot = shared.snapshot();
    let config = &snapshot.config.abuse;
    let abuse = shared.abuse();
    let key = AbuseKey::new(peer, config.ipv6_prefix);
    let now = UnixTime::now();
    let mut out = format!(
        "counted as {key}: {} failures in the last {:?} (ban at {}), {} connections open\n",
        abuse.counters.count(key, now.0),
        config.failure_window,
        config.failure_threshold,
        abuse.connections.of(key),
    );
    match abuse.banned(key, now) {
        Some(until) => out.push_str(&format!("banned until {}\n", UnixTime(until).rfc3339())),
        None => out.push_str("not banned\n"),
    }
    out
}

fn reload(shared: &Shared) -> String {
    match shared.reload("control socket") {
        Ok(r) => {
            let mut out = format!(
                "reloaded {} ({} access entries, {} whitelist entries)\n",
                r.from, r.access_entries, r.whitelist_entries
            );
            for name in r.at_restart {
                out.push_str(&format!("{name} changed: read at start only, it takes effect at the next start\n"));
            }
            out
        }
        Err(problems) => format!("{problems}\nreload refused: {} problem(s); nothing changed\n", problems.0.len()),
    }
}

/// Sends `request` to the instance listening on `path`; its answer.
pub fn ask(path: &Path, request: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    stream.take(64 * 1024).read_to_string(&mut answer)?;
    Ok(answer)
}
