//! A throwaway certificate authority for a lab whose etcd speaks TLS (and for tests that
//! need certificates): a CA, server certificates (addresses as IP subject alternative names)
//! and a client certificate. Made with the `openssl` command, kept in the lab's 0700 state folder, and gone
//! with `lab down`. Never for anything but the lab.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::LabError;
use super::sys::run;

/// The lab's CA and the files made from it.
pub struct Pki {
    dir: PathBuf,
}

/// A certificate and its private key, as files.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

const DAYS: &str = "30";
/// A new P-256 key, unencrypted.
const NEW_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Pki {
    /// The CA in `dir`, made when missing.
    pub fn ensure(dir: &Path, name: &str) -> Result<Pki, LabError> {
        fs::create_dir_all(dir)
            .map_err(|e| LabError::Io(format!("create {}: {e}", dir.display())))?;
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        if !pki.ca().exists() {
            let (key, ca) = (s(&dir.join("ca.key")), s(&pki.ca()));
            let subject = format!("/CN=citus-reconcile lab CA {name}");
            let mut args = vec!["req", "-x509"];
            args.extend(NEW_KEY);
            args.extend([
                "-keyout",
                &key,
                "-out",
                &ca,
                "-days",
                DAYS,
                "-subj",
                &subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            run("openssl", &args)?;
        }
        Ok(pki)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A server certificate for `addresses` (also valid as a client, as etcd's peers use
    /// theirs), made when missing.
    pub fn server(&self, name: &str, addresses: &[Ipv4Addr]) -> Result<Pair, LabError> {
        let names: Vec<String> = addresses
            .iter()
            .map(|a| format!("IP:{a}"))
            .chain(["IP:127.0.0.1".to_string()])
            .collect();
        self.issue(
            name,
            &[
                format!("subjectAltName={}", names.join(",")),
                "extendedKeyUsage=serverAuth,clientAuth".into(),
            ],
        )
    }

    /// The client certificate the spec's `etcd.tls.cert` names.
    pub fn client(&self) -> Result<Pair, LabError> {
        self.issue("client", &["extendedKeyUsage=clientAuth".into()])
    }

    fn issue(&self, name: &str, extensions: &[String]) -> Result<Pair, LabError> {
        let pair = Pair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        if pair.cert.exists() && pair.key.exists() {
            return Ok(pair);
        }
        let csr = self.dir.join(format!("{name}.csr"));
        let subject = format!("/CN={name}");
        let mut req = vec!["req", "-new"];
        req.extend(NEW_KEY);
        let (key, csr_s) = (s(&pair.key), s(&csr));
        req.extend([
            "-keyout",
            key.as_str(),
            "-out",
            csr_s.as_str(),
            "-subj",
            &subject,
        ]);
        for e in extensions {
            req.extend(["-addext", e.as_str()]);
        }
        req.extend(["-addext", "basicConstraints=CA:FALSE"]);
        run("openssl", &req)?;
        let (ca, ca_key, cert) = (s(&self.ca()), s(&self.dir.join("ca.key")), s(&pair.cert));
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr_s,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-copy_extensions",
                "copyall",
                "-days",
                DAYS,
                "-out",
                &cert,
            ],
        )?;
        let _ = fs::remove_file(&csr);
        Ok(pair)
    }
}
