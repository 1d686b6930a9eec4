//! Secret values: resolved from the environment, a file or the spec itself, and never printed.
//!
//! `Secret` has no way to reach text except `expose()`: `Debug`, `Display` and `Serialize`
//! all print a placeholder, so a secret that slips into a log line, a plan or an error message
//! shows up as `<redacted>`. The agent's configuration file, which must carry the real value,
//! opts in explicitly through [`exposed`].

use std::fmt;

use serde::{Deserialize, Serialize};

pub const REDACTED: &str = "<redacted>";

#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself. Call sites are few and deliberate: config rendering, SQL, auth.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// Where a secret came from, for messages that must name it without showing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretSource {
    Env(String),
    File(String),
    Inline,
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(name) => write!(f, "environment variable {name}"),
            SecretSource::File(path) => write!(f, "file {path}"),
            SecretSource::Inline => f.write_str("the spec"),
        }
    }
}

/// (De)serialize a [`Secret`] as its real value. Only for files that are themselves secret
/// (the agent configuration, mode 0600).
pub mod exposed {
    use super::*;

    pub fn serialize<S: serde::Serializer>(secret: &Secret, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(secret.expose())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }

    /// The same for an optional secret.
    pub mod option {
        use super::*;

        pub fn serialize<S: serde::Serializer>(
            secret: &Option<Secret>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match secret {
                Some(v) => s.serialize_some(v.expose()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Secret>, D::Error> {
            Option::<String>::deserialize(d).map(|o| o.map(Secret::new))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_format() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        assert_eq!(
            serde_json::to_string(&s).unwrap_or_default(),
            "\"<redacted>\""
        );
        assert_eq!(s.expose(), "hunter2");
    }
}
