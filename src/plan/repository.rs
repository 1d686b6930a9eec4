//! Apt repositories that `install: apt` adds (pure): the PostgreSQL project's
//! (`postgres.repository: pgdg`), its sources file, and the check that the keyring apt will
//! trust holds exactly the key pinned here.
//!
//! The PostgreSQL project's key comes from Debian's own `postgresql-common` package
//! (installed from the distribution, which signs it), Citus's from its URL; either is checked
//! against its pinned fingerprint, and the checked bytes are what `apply` writes under
//! `/etc/apt/keyrings`, the one keyring apt trusts for that repository (`Signed-By`), never
//! for the distribution's. The sources file names the pinned key, so a new pin is a new file.

use sha2::Digest as _;

/// The name of the PostgreSQL project's repository in plans and file names.
pub const PGDG: &str = "pgdg";
/// The PostgreSQL project's archive signing key (apt.postgresql.org, key ACCC4CF8).
pub const PGDG_KEY_FINGERPRINT: &str = "B97B0AFCAA1A47F044F244A07FCC7D46ACCC4CF8";
/// Where Debian's `postgresql-common` keeps that key, as a binary keyring.
pub const PGDG_KEYRING: &str = "/usr/share/postgresql-common/pgdg/apt.postgresql.org.gpg";
pub const PGDG_URL: &str = "http://apt.postgresql.org/pub/repos/apt";

/// Citus's repository as the spec gives it (`citus.repository`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CitusRepository {
    /// Base URL, without a trailing `/`.
    pub url: String,
    pub key_url: String,
    /// Upper-case hex, 40 digits.
    pub fingerprint: String,
}

pub const CITUS: &str = "citus";
/// The key packagecloud made for Citus's community repository in 2016 (RSA 4096, no expiry;
/// its signing subkey `0D750985D6AF6C22` is the id apt names in `NO_PUBKEY` errors reported
/// against repos.citusdata.com). Read off a public copy of the key, not the live URL: the
/// spec can pin another.
pub const CITUS_KEY_FINGERPRINT: &str = "E6FFC1A8E2561FC004D1847F56F4FA441530DF18";

/// Where `apply` keeps a downloaded repository key (binary keyring; apt reads it for that
/// repository only).
pub fn keyring_path(name: &str) -> String {
    format!("/etc/apt/keyrings/citus-reconcile-{name}.gpg")
}

/// A URL that can stand in a sources file and a shell word: http(s), and none of the
/// characters that end a field or a line.
pub fn valid_url(u: &str) -> bool {
    (u.starts_with("https://") || u.starts_with("http://"))
        && u.len() > "https://".len()
        && u.chars()
            .all(|c| c.is_ascii_graphic() && !"\"'`$\\<>{}|^;@".contains(c))
}

/// Citus's repository for a distribution (`debian`, `ubuntu`) and release.
pub fn citus_sources(r: &CitusRepository, os_id: &str, codename: &str) -> String {
    format!(
        "# Written by citus-reconcile apply (citus.repository).\n# Key {}, from {}.\nTypes: deb\nURIs: {}/{os_id}/\nSuites: {codename}\nComponents: main\nSigned-By: {}\n",
        r.fingerprint,
        r.key_url,
        r.url,
        keyring_path(CITUS)
    )
}

/// The binary packets of an ASCII-armored key (RFC 4880 6.2); binary input comes back as
/// it is.
pub fn dearmor(input: &[u8]) -> Result<Vec<u8>, String> {
    let Ok(text) = std::str::from_utf8(input) else {
        return Ok(input.to_vec());
    };
    let Some(start) = text.find("-----BEGIN PGP PUBLIC KEY BLOCK-----") else {
        return Ok(input.to_vec());
    };
    let mut lines = text[start..].lines().skip(1);
    // Armor headers ("Version: …") end at the first empty line.
    for l in lines.by_ref() {
        if l.trim().is_empty() {
            break;
        }
    }
    let mut b64 = String::new();
    let mut ended = false;
    for l in lines {
        let l = l.trim();
        if l.starts_with("-----END PGP PUBLIC KEY BLOCK-----") {
            ended = true;
            break;
        }
        // The checksum line; the key's fingerprint is checked anyway.
        if l.starts_with('=') {
            continue;
        }
        b64.push_str(l);
    }
    if !ended {
        return Err("an armored key without its END line".into());
    }
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
        .map_err(|e| format!("an armored key that is not base64: {e}"))
}

/// The sources file `apply` writes for a repository.
pub fn sources_path(name: &str) -> String {
    format!("/etc/apt/sources.list.d/citus-reconcile-{name}.sources")
}

/// A release codename as `/etc/os-release` gives it (`bookworm`, `noble`): it becomes part of
/// a sources file, so nothing but lower-case letters.
pub fn valid_codename(c: &str) -> bool {
    !c.is_empty() && c.len() <= 32 && c.chars().all(|c| c.is_ascii_lowercase())
}

