//! A client connection to another PostgreSQL server through the libpq that Citus
//! loaded into this process (`citus.so` links `libpq.so.5`, and Citus is in
//! `shared_preload_libraries` wherever pgseal talks to another node). pgseal itself
//! does not link libpq: its functions are looked up at run time, and on a server
//! without it `Conn::open` fails with a message instead of the library failing to
//! load.
//!
//! What it relies on: libpq's documented C API (stable across its versions); the
//! library is already loaded (`dlopen` with `RTLD_NOLOAD`, so pgseal never loads
//! another copy). Results are read through a wait on the process latch and the
//! connection's socket (`WaitLatchOrSocket`), so a postmaster death ends the wait,
//! and no wait outlasts its deadline; a process that is asked to stop ends its waits
//! at once (`give_up_when`).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::{Duration, Instant};

use pgrx::pg_sys;

thread_local! {
    /// Whether this process has been asked to stop (`give_up_when`).
    static GIVE_UP: std::cell::Cell<Option<fn() -> bool>> = const { std::cell::Cell::new(None) };
}

/// Makes every wait of this process's connections end, failed, as soon as `check`
/// says the process is stopping (a background worker's SIGTERM): the wait is
/// woken by the latch the signal sets, and a shutdown does not wait out a silent
/// server's deadline.
pub fn give_up_when(check: fn() -> bool) {
    GIVE_UP.with(|g| g.set(Some(check)));
}

/// How a wait on a connection ended.
#[derive(PartialEq)]
enum Waited {
    Ready,
    /// Its deadline passed, or the connection has no socket.
    TimedOut,
    /// The process is stopping (`give_up_when`).
    GaveUp,
}

/// The message for a wait that did not end `Ready`.
fn not_ready(w: Waited, timed_out: &str) -> String {
    match w {
        Waited::GaveUp => "the wait was given up: this process is stopping".to_owned(),
        _ => timed_out.to_owned(),
    }
}

type PgConn = c_void;
type PgResult = c_void;

/// libpq's `CONNECTION_OK`.
const CONNECTION_OK: c_int = 0;
/// libpq's `CONNECTION_BAD`: what `PQstatus` is not while a connection is made.
const CONNECTION_BAD: c_int = 1;
/// libpq's `PGRES_COMMAND_OK` (a statement that returns no rows) and `PGRES_TUPLES_OK`.
const PGRES_COMMAND_OK: c_int = 1;
const PGRES_TUPLES_OK: c_int = 2;
/// libpq's `PostgresPollingStatusType` values.
const PGRES_POLLING_FAILED: c_int = 0;
const PGRES_POLLING_READING: c_int = 1;
const PGRES_POLLING_OK: c_int = 3;

/// libpq's `PQconninfoOption` (libpq-fe.h).
#[repr(C)]
struct ConninfoOption {
    keyword: *mut c_char,
    envvar: *mut c_char,
    compiled: *mut c_char,
    val: *mut c_char,
    label: *mut c_char,
    dispchar: *mut c_char,
    dispsize: c_int,
}

// The C signatures of the libpq functions used here (libpq-fe.h).
type ConnectStartParamsFn =
    unsafe extern "C" fn(*const *const c_char, *const *const c_char, c_int) -> *mut PgConn;
type ConnectPollFn = unsafe extern "C" fn(*mut PgConn) -> c_int;
type SetNoticeProcessorFn = unsafe extern "C" fn(
    *mut PgConn,
    Option<unsafe extern "C" fn(*mut c_void, *const c_char)>,
    *mut c_void,
) -> *mut c_void;
type ConninfoParseFn = unsafe extern "C" fn(*const c_char, *mut *mut c_char) -> *mut ConninfoOption;
type ConninfoFreeFn = unsafe extern "C" fn(*mut ConninfoOption);
type FreememFn = unsafe extern "C" fn(*mut c_void);
type StatusFn = unsafe extern "C" fn(*const PgConn) -> c_int;
type ErrorMessageFn = unsafe extern "C" fn(*const PgConn) -> *const c_char;
type FinishFn = unsafe extern "C" fn(*mut PgConn);
type SendQueryParamsFn = unsafe extern "C" fn(
    *mut PgConn,
    *const c_char,
    c_int,
    *const pg_sys::Oid,
    *const *const c_char,
    *const c_int,
    *const c_int,
    c_int,
) -> c_int;
type SocketFn = unsafe extern "C" fn(*const PgConn) -> c_int;
type ConsumeInputFn = unsafe extern "C" fn(*mut PgConn) -> c_int;
type IsBusyFn = unsafe extern "C" fn(*mut PgConn) -> c_int;
type GetResultFn = unsafe extern "C" fn(*mut PgConn) -> *mut PgResult;
type ResultStatusFn = unsafe extern "C" fn(*const PgResult) -> c_int;
type ResultErrorMessageFn = unsafe extern "C" fn(*const PgResult) -> *const c_char;
type NtuplesFn = unsafe extern "C" fn(*const PgResult) -> c_int;
type NfieldsFn = unsafe extern "C" fn(*const PgResult) -> c_int;
type GetValueFn = unsafe extern "C" fn(*const PgResult, c_int, c_int) -> *const c_char;
type GetIsNullFn = unsafe extern "C" fn(*const PgResult, c_int, c_int) -> c_int;
type ClearFn = unsafe extern "C" fn(*mut PgResult);

