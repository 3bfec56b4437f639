//! TLS for peers (STARTTLS): the rustls server configuration a snapshot carries, built
//! from `[tls]` and checked with the rest of the snapshot (a bad file refuses the whole
//! load or reload, naming the file), and what a finished handshake tells the session.
//! The per-connection layer is `conn::tls`.
//!
//! Crypto: aws-lc-rs. Measured against ring on this project's machine (TLS 1.3, X25519,
//! ECDSA P-256, 2,000 in-memory handshakes): the server's side of a full handshake
//! 102-107 µs against 123-131 µs with ring; aws-lc-sys builds in 39 s on 2 cores, ring in
//! 13 s. The handshake is paid on every connection that uses TLS, the build once.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, ServerConfig};
use rustls::sign::CertifiedKey;

use crate::config::{Relay, RelayTls, Tls, TlsVersion};
use crate::problem::{Problem, TlsFault};

/// A certificate this close to its end gets a warning from `mxgate check` and at load.
pub const EXPIRY_WARNING_SECS: i64 = 14 * 24 * 3600;

/// The provider every TLS object of the process uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())))
}

/// The provider the server side uses: the same suites, those hashing with SHA-256 first
/// (TLS_AES_128_GCM_SHA256 for TLS 1.3), chosen by the server's order. Their key schedule
/// runs on the CPU's SHA extensions where SHA-384 has none: a full handshake measured
/// 82-98 µs of the server's CPU in memory against 107-108 with TLS_AES_256_GCM_SHA384,
/// the suite rustls's clients (and most others) put first.
fn server_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        let mut p = (*provider()).clone();
        p.cipher_suites.sort_by_key(|s| !s.suite().as_str().is_some_and(|n| n.ends_with("SHA256")));
        Arc::new(p)
    }))
}

/// The process's session-ticket keys: one ticketer for every snapshot, so that a reload
/// does not invalidate the tickets peers hold. It rotates its keys itself (every 6 hours,
/// the previous key still accepted).
fn ticketer() -> Option<Arc<dyn ProducesTickets>> {
    static TICKETER: OnceLock<Option<Arc<dyn ProducesTickets>>> = OnceLock::new();
    TICKETER
        .get_or_init(|| match rustls::crypto::aws_lc_rs::Ticketer::new() {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("TLS session tickets off: {e}");
                None
            }
        })
        .clone()
}

/// What a snapshot holds for STARTTLS.
#[derive(Debug)]
pub struct TlsSettings {
    pub server: Arc<ServerConfig>,
    /// Certificates near their end (`mxgate check` and the load log them).
    pub warnings: Vec<String>,
    /// When each certificate ends (Unix seconds): `default` (`[tls] cert`), then each
    /// `[[tls.sni]]` by its name (the metrics' expiry gauge).
    pub expiry: Vec<(String, i64)>,
}

impl TlsSettings {
    /// Loads `[tls]`'s files; `now` is the Unix time certificates are checked against.
    pub fn load(tls: &Tls, now: i64, problems: &mut Vec<Problem>) -> Option<Self> {
        let mut warnings = Vec::new();
        let default = certified_key(&tls.cert, &tls.key, now, problems, &mut warnings);
        let by_name: Vec<(String, Arc<CertifiedKey>)> = tls
            .sni
            .iter()
            .filter_map(|e| Some((e.name.clone(), certified_key(&e.cert, &e.key, now, problems, &mut warnings)?)))
            .collect();
        let default = default.filter(|_| by_name.len() == tls.sni.len())?;
        let ends = |k: &CertifiedKey| {
            let der = k.end_entity_cert().ok()?;
            x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| c.validity().not_after.timestamp())
        };
        let expiry = std::iter::once(("default".to_owned(), &default))
            .chain(by_name.iter().map(|(n, k)| (n.clone(), k)))
            .filter_map(|(name, k)| Some((name, ends(k)?)))
            .collect();
        let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let builder = match ServerConfig::builder_with_provider(server_provider()).with_protocol_versions(versions) {
            Ok(b) => b,
            Err(e) => {
                problems.push(Problem::in_file(&tls.cert, TlsFault::Setup { key: "TLS", why: e.to_string() }));
                return None;
            }
        };
        let mut server = builder.with_no_client_auth().with_cert_resolver(Arc::new(Certificates { default, by_name }));
        if let Some(t) = ticketer() {
            server.ticketer = t;
        }
        // a session-ID cache would grow with the peers; tickets keep the state with them
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        // one ticket, not two: an MTA opens one connection at a time to a host, and each
        // ticket costs a key derivation and an encryption (in memory: 118-122 µs a full
        // handshake with two, 113-114 with one)
        server.send_tls13_tickets = 1;
        server.ignore_client_order = true;
        Some(TlsSettings { server: Arc::new(server), warnings, expiry })
    }
}

/// The certificate for the name the peer asks for (SNI): an entry of that name, else one
/// `*.` entry for its parent domain, else the default one.
#[derive(Debug)]
struct Certificates {
    default: Arc<CertifiedKey>,
    by_name: Vec<(String, Arc<CertifiedKey>)>,
}

impl Certificates {
    fn for_name(&self, name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = name.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) else { return &self.default };
        let parent = name.split_once('.').map(|(_, p)| p);
        let exact = self.by_name.iter().find(|(n, _)| *n == name);
        let wildcard = || self.by_name.iter().find(|(n, _)| n.strip_prefix("*.").is_some_and(|p| Some(p) == parent));
        exact.or_else(wildcard).map_or(&self.default, |(_, k)| k)
    }
}

impl rustls::server::ResolvesServerCert for Certificates {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(self.for_name(hello.server_name())))
    }
}

