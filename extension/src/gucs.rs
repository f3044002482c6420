//! Every pgseal setting, declared in one place and read through a typed function
//! here. `init()` runs from `_PG_init`.
//!
//! No setting ever holds key bytes: the master key comes from the environment or
//! from the stdout of `pgseal.master_key_command`, and stays in process memory.

use std::ffi::{CStr, CString};

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

// Defaults of the settings whose value can be given as empty, which then means the
// default.
const DEFAULT_TENANT_SETTING: &CStr = c"app.tenant_id";
const DEFAULT_USER_SETTING: &CStr = c"app.user_id";
const DEFAULT_LEDGER_MIN_RETENTION: &CStr = c"10 years";

// The settings' values. Private: the rest of the extension reads them through the
// typed functions at the end of this file.
static MASTER_KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static MASTER_KEY_ACTIVE: GucSetting<i32> = GucSetting::<i32>::new(0);
static TENANT_SETTING: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(DEFAULT_TENANT_SETTING));
static KEY_CACHE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024);
static DEK_MAX_ENCRYPTIONS: GucSetting<i32> = GucSetting::<i32>::new(1 << 30);
static USER_SETTING: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(DEFAULT_USER_SETTING));
static AUDIT_DECRYPT: GucSetting<AuditDecrypt> = GucSetting::<AuditDecrypt>::new(AuditDecrypt::On);
static AUDIT_DECRYPT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10_000);
static RESTORE: GucSetting<bool> = GucSetting::<bool>::new(false);
static OFFBOARD_GRANT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `pgseal.audit_decrypt`: when and whether decrypts are recorded in the ledger.
#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum AuditDecrypt {
    /// The first decrypt of a key in a transaction is committed by the audit writer
    /// before its plaintext is returned; the count follows when the transaction ends.
    #[name = c"on"]
    On,
    /// One entry per key at the commit of the transaction (none if it rolls back).
    #[name = c"commit"]
    Commit,
    #[name = c"off"]
    Off,
    #[name = c"true"]
    #[hidden = true]
    True,
    #[name = c"false"]
    #[hidden = true]
    False,
}

impl AuditDecrypt {
    /// The mode, with the boolean spellings folded in.
    pub fn mode(self) -> AuditDecrypt {
        match self {
            AuditDecrypt::True => AuditDecrypt::On,
            AuditDecrypt::False => AuditDecrypt::Off,
            m => m,
        }
    }
}
static STRICT_CONTEXT: GucSetting<bool> = GucSetting::<bool>::new(false);
static TENANT_COLUMN_NAMES: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"{tenant_id}"));
static LEDGER_MIN_RETENTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(DEFAULT_LEDGER_MIN_RETENTION));