/// The PostgreSQL project's repository for a release, in apt's deb822 format.
pub fn pgdg_sources(codename: &str) -> String {
    format!(
        "# Written by citus-reconcile apply (postgres.repository: pgdg).\n# Key {PGDG_KEY_FINGERPRINT}, from {PGDG_KEYRING}.\nTypes: deb\nURIs: {PGDG_URL}\nSuites: {codename}-pgdg\nComponents: main\nSigned-By: {}\n",
        keyring_path(PGDG)
    )
}

/// SHA-256 of a sources file's text, as the probe reports it.
pub fn sources_sha256(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One OpenPGP packet: its tag and body.
fn packets(bytes: &[u8]) -> Result<Vec<(u8, &[u8])>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let head = bytes[i];
        if head & 0x80 == 0 {
            return Err(format!(
                "not an OpenPGP packet at byte {i} (an armored key?)"
            ));
        }
        let (tag, len, header) = if head & 0x40 != 0 {
            // New format: one, two or five length octets.
            let tag = head & 0x3f;
            let o1 = *bytes.get(i + 1).ok_or("truncated packet header")? as usize;
            match o1 {
                0..=191 => (tag, o1, 2),
                192..=223 => {
                    let o2 = *bytes.get(i + 2).ok_or("truncated packet header")? as usize;
                    (tag, ((o1 - 192) << 8) + o2 + 192, 3)
                }
                255 => {
                    let b = bytes.get(i + 2..i + 6).ok_or("truncated packet header")?;
                    (
                        tag,
                        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
                        6,
                    )
                }
                _ => return Err("partial-length packets have no place in a keyring".into()),
            }
        } else {
            // Old format: the length's size in the low two bits.
            let tag = (head >> 2) & 0x0f;
            match head & 0x03 {
                0 => (
                    tag,
                    *bytes.get(i + 1).ok_or("truncated packet header")? as usize,
                    2,
                ),
                1 => {
                    let b = bytes.get(i + 1..i + 3).ok_or("truncated packet header")?;
                    (tag, u16::from_be_bytes([b[0], b[1]]) as usize, 3)
                }
                2 => {
                    let b = bytes.get(i + 1..i + 5).ok_or("truncated packet header")?;
                    (
                        tag,
                        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
                        5,
                    )
                }
                _ => return Err("indeterminate-length packets have no place in a keyring".into()),
            }
        };
        let end = i
            .checked_add(header)
            .and_then(|s| s.checked_add(len))
            .ok_or("a packet longer than memory")?;
        let body = bytes.get(i + header..end).ok_or("truncated packet")?;
        out.push((tag, body));
        i = end;
    }
    Ok(out)
}

/// The fingerprints of the primary keys in a binary keyring (version 4 keys: SHA-1 of the
/// key packet, RFC 4880 12.2), upper-case hex.
pub fn primary_key_fingerprints(keyring: &[u8]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (tag, body) in packets(keyring)? {
        if tag != 6 {
            continue;
        }
        if body.first() != Some(&4) {
            return Err(format!(
                "a version {} key: only version 4 keys are checked",
                body.first().copied().unwrap_or(0)
            ));
        }
        let len = u16::try_from(body.len()).map_err(|_| "a key packet too long")?;
        let mut h = sha1::Sha1::new();
        sha1::Digest::update(&mut h, [0x99]);
        sha1::Digest::update(&mut h, len.to_be_bytes());
        sha1::Digest::update(&mut h, body);
        out.push(
            sha1::Digest::finalize(h)
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect(),
        );
    }
    Ok(out)
}

/// Packets a public keyring may hold: signatures (2), trust (12), user ids (13), public keys
/// and subkeys (6, 14), user attributes (17), the marker (10). Anything else — a secret key
/// (5, 7) a verifier could take for a certificate of its own, say — is refused.
const PUBLIC_KEYRING_TAGS: [u8; 7] = [2, 6, 10, 12, 13, 14, 17];

