//! Typed errors of the core crate. Messages are fixed strings: they never
//! carry input bytes, plaintext or key material.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// The text envelope could not be parsed; the reason is a fixed phrase.
    #[error("malformed sealed value: {0}")]
    Malformed(&'static str),
    /// AES-GCM authentication failed: wrong key, wrong tenant, wrong context, or tampering.
    #[error("sealed value failed authentication")]
    AuthFailed,
    /// The master key material could not be parsed; the reason is a fixed phrase,
    /// plus a line number where one applies.
    #[error("invalid master key: {0}")]
    BadMasterKey(String),
    /// Decrypted bytes were not valid UTF-8 text.
    #[error("sealed value does not hold text")]
    NotText,
    /// A ledger payload number that RFC 8785 would round (see `canonical`).
    #[error(
        "payload holds a number that a JSON double cannot represent exactly; store it as a string"
    )]
    InexactNumber,
    /// A ledger payload that is not JSON.
    #[error("ledger payload is not valid JSON")]
    NotJson,
}
