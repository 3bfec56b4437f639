//! STARTTLS end to end: the real binary, both drivers, a rustls client (and Python's
//! smtplib where it is installed), a recording next hop.

#[macro_use]
mod common;

use common::config::Config;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use common::nexthop::{AtDot, NextHop};
use common::{Mxgate, connect_from, read_replies, read_to_end, run_cli, send, wait_until};
use rustls::pki_types::{CertificateDer, ServerName};

/// A self-signed ECDSA P-256 certificate for `names`, PEM: (certificate, key, DER).
fn certificate(names: &[&str]) -> (String, String, CertificateDer<'static>) {
    certificate_ending(names, time::OffsetDateTime::now_utc() + time::Duration::days(365))
}

fn certificate_ending(names: &[&str], not_after: time::OffsetDateTime) -> (String, String, CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a key");
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("certificate parameters");
    params.not_before = not_after - time::Duration::days(400);
    params.not_after = not_after;
    let cert = params.self_signed(&key).expect("a certificate");
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

fn config(next_hop: SocketAddr, extra: &str) -> String {
    Config::new()
        .relay_to(&[next_hop])
        .set("tls", "cert", "\"cert.pem\"")
        .set("tls", "key", "\"key.pem\"")
        .extra(extra)
        .to_string()
}

struct Server {
    m: Mxgate,
    hop: NextHop,
    root: CertificateDer<'static>,
}

fn start(io: &str, extra: &str) -> Server {
    let hop = NextHop::start(AtDot::Accept);
    let (cert, key, root) = certificate(&["mx.test"]);
    let m = Mxgate::start(&config(hop.addr, extra), &[("cert.pem", &cert), ("key.pem", &key)], io);
    Server { m, hop, root }
}

fn client_config(
    root: &CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("the test root");
    let config = rustls::ClientConfig::builder_with_provider(mxgate::tls::provider())
        .with_protocol_versions(&[version])
        .expect("the version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Banner, EHLO (STARTTLS offered), STARTTLS, 220: the plain stream, ready for the handshake.
fn plain_until_starttls(s: &Server, source: &str) -> TcpStream {
    let mut plain = connect_from(source, s.m.addr());
    assert!(read_replies(&mut plain, 1).starts_with("220 mx.test"));
    send(&mut plain, b"EHLO client.test\r\n");
    assert!(read_replies(&mut plain, 1).contains("250-STARTTLS\r\n"), "offered before TLS");
    send(&mut plain, b"STARTTLS\r\n");
    assert_eq!(read_replies(&mut plain, 1), "220 2.0.0 ready to start TLS\r\n");
    plain
}

fn handshake(plain: TcpStream, config: Arc<rustls::ClientConfig>) -> Tls {
    let conn = rustls::ClientConnection::new(config, ServerName::try_from("mx.test").expect("name")).expect("client");
    let mut tls = rustls::StreamOwned::new(conn, plain);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("the handshake");
    }
    tls
}

/// `cipher`: the server's choice (suites hashing with SHA-256 first, whatever the client
/// prefers: rustls's clients put AES-256 first).
fn relay_over_tls(io: &str, version: &'static rustls::SupportedProtocolVersion, name: &str, cipher: &str) {
    let s = start(io, "");
    let plain = plain_until_starttls(&s, "127.0.9.1");
    let mut tls = handshake(plain, client_config(&s.root, version));
    send(&mut tls, b"EHLO client.test\r\n");
    let ehlo = read_replies(&mut tls, 1);
    assert!(ehlo.starts_with("250-mx.test") && !ehlo.contains("STARTTLS"), "not offered under TLS: {ehlo}");
    send(&mut tls, b"MAIL FROM:<a@client.test>\r\n");
    assert_eq!(read_replies(&mut tls, 1), "250 2.1.0 sender OK\r\n");
    send(&mut tls, b"RCPT TO:<user@example.com>\r\nDATA\r\n");
    let replies = read_replies(&mut tls, 2);
    assert!(replies.starts_with("250 2.1.5") && replies.contains("354 "), "{replies}");
    let body = b"Subject: over TLS\r\n\r\nhello\r\n..dot\r\n".repeat(200);
    send(&mut tls, &body);
    send(&mut tls, b".\r\nQUIT\r\n");
    let end = read_replies(&mut tls, 2);
    assert!(end.starts_with("250 2.0.0 OK: queued as ") && end.contains("221 "), "{end}");
    let got = s.hop.wait_messages(1);
    assert_eq!(got.len(), 1);
    let wire = &got[0].wire_body;
    let text = String::from_utf8_lossy(wire);
    assert!(text.contains(&format!("(using {name} with cipher {cipher})")), "{text}");
    assert!(text.contains(" with ESMTPS id "), "{text}");
    assert!(wire.ends_with(&body), "byte-exact after the Received header");
}

/// A body far larger than rustls's buffers and the relay's high-water mark, pipelined
/// with the commands in big writes: every byte arrives, in order.
fn big_bodies_under_tls_arrive_whole(io: &str) {
    let s = start(io, "[smtp]\nmax_message_size = \"8MiB\"\n");
    let plain = plain_until_starttls(&s, "127.0.9.11");
    let mut tls = handshake(plain, client_config(&s.root, &rustls::version::TLS13));
    send(&mut tls, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n");
    let replies = read_replies(&mut tls, 4);
    assert!(replies.ends_with("354 end data with <CR><LF>.<CR><LF>\r\n"), "{replies}");
    let line: Vec<u8> = (0..998).map(|i| b'a' + (i % 26) as u8).chain(*b"\r\n").collect();
    let body: Vec<u8> = line.repeat(3000); // 3 MB
    send(&mut tls, &body);
    send(&mut tls, b".\r\nQUIT\r\n");
    let end = read_replies(&mut tls, 2);
    assert!(end.starts_with("250 2.0.0 OK: queued as "), "{end}");
    let got = s.hop.wait_messages(1);
    assert!(got[0].wire_body.ends_with(&body), "3 MB byte-exact");
}

fn relays_over_tls_1_3(io: &str) {
    relay_over_tls(io, &rustls::version::TLS13, "TLSv1.3", "TLS_AES_128_GCM_SHA256");
}

fn relays_over_tls_1_2(io: &str) {
    relay_over_tls(io, &rustls::version::TLS12, "TLSv1.2", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256");
}

/// CVE-2011-0411: commands pipelined in clear behind STARTTLS are never answered.
fn nothing_pipelined_behind_starttls_runs(io: &str) {
    let s = start(io, "");
    let mut plain = connect_from("127.0.9.2", s.m.addr());
    read_replies(&mut plain, 1);
    send(&mut plain, b"EHLO client.test\r\n");
    read_replies(&mut plain, 1);
    send(&mut plain, b"STARTTLS\r\nNOOP\r\nMAIL FROM:<x@client.test>\r\n");
    assert_eq!(read_replies(&mut plain, 1), "220 2.0.0 ready to start TLS\r\n", "nothing after it in clear");
    // a reply in clear would break the handshake; after it, the first reply is EHLO's
    let mut tls = handshake(plain, client_config(&s.root, &rustls::version::TLS13));
    send(&mut tls, b"EHLO client.test\r\n");
    assert!(read_replies(&mut tls, 1).starts_with("250-mx.test\r\n"));
    send(&mut tls, b"STARTTLS\r\n");
    assert_eq!(read_replies(&mut tls, 1), "503 5.5.1 STARTTLS not allowed now\r\n");
    send(&mut tls, b"MAIL FROM:<a@client.test>\r\n");
    assert_eq!(read_replies(&mut tls, 1), "250 2.1.0 sender OK\r\n", "no transaction was opened in clear");
}

/// Garbage instead of a ClientHello: closed, counted as a failure of the address (enough
/// of them ban it), and the server goes on serving.
fn failed_handshakes_close_count_and_ban(io: &str) {
    let s = start(io, "[abuse]\nfailure_threshold = 3\n[control]\nsocket = \"control.sock\"\n");
    for _ in 0..3 {
        let mut plain = plain_until_starttls(&s, "127.0.9.3");
        send(&mut plain, b"this is no ClientHello\r\n\r\n\r\n\r\n\r\n\r\n");
        let (got, _) = read_to_end(&mut plain);
        assert!(!got.contains("250") && !got.contains("500"), "nothing in clear: {got:?}");
    }
    wait_until("the address banned", || {
        let mut again = connect_from("127.0.9.3", s.m.addr());
        let mut line = [0u8; 3];
        again.read_exact(&mut line).is_ok() && &line == b"530"
    });
    // another peer is served, over TLS
    let plain = plain_until_starttls(&s, "127.0.9.4");
    let mut tls = handshake(plain, client_config(&s.root, &rustls::version::TLS13));
    send(&mut tls, b"NOOP\r\n");
    assert_eq!(read_replies(&mut tls, 1), "250 2.0.0 OK\r\n");
    let stats = || run_cli(&["stats"], &s.m.files.config()).1;
    wait_until("the handshakes counted", || {
        let out = stats();
        out.contains("\ntls_handshakes 1\n") && out.contains("\ntls_handshakes_failed 3\n")
    });
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    let _ = tls.sock.flush();
}

/// A peer that says STARTTLS and never starts the handshake is cut off at the command
/// timeout (nothing is said: neither in clear nor under TLS).
fn a_stalled_handshake_is_cut_off(io: &str) {
    let s = start(io, "[smtp]\ncommand_timeout = \"1s\"\n");
    let mut plain = plain_until_starttls(&s, "127.0.9.10");
    // (a read past the test's bound would end in an error, not EOF)
    let (got, end) = read_to_end(&mut plain);
    assert_eq!((got.as_str(), end), ("", common::End::Eof), "closed, nothing sent");
}

/// `require_tls`: MAIL in clear is refused, after STARTTLS it goes through.
fn require_tls_refuses_mail_in_clear(io: &str) {
    let s = start(io, "[smtp]\nrequire_tls = true\n");
    let mut plain = connect_from("127.0.9.5", s.m.addr());
    read_replies(&mut plain, 1);
    send(&mut plain, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n");
    let got = read_replies(&mut plain, 2);
    assert!(got.ends_with("530 5.7.0 must issue a STARTTLS command first\r\n"), "{got}");
    send(&mut plain, b"STARTTLS\r\n");
    assert_eq!(read_replies(&mut plain, 1), "220 2.0.0 ready to start TLS\r\n");
    let mut tls = handshake(plain, client_config(&s.root, &rustls::version::TLS13));
    send(&mut tls, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n");
    assert!(read_replies(&mut tls, 2).ends_with("250 2.1.0 sender OK\r\n"));
}

/// A handshake trusting only `root` succeeds.
fn trusted(s: &Server, source: &str, root: &CertificateDer<'static>) -> bool {
    let plain = plain_until_starttls(s, source);
    let conn = rustls::ClientConnection::new(
        client_config(root, &rustls::version::TLS13),
        ServerName::try_from("mx.test").expect("name"),
    )
    .expect("client");
    let mut tls = rustls::StreamOwned::new(conn, plain);
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            return false;
        }
    }
    true
}

/// A broken certificate file refuses the reload, naming it, and the old certificate is
/// still served; a good new one is served to new sessions.
fn reloads_certificates_or_keeps_the_old_one(io: &str) {
    let mut s = start(io, "");
    let old_root = s.root.clone();
    assert!(trusted(&s, "127.0.9.6", &old_root));
    std::fs::write(s.m.files.path("cert.pem"), "-----BEGIN CERTIFICATE-----\nbroken\n").expect("write");
    s.m.signal(libc::SIGHUP);
    let refused = s.m.wait_for_log("reload refused");
    assert!(s.m.seen.iter().any(|l| l.contains("cert.pem")), "the file is named: {refused}");
    assert!(trusted(&s, "127.0.9.6", &old_root), "the old certificate is still served");
    let (cert, key, new_root) = certificate(&["mx.test"]);
    std::fs::write(s.m.files.path("cert.pem"), cert).expect("write");
    std::fs::write(s.m.files.path("key.pem"), key).expect("write");
    s.m.signal(libc::SIGHUP);
    s.m.wait_for_log("SIGHUP: reloaded");
    assert!(trusted(&s, "127.0.9.6", &new_root), "new sessions get the new certificate");
    assert!(!trusted(&s, "127.0.9.6", &old_root));
    s.root = new_root;
}

/// The certificate the server presents to a client asking for `name`.
fn presented(s: &Server, roots: &[&CertificateDer<'static>], name: &str) -> CertificateDer<'static> {
    let plain = plain_until_starttls(s, "127.0.9.7");
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).expect("a root");
    }
    let config = rustls::ClientConfig::builder_with_provider(mxgate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(config), ServerName::try_from(name.to_owned()).expect("name"))
        .expect("client");
    let mut tls = rustls::StreamOwned::new(conn, plain);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("the handshake");
    }
    tls.conn.peer_certificates().expect("a certificate")[0].clone()
}

/// SNI picks the entry of the name asked for; another name gets the default pair.
fn sni_picks_the_certificate(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let (cert, key, default) = certificate(&["mx.test", "unknown.test"]);
    let (other_cert, other_key, other) = certificate(&["other.test"]);
    let (wild_cert, wild_key, wild) = certificate(&["a.wild.test"]);
    let extra = "[[tls.sni]]\nname = \"other.test\"\ncert = \"other.pem\"\nkey = \"other.key\"\n\
                 [[tls.sni]]\nname = \"*.wild.test\"\ncert = \"wild.pem\"\nkey = \"wild.key\"\n";
    let files = [
        ("cert.pem", cert.as_str()),
        ("key.pem", key.as_str()),
        ("other.pem", other_cert.as_str()),
        ("other.key", other_key.as_str()),
        ("wild.pem", wild_cert.as_str()),
        ("wild.key", wild_key.as_str()),
    ];
    let m = Mxgate::start(&config(hop.addr, extra), &files, io);
    let s = Server { m, hop, root: default.clone() };
    let roots = [&default, &other, &wild];
    assert_eq!(presented(&s, &roots, "other.test"), other);
    assert_eq!(presented(&s, &roots, "a.wild.test"), wild);
    assert_eq!(presented(&s, &roots, "unknown.test"), default);
    assert_eq!(presented(&s, &roots, "mx.test"), default);
}

/// Each certificate's end is a gauge (`mxgate_tls_certificate_expiry_seconds`), for the
/// alert that fires 14 days ahead: the default pair's and each SNI entry's, by name.
fn certificate_ends_are_exported(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).expect("whole seconds");
    let (soon, later) = (now + time::Duration::days(10), now + time::Duration::days(90));
    let (cert, key, _) = certificate_ending(&["mx.test"], soon);
    let (other_cert, other_key, _) = certificate_ending(&["other.test"], later);
    let extra = "[[tls.sni]]\nname = \"other.test\"\ncert = \"other.pem\"\nkey = \"other.key\"\n\
                 [metrics]\nlisten = \"127.0.0.1:0\"\n";
    let files =
        [("cert.pem", cert.as_str()), ("key.pem", key.as_str()), ("other.pem", &other_cert), ("other.key", &other_key)];
    let m = Mxgate::start(&config(hop.addr, extra), &files, io);
    let line = m.saw("metrics at http://").expect("the metrics address is logged");
    let addr = line.split("http://").nth(1).and_then(|a| a.strip_suffix("/metrics")).expect("an address");
    let mut c = connect_from("127.0.0.1", addr.parse().expect("an address"));
    send(&mut c, b"GET /metrics HTTP/1.1\r\n\r\n");
    let body = common::read_to_end(&mut c).0;
    let gauge = |name: &str, at: time::OffsetDateTime| {
        format!("mxgate_tls_certificate_expiry_seconds{{name=\"{name}\"}} {}\n", at.unix_timestamp())
    };
    assert!(body.contains(&gauge("default", soon)), "{body}");
    assert!(body.contains(&gauge("other.test", later)), "{body}");
}

/// `min_version = "1.3"`: a TLS 1.2 client cannot finish the handshake.
fn min_version_refuses_older_clients(io: &str) {
    let s = start(io, "min_version = \"1.3\"\n");
    let plain = plain_until_starttls(&s, "127.0.9.8");
    let conn = rustls::ClientConnection::new(
        client_config(&s.root, &rustls::version::TLS12),
        ServerName::try_from("mx.test").expect("name"),
    )
    .expect("client");
    let mut tls = rustls::StreamOwned::new(conn, plain);
    let mut failed = false;
    while tls.conn.is_handshaking() && !failed {
        failed = tls.conn.complete_io(&mut tls.sock).is_err();
    }
    assert!(failed, "TLS 1.2 refused");
    let plain = plain_until_starttls(&s, "127.0.9.8");
    let mut tls = handshake(plain, client_config(&s.root, &rustls::version::TLS13));
    send(&mut tls, b"NOOP\r\n");
    assert_eq!(read_replies(&mut tls, 1), "250 2.0.0 OK\r\n");
}

/// Python's smtplib (what many scripts and MTAs' test suites use): STARTTLS, EHLO again,
/// one message, relayed byte-exact.
fn python_smtplib_sends_over_starttls(io: &str) {
    let s = start(io, "");
    let script = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3])
ctx.check_hostname = False  # the certificate names mx.test; we connect to an address
with smtplib.SMTP(sys.argv[1], int(sys.argv[2]), local_hostname="client.test", source_address=("127.0.9.9", 0), timeout=10) as c:
    c.starttls(context=ctx)
    assert "starttls" not in c.esmtp_features, "not offered after TLS"
    c.sendmail("a@client.test", ["user@example.com"], b"Subject: smtplib\r\n\r\nsent by Python\r\n")
    print(c.sock.version())
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(s.m.addr().ip().to_string())
        .arg(s.m.addr().port().to_string())
        .arg(s.m.files.path("cert.pem"))
        .output()
        .expect("python3 (.ci/run installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "TLSv1.3");
    let got = s.hop.wait_messages(1);
    assert_eq!(got.len(), 1);
    let text = String::from_utf8_lossy(&got[0].wire_body);
    assert!(
        text.contains(" with ESMTPS id ") && text.ends_with("Subject: smtplib\r\n\r\nsent by Python\r\n"),
        "{text}"
    );
}

// ---- STARTTLS to the next hop ([relay] tls) ---------------------------------------------

/// mxgate (one worker, so that sessions share its pool) relaying to `hops` in order,
/// `relay` added to `[relay]`.
fn relaying(io: &str, hops: &[SocketAddr], relay: &str, files: &[(&str, &str)]) -> Mxgate {
    let config = Config::new().set("listen", "threads", 1).relay_to(hops).extra(relay);
    Mxgate::start(&config.to_string(), files, io)
}

/// One message in clear from `source`: the reply to its final dot, or the refusal of MAIL.
fn one_message(m: &Mxgate, source: &str) -> String {
    let mut c = connect_from(source, m.addr());
    assert!(read_replies(&mut c, 1).starts_with("220 "));
    send(&mut c, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n");
    let mail = read_replies(&mut c, 2);
    if !mail.ends_with("250 2.1.0 sender OK\r\n") {
        return mail.lines().last().unwrap_or_default().to_owned();
    }
    send(&mut c, b"RCPT TO:<user@example.com>\r\nDATA\r\n");
    assert!(read_replies(&mut c, 2).contains("354 "));
    send(&mut c, b"Subject: to the next hop\r\n\r\nhello\r\n.\r\nQUIT\r\n");
    let end = read_replies(&mut c, 2);
    assert!(end.ends_with("221 2.0.0 mx.test closing connection\r\n"), "{end}");
    end.lines().next().unwrap_or_default().to_owned()
}

const QUEUED: &str = "250 2.0.0 OK: queued as ";
const HOP_FAILED: &str = "451 4.4.1 next hop unavailable, try again later";

/// Opportunistic against a next hop offering STARTTLS: the handshake (its certificate
/// checked against `tls_ca`, for its IP address), EHLO again, the message under TLS; the
/// next session reuses the pooled connection, still under TLS.
fn relays_to_the_next_hop_under_starttls(io: &str) {
    let (cert, key, _) = certificate(&["127.0.0.1"]);
    let hop = NextHop::start_tls(AtDot::Accept, &cert, &key);
    let relay = "tls = \"opportunistic\"\ntls_ca = \"hop-ca.pem\"\n";
    let m = relaying(io, &[hop.addr], relay, &[("hop-ca.pem", &cert)]);
    for (i, source) in ["127.0.9.31", "127.0.9.32"].into_iter().enumerate() {
        let end = one_message(&m, source);
        assert!(end.starts_with(QUEUED), "{end}");
        let got = hop.wait_messages(i + 1);
        assert!(got.len() == i + 1 && got[i].tls, "message {i} under TLS");
    }
    assert_eq!(hop.connections(), 1, "the pooled connection kept its TLS");
    let commands = hop.commands();
    assert_eq!(commands[..3], ["EHLO mx.test", "STARTTLS", "EHLO mx.test"], "{commands:?}");
    assert_eq!(commands.iter().filter(|c| *c == "STARTTLS").count(), 1, "{commands:?}");
}

/// Opportunistic against a next hop without STARTTLS: in clear.
fn opportunistic_goes_on_in_clear(io: &str) {
    let hop = NextHop::start(AtDot::Accept);
    let m = relaying(io, &[hop.addr], "tls = \"opportunistic\"\ntls_verify = false\n", &[]);
    assert!(one_message(&m, "127.0.9.33").starts_with(QUEUED));
    let got = hop.wait_messages(1);
    assert!(got.len() == 1 && !got[0].tls);
}

/// Required: a next hop without STARTTLS, or whose certificate is not trusted, is a failed
/// next hop: the next one in order gets the message; none left: 451.
fn required_skips_next_hops_without_trusted_tls(io: &str) {
    let (cert, key, _) = certificate(&["127.0.0.1"]);
    let (stranger_cert, stranger_key, _) = certificate(&["127.0.0.1"]);
    let clear = NextHop::start(AtDot::Accept);
    let untrusted = NextHop::start_tls(AtDot::Accept, &stranger_cert, &stranger_key);
    let good = NextHop::start_tls(AtDot::Accept, &cert, &key);
    let relay = "tls = \"required\"\ntls_ca = \"hop-ca.pem\"\n";
    let mut m = relaying(io, &[clear.addr, untrusted.addr, good.addr], relay, &[("hop-ca.pem", &cert)]);
    assert!(one_message(&m, "127.0.9.34").starts_with(QUEUED));
    // the operator is told why, at warn
    m.wait_for_log(&format!("next hop {} does not offer STARTTLS", clear.addr));
    m.wait_for_log(&format!("next hop {}: TLS: invalid peer certificate", untrusted.addr));
    let got = good.wait_messages(1);
    assert!(got.len() == 1 && got[0].tls);
    for (name, hop) in [("clear", &clear), ("untrusted", &untrusted)] {
        let commands = hop.commands();
        assert!(hop.connections() >= 1 && !commands.iter().any(|c| c.starts_with("MAIL")), "{name}: {commands:?}");
    }
    assert_eq!(clear.commands(), ["EHLO mx.test"], "never asked in clear");
    let m = relaying(io, &[clear.addr, untrusted.addr], relay, &[("hop-ca.pem", &cert)]);
    assert_eq!(one_message(&m, "127.0.9.35"), HOP_FAILED);
    assert!(clear.messages().is_empty() && untrusted.messages().is_empty());
}

/// `tls_verify = false` takes any certificate; `tls_name` is the name checked instead of
/// the address.
fn tls_verify_and_tls_name(io: &str) {
    let (stranger_cert, stranger_key, _) = certificate(&["127.0.0.1"]);
    let hop = NextHop::start_tls(AtDot::Accept, &stranger_cert, &stranger_key);
    let m = relaying(io, &[hop.addr], "tls = \"required\"\ntls_verify = false\n", &[]);
    assert!(one_message(&m, "127.0.9.36").starts_with(QUEUED));
    assert!(hop.wait_messages(1)[0].tls);

    let (cert, key, _) = certificate(&["hop.internal"]);
    let named = NextHop::start_tls(AtDot::Accept, &cert, &key);
    let files = [("hop-ca.pem", cert.as_str())];
    let m = relaying(io, &[named.addr], "tls = \"required\"\ntls_ca = \"hop-ca.pem\"\n", &files);
    assert_eq!(one_message(&m, "127.0.9.37"), HOP_FAILED, "its certificate does not name 127.0.0.1");
    let relay = "tls = \"required\"\ntls_ca = \"hop-ca.pem\"\ntls_name = \"hop.internal\"\n";
    let m = relaying(io, &[named.addr], relay, &files);
    assert!(one_message(&m, "127.0.9.38").starts_with(QUEUED));
    assert!(named.wait_messages(1)[0].tls);
}

/// A body far larger than rustls's buffers and the records held for the next hop, sent
/// in big writes: every byte arrives, in order, under TLS.
fn big_bodies_to_a_tls_next_hop_arrive_whole(io: &str) {
    let (cert, key, _) = certificate(&["127.0.0.1"]);
    let hop = NextHop::start_tls(AtDot::Accept, &cert, &key);
    let relay = "tls = \"required\"\ntls_ca = \"hop-ca.pem\"\n[smtp]\nmax_message_size = \"8MiB\"\n";
    let m = relaying(io, &[hop.addr], relay, &[("hop-ca.pem", &cert)]);
    let mut c = connect_from("127.0.9.39", m.addr());
    send(&mut c, b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n");
    let replies = read_replies(&mut c, 5);
    assert!(replies.ends_with("354 end data with <CR><LF>.<CR><LF>\r\n"), "{replies}");
    let line: Vec<u8> = (0..998).map(|i| b'A' + (i % 26) as u8).chain(*b"\r\n").collect();
    let body: Vec<u8> = line.repeat(3000); // 3 MB
    send(&mut c, &body);
    send(&mut c, b".\r\n");
    assert!(read_replies(&mut c, 1).starts_with(QUEUED));
    let got = hop.wait_messages(1);
    assert!(got[0].tls && got[0].wire_body.ends_with(&body), "3 MB byte-exact under TLS");
}

for_both_drivers!(
    relays_to_the_next_hop_under_starttls,
    big_bodies_to_a_tls_next_hop_arrive_whole,
    big_bodies_under_tls_arrive_whole,
    a_stalled_handshake_is_cut_off,
);

on_one_driver!(
    opportunistic_goes_on_in_clear,
    required_skips_next_hops_without_trusted_tls,
    python_smtplib_sends_over_starttls,
    relays_over_tls_1_3,
    relays_over_tls_1_2,
    nothing_pipelined_behind_starttls_runs,
    failed_handshakes_close_count_and_ban,
    sni_picks_the_certificate,
    certificate_ends_are_exported,
    min_version_refuses_older_clients,
    reloads_certificates_or_keeps_the_old_one,
    tls_verify_and_tls_name,
    require_tls_refuses_mail_in_clear,
);

/// `mxgate check` loads the certificate and key, names the file of any problem, and
/// warns of a certificate ending within 14 days.
#[test]
fn check_validates_certificates() {
    let hop: SocketAddr = "127.0.0.1:9".parse().expect("address");
    let check = |cert: &str, key: &str| {
        let files = common::Files::new(&config(hop, ""), &[("cert.pem", cert), ("key.pem", key)]);
        run_cli(&["check"], &files.config())
    };
    let now = time::OffsetDateTime::now_utc();
    let (cert, key, _) = certificate(&["mx.test"]);
    let (code, out) = check(&cert, &key);
    assert!(code == 0 && out.contains("STARTTLS") && !out.contains("warning"), "{out}");
    let (other_cert, _, _) = certificate(&["mx.test"]);
    let (code, out) = check(&other_cert, &key);
    assert!(code != 0 && out.contains("key.pem: does not match the certificate"), "{out}");
    let (code, out) = check("not a certificate\n", &key);
    assert!(code != 0 && out.contains("cert.pem: no certificate in it"), "{out}");
    let (code, out) = check(&cert, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
    assert!(code != 0 && out.contains("key.pem: "), "{out}");
    let (old, old_key, _) = certificate_ending(&["mx.test"], now - time::Duration::days(1));
    let (code, out) = check(&old, &old_key);
    assert!(code != 0 && out.contains("cert.pem: the certificate expired on "), "{out}");
    let (soon, soon_key, _) = certificate_ending(&["mx.test"], now + time::Duration::days(7));
    let (code, out) = check(&soon, &soon_key);
    assert!(code == 0 && out.contains("warning: ") && out.contains("cert.pem: the certificate expires on "), "{out}");
}

/// `[relay] tls`: its client configuration is built and checked with the rest; a CA file
/// that is not one is named.
#[test]
fn check_validates_the_next_hops_tls_settings() {
    let check = |relay: &str, files: &[(&str, &str)]| {
        let config = format!("[relay]\ndomains = [\"example.com\"]\n{relay}");
        let files = common::Files::new(&config, files);
        run_cli(&["check"], &files.config())
    };
    let (ca, _, _) = certificate(&["hop.test"]);
    let (code, out) = check("tls = \"required\"\ntls_ca = \"ca.pem\"\n", &[("ca.pem", &ca)]);
    assert!(code == 0 && out.contains("valid"), "{out}");
    let (code, out) = check("tls = \"required\"\ntls_ca = \"ca.pem\"\n", &[("ca.pem", "no certificates\n")]);
    assert!(code != 0 && out.contains("ca.pem: 0 usable root certificates"), "{out}");
    let (code, out) = check("tls = \"opportunistic\"\ntls_verify = false\n", &[]);
    assert!(code == 0, "no roots needed without verification: {out}");
    let (code, out) = check("tls = \"sometimes\"\n", &[]);
    assert!(code != 0 && out.contains("relay.tls: `sometimes`"), "{out}");
}