pub fn init() {
    GucRegistry::define_string_guc(
        c"pgseal.master_key_command",
        c"Command whose stdout holds the master key versions, one '<version>:<64 hex>' line each.",
        c"Run once at postmaster start. Only superusers can see this setting; it names a command, never key bytes.",
        &MASTER_KEY_COMMAND,
        GucContext::Postmaster,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"pgseal.master_key_active",
        c"Master key version that wraps new tenant keys; 0 means the highest loaded version.",
        c"Older loaded versions keep unwrapping. Set it in postgresql.conf; a superuser may also set it per session.",
        &MASTER_KEY_ACTIVE,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pgseal.tenant_setting",
        c"Name of the setting that holds the current tenant id.",
        c"pgseal.current_tenant() reads it and fails closed when it is unset or empty.",
        &TENANT_SETTING,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgseal.key_cache_size",
        c"Maximum number of unwrapped tenant keys each backend keeps in memory.",
        c"When the cache is full it is emptied and refilled on demand.",
        &KEY_CACHE_SIZE,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgseal.dek_max_encryptions",
        c"Encryptions after which a tenant data key is rotated automatically by the next seal.",
        c"Random 96-bit nonces allow at most 2^32 encryptions per key (NIST SP 800-38D); the default is 2^30.",
        &DEK_MAX_ENCRYPTIONS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pgseal.user_setting",
        c"Name of the setting that holds the current application user id.",
        c"Ledger entries take their actor from it when set, else from session_user.",
        &USER_SETTING,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pgseal.audit_decrypt",
        c"How decrypts are recorded in the ledger: on, commit or off.",
        c"on: each key's first decrypt in a transaction is committed by the pgseal audit writer before the plaintext is returned, and the count follows when the transaction ends, also on rollback; decrypts fail (55000) when that cannot be done. commit: one entry per key at commit, nothing on rollback. Only superusers may change it.",
        &AUDIT_DECRYPT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pgseal.restore",
        c"Let a restore insert dumped rows into pgseal's ledger tables.",
        c"Set it for the session that runs pg_restore (PGOPTIONS='-c pgseal.restore=on'); only superusers can. Updates and deletes stay refused.",
        &RESTORE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgseal.audit_decrypt_timeout",
        c"How long a decrypt waits for the audit writer to record it, in milliseconds.",
        c"After this long the decrypt fails (55000) without returning its plaintext.",
        &AUDIT_DECRYPT_TIMEOUT,
        100,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"pgseal.strict_context",
        c"Clear the tenant and user settings and close WITH HOLD cursors at the end of every transaction.",
        c"Even a session-level SET then lasts one transaction, so a pooled server connection never hands one client's tenant to the next.",
        &STRICT_CONTEXT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pgseal.tenant_column_names",
        c"Column names that mark a table as tenant-scoped, as a text array.",
        c"pgseal.isolation_report() checks every table that has one of these columns.",
        &TENANT_COLUMN_NAMES,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pgseal.offboard_grant",
        c"Set by pgseal on the nodes of a Citus cluster during an offboarding's statements.",
        c"A MAC made under a key derived from the master key (never key bytes) that shows an offboarding's statements all of a tenant's rows in one table org_protect protects, to that table's owner, until it expires. Any value pgseal did not make grants nothing.",
        &OFFBOARD_GRANT,
        GucContext::Userset,
        // Set by any role: a worker's connection runs as the table's owner, and
        // pgseal sends the grant from the owner's scope (`SET LOCAL … FROM CURRENT`
        // reads it as that role).
        GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_string_guc(
        c"pgseal.ledger_min_retention",
        c"Ledger entries younger than this interval are never pruned.",
        c"pgseal.ledger_prune refuses (55000) to delete them. The default, 10 years, is the GoBD period. Only superusers may change it.",
        &LEDGER_MIN_RETENTION,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// `pgseal.ledger_min_retention` as interval text; the default when someone set
/// it to empty.
pub fn ledger_min_retention() -> String {
    match LEDGER_MIN_RETENTION.get() {
        Some(v) if !v.as_bytes().is_empty() => v.to_string_lossy().into_owned(),
        _ => DEFAULT_LEDGER_MIN_RETENTION.to_string_lossy().into_owned(),
    }
}

/// The active master key version the configuration asks for, if any.
pub fn preferred_master_version() -> Option<u32> {
    match MASTER_KEY_ACTIVE.get() {
        0 => None,
        v => Some(v as u32),
    }
}

/// The name of the user-id setting, defaulting when someone set it to empty.
pub fn user_setting_name() -> CString {
    match USER_SETTING.get() {
        Some(n) if !n.as_bytes().is_empty() => n,
        _ => DEFAULT_USER_SETTING.to_owned(),
    }
}

/// Runs `f` with the name of the tenant setting, read in place (no copy: this is
/// on the decrypt path), defaulting when someone set it to empty.
pub fn with_tenant_setting_name<R>(f: impl FnOnce(&CStr) -> R) -> R {
    // SAFETY: the GUC machinery keeps this variable either NULL or pointing to a
    // NUL-terminated string that lives until the setting is next assigned, which
    // cannot happen while `f` runs: `f` only reads settings.
    let configured = unsafe {
        (*TENANT_SETTING.as_ptr())
            .as_ref()
            .map(|p| CStr::from_ptr(p))
    };
    match configured {
        Some(n) if !n.to_bytes().is_empty() => f(n),
        _ => f(DEFAULT_TENANT_SETTING),
    }
}

/// Runs `f` with `pgseal.offboard_grant`'s bytes, read in place (no copy: this runs
/// in `org_protect`'s offboarding policies, for every row they test), or None when
/// unset or empty.
pub fn with_offboard_grant<R>(f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    // SAFETY: the GUC machinery keeps this variable either NULL or pointing to a
    // NUL-terminated string that lives until the setting is next assigned, which
    // cannot happen while `f` runs: `f` only reads settings and the catalog.
    let value = unsafe {
        (*OFFBOARD_GRANT.as_ptr())
            .as_ref()
            .map(|p| CStr::from_ptr(p).to_bytes())
    };
    f(value.filter(|v| !v.is_empty()))
}

/// `pgseal.master_key_command`, if set.
pub fn master_key_command() -> Option<CString> {
    MASTER_KEY_COMMAND.get()
}

/// `pgseal.key_cache_size`: unwrapped keys a backend keeps (at least 1).
pub fn key_cache_size() -> usize {
    KEY_CACHE_SIZE.get().max(1) as usize
}

/// `pgseal.dek_max_encryptions`: seals under one data key before it is rotated.
pub fn dek_max_encryptions() -> i64 {
    i64::from(DEK_MAX_ENCRYPTIONS.get())
}

/// `pgseal.audit_decrypt`, with its boolean spellings folded in.
pub fn audit_decrypt() -> AuditDecrypt {
    AUDIT_DECRYPT.get().mode()
}

/// `pgseal.audit_decrypt_timeout`, in milliseconds.
pub fn audit_decrypt_timeout_ms() -> i64 {
    i64::from(AUDIT_DECRYPT_TIMEOUT.get())
}

/// `pgseal.restore`: a superuser is restoring a dump (the guard triggers let
/// pgseal's tables be loaded).
pub fn restore() -> bool {
    RESTORE.get()
}

/// `pgseal.strict_context`.
pub fn strict_context() -> bool {
    STRICT_CONTEXT.get()
}
