//! The harness's side of STARTTLS: the client configuration its peers use, and the
//! self-signed certificates it gives the servers it starts.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// What a relaying peer needs for STARTTLS: the client configuration (its session cache
/// decides whether handshakes resume) and the name the server's certificate must bear.
#[derive(Clone, Debug)]
pub struct TlsClient {
    pub config: Arc<rustls::ClientConfig>,
    pub name: ServerName<'static>,
}

impl TlsClient {
    /// TLS 1.3, trusting `root` for `name`; `resume`: tickets are kept and used (by every
    /// connection sharing this configuration), else every handshake is full.
    pub fn new(root: CertificateDer<'static>, name: &str, resume: bool) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).map_err(|e| format!("the TLS root: {e}"))?;
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let name = ServerName::try_from(name.to_owned()).map_err(|e| format!("`{name}`: {e}"))?;
        Ok(TlsClient { config: Arc::new(config), name })
    }
}

/// The first certificate of a PEM file (a root to trust).
pub fn read_root(path: &Path) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A self-signed ECDSA P-256 certificate (most MX certificates today) for `names`: the
/// certificate and its PKCS#8 key as PEM, and the certificate as DER (its own root).
pub fn self_signed(names: &[String]) -> Result<(String, String, CertificateDer<'static>), String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let cert =
        rcgen::CertificateParams::new(names.to_vec()).and_then(|p| p.self_signed(&key)).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem(), cert.der().clone()))
}
