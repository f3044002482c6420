//! pgseal's typed errors, and the one place that turns them into `ereport`.
//!
//! Every message is a fixed phrase, or names only non-secret identifiers (a key
//! id, a master key version number, a tenant id the caller passed as a
//! parameter). No input value, plaintext or key byte is ever interpolated.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use pgseal_core::CoreError;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("pgseal must be loaded through shared_preload_libraries")]
    NotPreloaded,
    #[error("pgseal master key is not loaded")]
    MasterKeyNotLoaded { hint: &'static str },
    #[error("pgseal master key version {0} is not loaded")]
    MasterVersionMissing(u32),
    #[error("no tenant context: the setting {0} is not set")]
    NoTenantContext(String),
    #[error("no user context: the setting {0} is not set")]
    NoUserContext(String),
    #[error("sealed value belongs to another tenant")]
    WrongTenant,
    #[error("{0}")]
    Malformed(CoreError),
    #[error("sealed value names an unknown key")]
    UnknownKey,
    #[error("sealed value's key has been destroyed")]
    KeyDestroyed,
    #[error("sealed value failed authentication (wrong context, or the value was altered)")]
    AuthFailed,
    #[error("sealed value does not hold text")]
    NotText,
    #[error("{0}")]
    InvalidArgument(&'static str),
    /// 22004: a required argument is NULL.
    #[error("{0} must not be NULL")]
    NullArgument(&'static str),
    #[error("{0} needs a read-write transaction")]
    ReadOnly(&'static str),
    #[error("{0}")]
    NotSupported(&'static str),
    #[error("stored key {0} could not be unwrapped: it is corrupt or was moved")]
    CorruptKey(String),
    #[error("{0} needs the pgseal_admin role")]
    NotAdmin(&'static str),
    #[error("the tenant's ledger fails verification at seq {0} ({1}); refusing to continue")]
    ChainCorrupt(i64, &'static str),
    #[error("{0}")]
    TriggerProtocol(&'static str),
    #[error("{0}")]
    WrongObjectType(&'static str),
    #[error("permission denied: {0}")]
    Forbidden(&'static str),
    /// 55000: the object is not in a state that allows this (a hold, a retention).
    #[error("{0}")]
    Refused(&'static str),
    /// 55000: a decrypt could not be recorded before its plaintext was returned.
    #[error("{0}")]
    AuditNotRecorded(&'static str),
    /// 22021: a value pgseal compares or records as text is not valid UTF-8 (in a
    /// database whose encoding lets such bytes in, SQL_ASCII or a single-byte one).
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// 54000: an argument longer than its documented limit (`limits.rs`).
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    /// 54000: a list with more elements than its documented limit.
    #[error("more than {max} {what}")]
    TooMany { what: &'static str, max: usize },
    /// 40001: a concurrent transaction did the same; retry.
    #[error("{0}")]
    Conflict(&'static str),
    #[error("pgseal internal error: {0}")]
    Internal(&'static str),
    /// An error about one of the several tables a statement works through, with
    /// that table's name (a quoted, qualified identifier: no data) after it. Its
    /// SQLSTATE and hint are the inner error's.
    #[error("{1} (table {0})")]
    OnTable(String, Box<SealError>),
}

impl SealError {
    /// This error, about table `name` (see `OnTable`).
    pub fn on_table(self, name: &str) -> SealError {
        match self {
            SealError::OnTable(..) => self,
            e => SealError::OnTable(name.to_owned(), Box::new(e)),
        }
    }

    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            SealError::OnTable(_, e) => e.sqlstate(),
            SealError::NotPreloaded
            | SealError::MasterKeyNotLoaded { .. }
            | SealError::MasterVersionMissing(_)
            | SealError::Refused(_)
            | SealError::AuditNotRecorded(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            SealError::Conflict(_) => ERRCODE_T_R_SERIALIZATION_FAILURE,
            SealError::TooLong { .. } | SealError::TooMany { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            SealError::NullArgument(_) => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            SealError::NotUtf8(_) => ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            SealError::NoTenantContext(_)
            | SealError::NoUserContext(_)
            | SealError::WrongTenant
            | SealError::NotAdmin(_)
            | SealError::Forbidden(_) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            SealError::WrongObjectType(_) => ERRCODE_WRONG_OBJECT_TYPE,
            SealError::ChainCorrupt(..) => ERRCODE_DATA_CORRUPTED,
            SealError::Malformed(_) => ERRCODE_INVALID_TEXT_REPRESENTATION,
            SealError::UnknownKey
            | SealError::KeyDestroyed
            | SealError::AuthFailed
            | SealError::NotText
            | SealError::InvalidArgument(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            SealError::ReadOnly(_) => ERRCODE_READ_ONLY_SQL_TRANSACTION,
            SealError::NotSupported(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            SealError::CorruptKey(_) => ERRCODE_DATA_CORRUPTED,
            SealError::TriggerProtocol(_) => ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            SealError::Internal(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            SealError::OnTable(_, e) => e.hint(),
            SealError::NotPreloaded => Some(
                "Add pgseal to shared_preload_libraries in postgresql.conf and restart the server.",
            ),
            SealError::MasterKeyNotLoaded { hint } => Some(hint),
            SealError::MasterVersionMissing(_) => {
                Some("Add that version to the output of pgseal.master_key_command and restart.")
            }
            SealError::NoTenantContext(_) | SealError::NoUserContext(_) => {
                Some("Call pgseal.set_tenant(...) or SET LOCAL the setting in this transaction.")
            }
            SealError::AuditNotRecorded(_) => Some(
                "With pgseal.audit_decrypt = on, each key's first decrypt in a transaction is committed to the ledger by the pgseal audit writer before the plaintext is returned. See the server log; a superuser may choose pgseal.audit_decrypt = commit instead.",
            ),
            _ => None,
        }
    }

    /// Raises the error as a Postgres ERROR. Never returns.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), "pgseal");
        if let Some(h) = self.hint() {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

impl From<CoreError> for SealError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::Malformed(_) | CoreError::NotJson => SealError::Malformed(e),
            CoreError::AuthFailed => SealError::AuthFailed,
            CoreError::NotText => SealError::NotText,
            CoreError::InexactNumber => SealError::InvalidArgument(
                "payload holds a number that a JSON double cannot represent exactly; store it as a string",
            ),
            CoreError::BadMasterKey(_) => SealError::MasterKeyNotLoaded { hint: "The master key could not be parsed; see the server log." },
        }
    }
}

impl From<pgrx::spi::SpiError> for SealError {
    fn from(_: pgrx::spi::SpiError) -> Self {
        SealError::Internal("unexpected result shape from pgseal's own tables")
    }
}

pub type SealResult<T> = Result<T, SealError>;

/// Unwraps a result at the SQL boundary, raising the error with its SQLSTATE.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for SealResult<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}