/// The libpq functions used here, resolved once per process.
struct Api {
    connect_start_params: ConnectStartParamsFn,
    connect_poll: ConnectPollFn,
    set_notice_processor: SetNoticeProcessorFn,
    conninfo_parse: ConninfoParseFn,
    conninfo_free: ConninfoFreeFn,
    freemem: FreememFn,
    status: StatusFn,
    error_message: ErrorMessageFn,
    finish: FinishFn,
    send_query_params: SendQueryParamsFn,
    socket: SocketFn,
    consume_input: ConsumeInputFn,
    is_busy: IsBusyFn,
    get_result: GetResultFn,
    result_status: ResultStatusFn,
    result_error_message: ResultErrorMessageFn,
    ntuples: NtuplesFn,
    nfields: NfieldsFn,
    get_value: GetValueFn,
    get_is_null: GetIsNullFn,
    clear: ClearFn,
}

fn api() -> Result<&'static Api, String> {
    static API: std::sync::OnceLock<Option<Api>> = std::sync::OnceLock::new();
    API.get_or_init(load)
        .as_ref()
        .ok_or_else(|| "libpq is not loaded in this server (pgseal reaches other nodes only where Citus is preloaded)".to_owned())
}

fn load() -> Option<Api> {
    // SAFETY: dlopen with RTLD_NOLOAD only returns a handle to a library already
    // loaded (never runs another copy's initialisers); the handle is kept for the
    // life of the process, so the symbols stay valid.
    let lib = unsafe {
        libc::dlopen(
            c"libpq.so.5".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_GLOBAL,
        )
    };
    if lib.is_null() {
        return None;
    }
    macro_rules! sym {
        ($name:literal, $ty:ty) => {{
            // SAFETY: looks up a libpq function by its documented name; the
            // pointer is transmuted to the C signature libpq declares for it
            // (libpq-fe.h), which is the field's type.
            let p = unsafe { libc::dlsym(lib, $name.as_ptr()) };
            if p.is_null() {
                return None;
            }
            // SAFETY: see above: p is that function, of that signature.
            unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
        }};
    }
    Some(Api {
        connect_start_params: sym!(c"PQconnectStartParams", ConnectStartParamsFn),
        connect_poll: sym!(c"PQconnectPoll", ConnectPollFn),
        set_notice_processor: sym!(c"PQsetNoticeProcessor", SetNoticeProcessorFn),
        conninfo_parse: sym!(c"PQconninfoParse", ConninfoParseFn),
        conninfo_free: sym!(c"PQconninfoFree", ConninfoFreeFn),
        freemem: sym!(c"PQfreemem", FreememFn),
        status: sym!(c"PQstatus", StatusFn),
        error_message: sym!(c"PQerrorMessage", ErrorMessageFn),
        finish: sym!(c"PQfinish", FinishFn),
        send_query_params: sym!(c"PQsendQueryParams", SendQueryParamsFn),
        socket: sym!(c"PQsocket", SocketFn),
        consume_input: sym!(c"PQconsumeInput", ConsumeInputFn),
        is_busy: sym!(c"PQisBusy", IsBusyFn),
        get_result: sym!(c"PQgetResult", GetResultFn),
        result_status: sym!(c"PQresultStatus", ResultStatusFn),
        result_error_message: sym!(c"PQresultErrorMessage", ResultErrorMessageFn),
        ntuples: sym!(c"PQntuples", NtuplesFn),
        nfields: sym!(c"PQnfields", NfieldsFn),
        get_value: sym!(c"PQgetvalue", GetValueFn),
        get_is_null: sym!(c"PQgetisnull", GetIsNullFn),
        clear: sym!(c"PQclear", ClearFn),
    })
}

