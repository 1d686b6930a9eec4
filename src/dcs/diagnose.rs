//! Why an etcd endpoint did not answer. The gRPC channel waits for a connection it cannot
//! make, so an untrusted server certificate, a refused client certificate or plain text sent
//! to a TLS port all look like a timeout. A direct probe (TCP, then the TLS handshake or an
//! HTTP request) names the cause. Bounded by `timeout` per step; blocking, so run off the
//! async workers.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use super::TlsMaterial;

/// A sentence naming what is wrong with `url`, or None when the probe found nothing wrong.
pub async fn why_unreachable(
    url: &str,
    tls: Option<&TlsMaterial>,
    timeout: Duration,
) -> Option<String> {
    let (url, tls) = (url.to_string(), tls.cloned());
    tokio::task::spawn_blocking(move || probe(&url, tls.as_ref(), timeout))
        .await
        .ok()
        .flatten()
}

fn probe(url: &str, tls: Option<&TlsMaterial>, timeout: Duration) -> Option<String> {
    let ep = crate::spec::rules::parse_endpoint(url).ok()?;
    let addr = (ep.host.as_str(), ep.port).to_socket_addrs().ok()?.next()?;
    let mut sock = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot connect to {addr}: {e}")),
    };
    sock.set_read_timeout(Some(timeout)).ok()?;
    sock.set_write_timeout(Some(timeout)).ok()?;
    match (ep.scheme.as_str(), tls) {
        ("https", Some(tls)) => tls_probe(&ep.host, sock, tls),
        ("http", _) => {
            // A Go TLS server answers an HTTP request with a 400 that says so.
            sock.write_all(b"GET /health HTTP/1.0\r\n\r\n").ok()?;
            let mut buf = [0u8; 512];
            let n = sock.read(&mut buf).ok()?;
            let reply = String::from_utf8_lossy(&buf[..n]);
            if reply.contains("HTTPS server") || buf.first() == Some(&0x15) {
                Some("the endpoint speaks TLS: write it as https:// and set etcd.tls".into())
            } else if n == 0 {
                // etcd's TLS listener drops plain text without a word.
                Some("the endpoint closed the connection without an HTTP answer; if it speaks TLS, write it as https:// and set etcd.tls".into())
            } else {
                None
            }
        }
        _ => None,
    }
}

fn tls_probe(host: &str, mut sock: TcpStream, tls: &TlsMaterial) -> Option<String> {
    let identity = tls.identity.as_ref().map(|(c, k)| (c.as_str(), k.expose()));
    let config = match crate::tls::client_config(&tls.ca, identity) {
        Ok(c) => c,
        Err(e) => return Some(e),
    };
    let name = match host.parse::<IpAddr>() {
        Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
        Err(_) => rustls::pki_types::ServerName::try_from(host.to_string()).ok()?,
    };
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            return Some(format!("TLS handshake failed: {}", tls_reason(&e)));
        }
    }
    // In TLS 1.3 the server judges the client certificate after the handshake: a refusal
    // arrives as an alert on the first read.
    let mut stream = rustls::Stream::new(&mut conn, &mut sock);
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Err(e)
            if e.kind() != std::io::ErrorKind::WouldBlock
                && e.kind() != std::io::ErrorKind::TimedOut =>
        {
            let refused = tls_reason(&e);
            Some(
                if tls.identity.is_none() && refused.contains("client certificate") {
                    "etcd requires a client certificate: set etcd.tls.cert and etcd.tls.key".into()
                } else {
                    format!("etcd closed the TLS session: {refused}")
                },
            )
        }
        _ => None,
    }
}

/// rustls errors arrive wrapped in io::Error; say them in words an operator acts on.
fn tls_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("UnknownIssuer") {
        "etcd's certificate is not signed by the CA in etcd.tls.ca".into()
    } else if text.contains("NotValidForName") {
        "etcd's certificate does not name this endpoint's host".into()
    } else if text.contains("CertificateRequired") {
        "etcd requires a client certificate: set etcd.tls.cert and etcd.tls.key".into()
    } else if text.contains("BadCertificate") || text.contains("UnknownCA") {
        "etcd refused the client certificate (not signed by a CA it trusts)".into()
    } else {
        text
    }
}
