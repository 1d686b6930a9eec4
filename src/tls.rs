//! rustls configurations from PEM texts, with one crypto provider (aws-lc-rs) chosen here
//! rather than left to whichever the process installed first: the agent's REST API serves
//! with them, and the etcd diagnosis probes with them.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in a PEM text (at least one).
pub fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in the PEM text"));
    }
    Ok(certs)
}

/// The private key of a PEM text. The error never repeats the text.
pub fn private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("{what}: not a PEM private key ({})", kind_of(&e)))
}

fn kind_of(e: &rustls::pki_types::pem::Error) -> &'static str {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => "no key found",
        _ => "unreadable",
    }
}

/// A client configuration trusting `ca`, presenting `identity` (certificate, key) if given.
pub fn client_config(
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates(ca, "CA certificate")? {
        roots
            .add(c)
            .map_err(|e| format!("CA certificate: unusable: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certificates(cert, "client certificate")?,
                private_key(key, "client key")?,
            )
            .map_err(|e| format!("client certificate and key: {e}")),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A server configuration presenting `cert` (a chain) and `key`; HTTP/1.1 only.
pub fn server_config(cert: &str, key: &str) -> Result<rustls::ServerConfig, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certificates(cert, "certificate")?, private_key(key, "key")?)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
