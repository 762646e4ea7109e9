//! TLS for both listeners (rustls, with the `ring` provider): the certificate chain and key of
//! `server.tls_cert` / `server.tls_key`, HTTP/2 or HTTP/1.1 by ALPN, and a reload of both files
//! (on SIGHUP) that new handshakes use at once while open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{ServerConfig, version};

/// ALPN protocols offered, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The certificate every handshake gets, swapped whole by a reload.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The TLS side of the listeners; cloning the `Arc` is shallow.
pub struct Tls {
    current: Arc<Current>,
    acceptor: TlsAcceptor,
    cert: PathBuf,
    key: PathBuf,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("cert", &self.cert).field("key", &self.key).finish()
    }
}

impl Tls {
    /// Loads the chain and key; an error names the file and what is wrong with it.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, String> {
        let current = Arc::new(Current(ArcSwap::from_pointee(certified_key(cert, key)?)));
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    /// Reads both files again; new handshakes use them. On an error the old pair stays.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = certified_key(&self.cert, &self.key)?;
        self.current.0.store(Arc::new(fresh));
        Ok(())
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in it", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signer = ring::sign::any_supported_type(&der).map_err(|e| format!("{}: {e}", key.display()))?;
    let pair = CertifiedKey::new(chain, signer);
    pair.keys_match().map_err(|e| format!("{} does not match {}: {e}", key.display(), cert.display()))?;
    Ok(pair)
}
