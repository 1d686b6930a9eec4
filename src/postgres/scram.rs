//! SCRAM-SHA-256 password verifiers (RFC 5802, RFC 7677), computed on our side so a password
//! never reaches the server as SQL text: `ALTER ROLE … PASSWORD 'SCRAM-SHA-256$…'` stores
//! the verifier as is, and `log_statement` or an error message can show nothing that logs in.
//! Pure: the salt comes from the caller.

use base64::Engine;
use sha2::{Digest, Sha256};

/// PostgreSQL's default iteration count (`scram_iterations`).
pub const ITERATIONS: u32 = 4096;

const BLOCK: usize = 64;

fn hmac(key: &[u8], message: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for m in message {
        inner.update(m);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block (the "Hi" function of RFC 5802).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        for (o, b) in out.iter_mut().zip(u.iter()) {
            *o ^= b;
        }
    }
    out
}

/// The verifier PostgreSQL stores for `password`, or None when the password is not plain
/// printable ASCII: clients normalise other passwords with SASLprep, which is not done here,
/// so the caller must let the server compute those.
pub fn verifier(password: &str, salt: &[u8], iterations: u32) -> Option<String> {
    if password.is_empty() || !password.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return None;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let salted = hi(password.as_bytes(), salt, iterations);
    let client_key = hmac(&salted, &[b"Client Key"]);
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, &[b"Server Key"]);
    Some(format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key),
        b64.encode(server_key)
    ))
}

/// Whether `stored` (`pg_authid.rolpassword`) is a SCRAM verifier of `password`: the same
/// computation with its salt and iteration count.
pub fn verifier_matches(stored: &str, password: &str) -> bool {
    let parse = || {
        let rest = stored.strip_prefix("SCRAM-SHA-256$")?;
        let (params, _) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let salt = base64::engine::general_purpose::STANDARD
            .decode(salt)
            .ok()?;
        let iterations: u32 = iterations.parse().ok()?;
        verifier(password, &salt, iterations.min(1_000_000))
    };
    parse().is_some_and(|v| v == stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        let mac = hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn pbkdf2_matches_the_published_vector() {
        // PBKDF2-HMAC-SHA256("password", "salt", 4096), first 32 bytes (RFC 7914 style vectors).
        let out = hi(b"password", b"salt", 4096);
        let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }

    #[test]
    fn verifiers_have_postgres_form_and_refuse_what_needs_saslprep() {
        let v = verifier("pencil", b"0123456789abcdef", 4096).expect("ascii");
        assert!(
            v.starts_with("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$"),
            "{v}"
        );
        assert_eq!(v.matches(':').count(), 2);
        assert!(verifier("pässwörd", b"salt", 4096).is_none());
        assert!(verifier("tab\there", b"salt", 4096).is_none());
        assert!(verifier("", b"salt", 4096).is_none());
        assert!(verifier_matches(&v, "pencil"));
        assert!(!verifier_matches(&v, "pencil2"));
        assert!(!verifier_matches("md5abcdef", "pencil"));
        assert!(!verifier_matches("SCRAM-SHA-256$x:y$z", "pencil"));
    }
}