/// The keyring holds only public-key packets and exactly one primary key, the `pinned` one
/// (its subkeys come with it).
pub fn check_keyring(keyring: &[u8], pinned: &str) -> Result<(), String> {
    if let Some((tag, _)) = packets(keyring)?
        .iter()
        .find(|(tag, _)| !PUBLIC_KEYRING_TAGS.contains(tag))
    {
        return Err(format!(
            "the keyring holds a packet of type {tag}, which has no place in a public keyring"
        ));
    }
    match primary_key_fingerprints(keyring)?.as_slice() {
        [one] if one.eq_ignore_ascii_case(pinned) => Ok(()),
        [] => Err("the keyring holds no key".into()),
        [one] => Err(format!(
            "the keyring holds key {one}, not the pinned {pinned}"
        )),
        many => Err(format!(
            "the keyring holds {} keys ({}); only the pinned {pinned} may be trusted",
            many.len(),
            many.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 4 key packet (new format) with the given body after its version octet.
    fn key_packet(tag: u8, rest: &[u8]) -> Vec<u8> {
        let mut body = vec![4u8];
        body.extend_from_slice(rest);
        let mut out = vec![0xc0 | tag, body.len() as u8];
        out.extend(body);
        out
    }

    #[test]
    fn keyrings_are_checked_against_the_pinned_key() {
        let a = key_packet(6, b"key a");
        let b = key_packet(6, b"key b");
        let sub = key_packet(14, b"subkey of a");
        let user_id = [0xcd, 3, b'x', b'y', b'z'];
        let fp_a = primary_key_fingerprints(&a).expect("parses")[0].clone();
        let fp_b = primary_key_fingerprints(&b).expect("parses")[0].clone();
        assert_eq!(fp_a.len(), 40);
        assert_ne!(fp_a, fp_b);
        let cat = |parts: &[&[u8]]| parts.concat();
        let cases: Vec<(&str, Vec<u8>, Result<(), &str>)> = vec![
            ("the pinned key", cat(&[&a, &user_id, &sub]), Ok(())),
            ("another key", b.clone(), Err("not the pinned")),
            (
                "the pinned key and another",
                cat(&[&a, &b]),
                Err("holds 2 keys"),
            ),
            ("no key", user_id.to_vec(), Err("holds no key")),
            ("armored", b"-----BEGIN PGP".to_vec(), Err("armored")),
            ("truncated", a[..a.len() - 1].to_vec(), Err("truncated")),
            ("version 5", cat(&[&[0xc6, 2, 5, 0]]), Err("version 5")),
            (
                "the pinned key and a secret key",
                cat(&[&a, &key_packet(5, b"secret of another")]),
                Err("type 5"),
            ),
        ];
        for (what, keyring, want) in cases {
            let got = check_keyring(&keyring, &fp_a);
            match want {
                Ok(()) => assert_eq!(got, Ok(()), "{what}"),
                Err(part) => assert!(
                    got.as_ref().is_err_and(|e| e.contains(part)),
                    "{what}: {got:?}"
                ),
            }
        }
        // Old-format headers parse as well (one-octet length).
        let mut old = vec![0x98, a.len() as u8 - 2];
        old.extend_from_slice(&a[2..]);
        assert_eq!(
            primary_key_fingerprints(&old).expect("old format"),
            vec![fp_a]
        );
    }

    #[test]
    fn armored_keys_and_citus_sources() {
        let a = key_packet(6, b"key a");
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &a);
        let armored = format!(
            "-----BEGIN PGP PUBLIC KEY BLOCK-----\nVersion: x\n\n{}\n{}\n=abcd\n-----END PGP PUBLIC KEY BLOCK-----\n",
            &b64[..8],
            &b64[8..]
        );
        assert_eq!(dearmor(armored.as_bytes()), Ok(a.clone()));
        assert_eq!(dearmor(&a), Ok(a.clone()));
        assert!(dearmor(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n").is_err());
        let r = CitusRepository {
            url: "https://repos.citusdata.com/community".into(),
            key_url: "https://repos.citusdata.com/community/gpgkey".into(),
            fingerprint: "0".repeat(40),
        };
        let text = citus_sources(&r, "debian", "bookworm");
        assert!(
            text.contains(
                "URIs: https://repos.citusdata.com/community/debian/\nSuites: bookworm\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("Signed-By: /etc/apt/keyrings/citus-reconcile-citus.gpg\n"),
            "{text}"
        );
        for (u, ok) in [
            ("https://repos.citusdata.com/community", true),
            ("http://mirror.local:8080/citus", true),
            ("ftp://x", false),
            ("https://", false),
            ("https://a b", false),
            ("https://a\nSigned-By: /x", false),
            ("https://a;reboot", false),
            // Credentials would end up in plans and a world-readable sources file.
            ("https://user:token@packagecloud.io/x", false),
        ] {
            assert_eq!(valid_url(u), ok, "{u:?}");
        }
    }

    #[test]
    fn the_pgdg_sources_file() {
        let text = pgdg_sources("bookworm");
        assert!(text.contains("Suites: bookworm-pgdg\n"), "{text}");
        assert!(
            text.contains("Signed-By: /etc/apt/keyrings/citus-reconcile-pgdg.gpg\n"),
            "{text}"
        );
        assert!(text.contains(PGDG_KEY_FINGERPRINT), "{text}");
        for (c, ok) in [
            ("bookworm", true),
            ("noble", true),
            ("", false),
            ("a b", false),
            ("x\nURIs", false),
        ] {
            assert_eq!(valid_codename(c), ok, "{c:?}");
        }
    }
}
