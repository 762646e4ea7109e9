//! TLS helpers for tests: a certificate made with `rcgen`, a rustls client trusting only it,
//! and HTTP over such a connection.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM into `dir`: the paths
/// and the certificate's DER.
pub fn certificate(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key, made.cert.der().to_vec())
}

/// A TLS connection to `addr` trusting only `der`, offering `alpn`.
pub async fn connect(
    addr: std::net::SocketAddr,
    der: &[u8],
    alpn: &[&[u8]],
) -> TlsStream<tokio::net::TcpStream> {
    connect_trusting(addr, &[der], alpn).await
}

/// A TLS connection to `addr` trusting only the certificates `trusted`, offering `alpn`.
pub async fn connect_trusting(
    addr: std::net::SocketAddr,
    trusted: &[&[u8]],
    alpn: &[&[u8]],
) -> TlsStream<tokio::net::TcpStream> {
    let mut roots = RootCertStore::empty();
    for der in trusted {
        roots.add(CertificateDer::from(der.to_vec())).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// The certificate the server presented on `tls`.
pub fn presented(tls: &TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

pub fn request(method: &str, path: &str, token: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder().method(method).uri(format!("https://localhost{path}"));
    b = b.header(http::header::HOST, "localhost");
    if let Some(t) = token {
        b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

pub async fn body(res: http::Response<hyper::body::Incoming>) -> (u16, Value) {
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// `GET path` over a fresh HTTP/1.1 TLS connection to `addr`: status and JSON body.
pub async fn get_tls(addr: std::net::SocketAddr, der: &[u8], path: &str) -> (u16, Value) {
    let tls = connect(addr, der, &[b"http/1.1"]).await;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    body(tx.send_request(request("GET", path, None)).await.unwrap()).await
}