/// A certificate chain and its key, loaded and checked: the key matches the first
/// certificate, every certificate parses, the first is valid at `now` (a warning when it
/// ends within [`EXPIRY_WARNING_SECS`]).
fn certified_key(
    cert: &Path,
    key: &Path,
    now: i64,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<String>,
) -> Option<Arc<CertifiedKey>> {
    let before = problems.len();
    let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(cert) {
        Ok(certs) => match certs.collect::<Result<_, _>>() {
            Ok(chain) => chain,
            Err(e) => {
                problems.push(Problem::in_file(cert, TlsFault::NotAChain(pem_error(&e))));
                Vec::new()
            }
        },
        Err(e) => {
            problems.push(Problem::in_file(cert, TlsFault::CannotRead(pem_error(&e))));
            Vec::new()
        }
    };
    if chain.is_empty() && problems.len() == before {
        problems.push(Problem::in_file(cert, TlsFault::NoCertificate));
    }
    for (i, der) in chain.iter().enumerate() {
        match x509_parser::parse_x509_certificate(der) {
            Ok((_, parsed)) if i == 0 => {
                let not_after = parsed.validity().not_after;
                let end = not_after.timestamp();
                if end < now {
                    problems.push(Problem::in_file(cert, TlsFault::Expired(not_after.to_string())));
                } else if end - now < EXPIRY_WARNING_SECS {
                    warnings.push(format!("{}: the certificate expires on {not_after}", cert.display()));
                }
                if parsed.validity().not_before.timestamp() > now {
                    problems.push(Problem::in_file(cert, TlsFault::NotYetValid));
                }
            }
            Ok(_) => {}
            Err(e) => {
                problems.push(Problem::in_file(cert, TlsFault::BadCertificate { index: i + 1, why: e.to_string() }))
            }
        }
    }
    let private = match PrivateKeyDer::from_pem_file(key) {
        Ok(k) => Some(k),
        Err(e) => {
            problems.push(Problem::in_file(key, TlsFault::NotAKey(pem_error(&e))));
            None
        }
    };
    let signing = private.and_then(|k| match provider().key_provider.load_private_key(k) {
        Ok(s) => Some(s),
        Err(e) => {
            problems.push(Problem::in_file(key, TlsFault::CannotSign(e.to_string())));
            None
        }
    });
    if problems.len() != before {
        return None;
    }
    let certified = CertifiedKey::new(chain, signing?);
    if let Err(e) = certified.keys_match() {
        problems.push(Problem::in_file(key, TlsFault::KeyMismatch { cert: cert.to_owned(), why: e.to_string() }));
        return None;
    }
    Some(Arc::new(certified))
}

/// The client configuration for STARTTLS to next hops, when `[relay] tls` is not "off":
/// the roots of `tls_ca` (or of this machine's trust store), or, without `tls_verify`,
/// any certificate. `file`: the configuration, named by a problem with the machine's store.
pub fn relay_client(relay: &Relay, file: &Path, problems: &mut Vec<Problem>) -> Option<Arc<rustls::ClientConfig>> {
    if relay.tls == RelayTls::Off {
        return None;
    }
    let builder = match rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions() {
        Ok(b) => b,
        Err(e) => {
            problems.push(Problem::in_file(file, TlsFault::Setup { key: "relay.tls", why: e.to_string() }));
            return None;
        }
    };
    let config = if relay.tls_verify {
        let roots = match &relay.tls_ca {
            Some(ca) => ca_roots(ca, problems)?,
            None => machine_roots(file, problems)?,
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider()))).with_no_client_auth()
    };
    Some(Arc::new(config))
}

/// The certificates of a PEM file, as roots.
fn ca_roots(ca: &Path, problems: &mut Vec<Problem>) -> Option<rustls::RootCertStore> {
    let certs: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(ca).map(|i| i.collect()) {
        Ok(Ok(certs)) => certs,
        Ok(Err(e)) | Err(e) => {
            problems.push(Problem::in_file(ca, TlsFault::NotRoots(pem_error(&e))));
            return None;
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if ignored > 0 || added == 0 {
        problems.push(Problem::in_file(ca, TlsFault::UnusableRoots { added, ignored }));
        return None;
    }
    Some(roots)
}

/// This machine's trust store (where operators put their own CA), read at every load.
fn machine_roots(file: &Path, problems: &mut Vec<Problem>) -> Option<rustls::RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
        problems.push(Problem::in_file(file, TlsFault::NoMachineRoots(why)));
        return None;
    }
    Some(roots)
}

/// `tls_verify = false`: any certificate, any name; the handshake's signature is still
/// checked against the certificate presented.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A PEM error in words (the library's own text shows bytes as numbers).
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => {
            format!("the `-----END {}-----` line is missing", String::from_utf8_lossy(end_marker))
        }
        Error::IllegalSectionStart { line } => format!("a bad BEGIN line: `{}`", String::from_utf8_lossy(line)),
        Error::NoItemsFound => "nothing of the kind in it".into(),
        other => other.to_string(),
    }
}

/// What the session learns of a finished handshake, for `Received:` and the mail log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: &'static str,
    /// The IANA name, `TLS_AES_256_GCM_SHA384`.
    pub cipher: &'static str,
}

impl Negotiated {
    pub fn of(conn: &rustls::ServerConnection) -> Self {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLS",
        };
        // IANA's names (rustls calls the TLS 1.3 ones TLS13_...)
        let cipher = match conn.negotiated_cipher_suite().map(|s| s.suite()) {
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256) => "TLS_AES_128_GCM_SHA256",
            Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384) => "TLS_AES_256_GCM_SHA384",
            Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256) => "TLS_CHACHA20_POLY1305_SHA256",
            Some(other) => other.as_str().unwrap_or("unknown"),
            None => "unknown",
        };
        Negotiated { version, cipher }
    }
}