/// The settings a connection string fragment (`citus.node_conninfo`, a
/// `pg_dist_authinfo` or `pg_dist_poolinfo` entry) gives, as libpq reads it, in
/// order. A malformed fragment is refused without libpq's message, which can quote
/// a piece of it (a password).
pub fn parse(fragment: &str) -> Result<Vec<(String, String)>, String> {
    let api = api()?;
    let c = CString::new(fragment).map_err(|_| "a connection setting with a NUL byte")?;
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: c outlives the call; libpq returns an array it allocated (ended by an
    // entry without keyword), freed below with PQconninfoFree, or NULL with an
    // error message it allocated, freed with PQfreemem.
    unsafe {
        let opts = (api.conninfo_parse)(c.as_ptr(), &mut err);
        if opts.is_null() {
            if !err.is_null() {
                (api.freemem)(err.cast());
            }
            return Err("a malformed connection setting".to_owned());
        }
        let mut out = Vec::new();
        let mut o = opts;
        while !(*o).keyword.is_null() {
            if !(*o).val.is_null() && *(*o).val != 0 {
                out.push((cstr((*o).keyword), cstr((*o).val)));
            }
            o = o.add(1);
        }
        (api.conninfo_free)(opts);
        Ok(out)
    }
}

/// An open connection; closed when dropped.
pub struct Conn {
    api: &'static Api,
    conn: *mut PgConn,
}

/// Drops what the server sends outside a result (notices, warnings, the message
/// of a server that shuts down): libpq's default would write it to the server's
/// standard error, past its logging settings.
unsafe extern "C" fn ignore_notice(_arg: *mut c_void, _message: *const c_char) {}

impl Conn {
    /// Connects with the settings `params` (keyword, value; a later keyword
    /// overrides an earlier one; they may hold a password, which is never part of
    /// a message), waiting on the latch and the socket for at most `deadline`.
    pub fn open(params: &[(String, String)], deadline: Duration) -> Result<Conn, String> {
        let api = api()?;
        let owned = params
            .iter()
            .map(|(k, v)| Ok((CString::new(k.as_str())?, CString::new(v.as_str())?)))
            .collect::<Result<Vec<_>, std::ffi::NulError>>()
            .map_err(|_| "a connection setting with a NUL byte")?;
        let mut keys: Vec<*const c_char> = owned.iter().map(|(k, _)| k.as_ptr()).collect();
        let mut values: Vec<*const c_char> = owned.iter().map(|(_, v)| v.as_ptr()).collect();
        keys.push(std::ptr::null());
        values.push(std::ptr::null());
        // SAFETY: both arrays end with NULL and, with the strings they point to,
        // outlive the call (libpq copies the values); expand_dbname 0 reads the
        // dbname as a name only.
        let conn = unsafe { (api.connect_start_params)(keys.as_ptr(), values.as_ptr(), 0) };
        if conn.is_null() {
            return Err("out of memory for a connection".to_owned());
        }
        let mut conn = Conn { api, conn };
        // SAFETY: the connection object is live; the processor is a plain function
        // that ignores its arguments.
        unsafe { (api.set_notice_processor)(conn.conn, Some(ignore_notice), std::ptr::null_mut()) };
        // SAFETY: as above.
        if unsafe { (api.status)(conn.conn) } == CONNECTION_BAD {
            return Err(format!("could not connect: {}", conn.error()));
        }
        let until = Instant::now() + deadline;
        // As libpq prescribes: after PQconnectStart, wait as if PQconnectPoll had
        // returned PGRES_POLLING_WRITING; poll only once the socket is ready (a
        // poll before it is would make libpq wait, blocking and untimed).
        let mut status = 2;
        loop {
            match status {
                PGRES_POLLING_OK => return Ok(conn),
                PGRES_POLLING_FAILED => return Err(format!("could not connect: {}", conn.error())),
                _ => {
                    let event = if status == PGRES_POLLING_READING {
                        pg_sys::WL_SOCKET_READABLE
                    } else {
                        pg_sys::WL_SOCKET_WRITEABLE
                    };
                    match conn.wait(event, until) {
                        Waited::Ready => {}
                        w => return Err(not_ready(w, "could not connect within the deadline")),
                    }
                }
            }
            // SAFETY: the connection is live and being made.
            status = unsafe { (api.connect_poll)(conn.conn) };
        }
    }

    /// Whether the connection is still open: reads what the server sent while it
    /// was idle, without blocking. A server that shut down sent a message and then
    /// ended the connection; libpq sees the end only on a read after the one that
    /// returned the message, so this reads until a read finds nothing (a few
    /// reads at most).
    pub fn alive(&mut self) -> bool {
        for _ in 0..4 {
            // SAFETY: the connection is live; PQconsumeInput reads without blocking
            // and returns 0 once the connection has failed or ended.
            if unsafe { (self.api.consume_input)(self.conn) } != 1 {
                return false;
            }
        }
        // SAFETY: as above.
        unsafe { (self.api.status)(self.conn) == CONNECTION_OK }
    }

    fn error(&self) -> String {
        // SAFETY: PQerrorMessage returns a string owned by the live connection.
        unsafe { cstr((self.api.error_message)(self.conn)) }
    }

    /// Runs `sql` with the text parameters `params` and returns its first row's
    /// columns (None for NULL), or None when it returned no row (or is a statement
    /// that returns none, such as `DO`). Waits for the
    /// answer until `deadline` has passed; past it the connection is of no further
    /// use (the caller drops it).
    pub fn query_row(
        &mut self,
        sql: &CStr,
        params: &[&str],
        deadline: Duration,
    ) -> Result<Option<Vec<Option<String>>>, String> {
        let owned = params
            .iter()
            .map(|p| CString::new(*p).map_err(|_| "a parameter with a NUL byte".to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        let ptrs: Vec<*const c_char> = owned.iter().map(|p| p.as_ptr()).collect();
        let n = c_int::try_from(ptrs.len()).map_err(|_| "too many parameters")?;
        // SAFETY: the statement and parameter strings are NUL-terminated and live
        // until the call returns (libpq copies them into its output buffer); NULL
        // types, lengths and formats mean text parameters of inferred type.
        let sent = unsafe {
            (self.api.send_query_params)(
                self.conn,
                sql.as_ptr(),
                n,
                std::ptr::null(),
                ptrs.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
            )
        };
        if sent != 1 {
            return Err(format!("could not send: {}", self.error()));
        }
        let until = Instant::now() + deadline;
        let mut row = None;
        let mut failure = None;
        loop {
            self.wait_readable(until)?;
            // SAFETY: the connection is live; PQgetResult returns NULL once the
            // command's results are all read, and each result is cleared here.
            let res = unsafe { (self.api.get_result)(self.conn) };
            if res.is_null() {
                break;
            }
            // SAFETY: res is a live result until PQclear below.
            unsafe {
                let status = (self.api.result_status)(res);
                if status == PGRES_COMMAND_OK {
                    // A statement that returns no rows: nothing to read.
                } else if status == PGRES_TUPLES_OK {
                    if (self.api.ntuples)(res) > 0 && row.is_none() {
                        let cols = (0..(self.api.nfields)(res))
                            .map(|i| {
                                ((self.api.get_is_null)(res, 0, i) == 0)
                                    .then(|| cstr((self.api.get_value)(res, 0, i)))
                            })
                            .collect::<Vec<_>>();
                        row = Some(cols);
                    }
                } else if failure.is_none() {
                    failure = Some(cstr((self.api.result_error_message)(res)));
                }
                (self.api.clear)(res);
            }
        }
        match failure {
            Some(f) => Err(f.trim_end().to_owned()),
            None => Ok(row),
        }
    }

    /// Waits until a result can be read without blocking, or fails at `until`.
    fn wait_readable(&mut self, until: Instant) -> Result<(), String> {
        loop {
            // SAFETY: the connection is live; PQconsumeInput reads what the socket
            // has without blocking, PQisBusy tells whether a result is complete.
            unsafe {
                if (self.api.consume_input)(self.conn) != 1 {
                    return Err(format!("the connection failed: {}", self.error()));
                }
                if (self.api.is_busy)(self.conn) == 0 {
                    return Ok(());
                }
            }
            match self.wait(pg_sys::WL_SOCKET_READABLE, until) {
                Waited::Ready => {}
                w => return Err(not_ready(w, "no answer within the deadline")),
            }
        }
    }

    /// Waits until the connection's socket has `event` (`Ready`), `until` has
    /// passed or the connection has no socket (`TimedOut`), or the process is asked
    /// to stop (`GaveUp`, `give_up_when`). A set latch is reset and, unless the
    /// process is stopping, the wait goes on (whoever set it is served by the
    /// caller's loop, which reads its queue again after any work); a postmaster
    /// death ends the process.
    fn wait(&mut self, event: u32, until: Instant) -> Waited {
        loop {
            if GIVE_UP.with(|g| g.get()).is_some_and(|stopping| stopping()) {
                return Waited::GaveUp;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Waited::TimedOut;
            }
            // SAFETY: waits on this process's latch and the connection's socket
            // (read again each time: libpq may open another while connecting).
            let happened = unsafe {
                let sock = (self.api.socket)(self.conn);
                if sock < 0 {
                    return Waited::TimedOut;
                }
                let happened = pg_sys::WaitLatchOrSocket(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET
                        | event
                        | pg_sys::WL_TIMEOUT
                        | pg_sys::WL_EXIT_ON_PM_DEATH) as c_int,
                    sock,
                    left.as_millis().clamp(1, 60_000) as std::ffi::c_long,
                    pg_sys::PG_WAIT_EXTENSION,
                ) as u32;
                if happened & pg_sys::WL_LATCH_SET != 0 {
                    pg_sys::ResetLatch(pg_sys::MyLatch);
                }
                happened
            };
            if happened & event != 0 {
                return Waited::Ready;
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: closes the connection this value owns, once.
        unsafe { (self.api.finish)(self.conn) }
    }
}

/// An owned copy of a C string libpq returned (empty for NULL).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller's promise.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
