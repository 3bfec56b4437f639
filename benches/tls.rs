//! The TLS handshake alone, in memory: the server's side of a STARTTLS handshake with
//! mxgate's own server configuration (`tls::TlsSettings`: its suites' order, one ticket,
//! ECDSA P-256) against a rustls client like the load harness's (TLS 1.3): full, and
//! resumed with a ticket. Only the server's calls are timed: the yardstick for what
//! mxgate spends per handshake under load (`mxgate-loadtest tls`), the crypto and rustls
//! without sockets.
//!
//! `cargo bench --bench tls`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mxgate::config::{Tls, TlsVersion};
use mxgate::tls::TlsSettings;
use rustls::pki_types::{CertificateDer, ServerName};

/// mxgate's server configuration for a new self-signed ECDSA P-256 certificate, and that
/// certificate.
fn server() -> (Arc<rustls::ServerConfig>, CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a key");
    let cert = rcgen::CertificateParams::new(vec!["mx.test".to_owned()])
        .expect("parameters")
        .self_signed(&key)
        .expect("a certificate");
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).expect("write");
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).expect("write");
    let tls = Tls {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
        min_version: TlsVersion::V1_2,
        sni: Vec::new(),
    };
    let mut problems = Vec::new();
    let now = mxgate::datetime::UnixTime::now().0;
    let settings = TlsSettings::load(&tls, now, &mut problems).expect("loads");
    (settings.server, cert.der().clone())
}

fn client(root: CertificateDer<'static>, resume: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).expect("the root");
    let mut config = rustls::ClientConfig::builder_with_provider(mxgate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

/// One handshake; returns the time spent in the server's calls.
fn handshake(server: &Arc<rustls::ServerConfig>, client: &Arc<rustls::ClientConfig>) -> Duration {
    let name = ServerName::try_from("mx.test").expect("name");
    let mut c = rustls::ClientConnection::new(Arc::clone(client), name).expect("client");
    let mut s = rustls::ServerConnection::new(Arc::clone(server)).expect("server");
    let mut in_server = Duration::ZERO;
    let mut wire = Vec::new();
    // until both are done and the server's ticket has reached the client
    while c.is_handshaking() || s.is_handshaking() || s.wants_write() {
        wire.clear();
        c.write_tls(&mut wire).expect("client writes");
        let t = Instant::now();
        s.read_tls(&mut &wire[..]).expect("server reads");
        s.process_new_packets().expect("server processes");
        wire.clear();
        s.write_tls(&mut wire).expect("server writes");
        in_server += t.elapsed();
        c.read_tls(&mut &wire[..]).expect("client reads");
        c.process_new_packets().expect("client processes");
    }
    in_server
}

fn bench(c: &mut Criterion) {
    let (server, root) = server();
    let mut group = c.benchmark_group("tls_server_handshake");
    for (name, resume) in [("full", false), ("resumed", true)] {
        let client = client(root.clone(), resume);
        handshake(&server, &client); // a first ticket for the resumed ones
        group.bench_function(name, |b| b.iter_custom(|n| (0..n).map(|_| handshake(&server, &client)).sum()));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
