//! The C ABI (`libublk.so`, `include/ublk.h`). Only this module has
//! `#[no_mangle]` functions, every one named `ublk_*`, every body inside
//! [`guard`] so no panic unwinds into C.
//!
//! Conventions: functions return 0 or a positive value on success and a
//! negative errno on failure (`ublk_strerror` names it); output parameters are
//! written only on success; a panic inside the engine returns
//! `-ENOTRECOVERABLE`.

#![allow(non_camel_case_types)]
// The `extern "C"` entry points take raw pointers from C and check them
// (NULL, handle magic) before use; marking them `unsafe fn` would change
// nothing for their C callers, who are the audience of their contracts
// (include/ublk.h), as in rustls-ffi.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod batch;
mod device;
mod io;
mod nbd;
mod route;

use crate::error::Error;
use once_cell::sync::Lazy;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use batch::*;
pub use device::*;
pub use io::*;
pub use nbd::*;
pub use route::{ublk_dev_map, ublk_dev_unmap, UBLK_MAP_READ, UBLK_MAP_WRITE};

/// Returned (negated) when the engine panicked inside a call (a bug in libublk).
pub(crate) const PANIC_ERRNO: c_int = libc::ENOTRECOVERABLE;

/// `ublk_io_op()` values (the kernel's UBLK_IO_OP_* numbers).
pub const UBLK_OP_READ: c_int = 0;
pub const UBLK_OP_WRITE: c_int = 1;
pub const UBLK_OP_FLUSH: c_int = 2;
pub const UBLK_OP_DISCARD: c_int = 3;
pub const UBLK_OP_WRITE_ZEROES: c_int = 5;
/// `ublk_io_flags()` bit: force unit access (the kernel's UBLK_IO_F_FUA).
pub const UBLK_FLAG_FUA: u32 = 8192;
/// `ublk_io_flags()` bit: WRITE_ZEROES must not deallocate (UBLK_IO_F_NOUNMAP).
pub const UBLK_FLAG_NOUNMAP: u32 = 32768;
/// Data modes: `ublk_dev_config.data_mode` (what to ask for) and
/// `ublk_dev_info.data_mode` (what the device runs in, never AUTO).
/// AUTO: the best the kernel offers (AUTO_BUF_REG, then REGISTER, then
/// USER_COPY, then COPY; COPY when `needs_buffer` is set).
pub const UBLK_DATA_AUTO: u32 = 0;
/// Zero copy: the kernel registers each request's buffer on the queue ring.
pub const UBLK_DATA_AUTO_BUF_REG: u32 = 1;
/// Zero copy: the engine registers a request's buffer when it is first leased.
pub const UBLK_DATA_REGISTER: u32 = 2;
/// Data moves by pread/pwrite on /dev/ublkcN (through a per-request bounce buffer).
pub const UBLK_DATA_USER_COPY: u32 = 3;
/// The kernel copies data into / out of a per-request buffer (`ublk_io_buf`).
pub const UBLK_DATA_COPY: u32 = 4;

/// Name of a UBLK_DATA_* value ("auto", "auto-buf-reg", "register",
/// "user-copy", "copy"; "unknown" otherwise): a static string. Any thread.
#[no_mangle]
pub extern "C" fn ublk_data_mode_name(mode: u32) -> *const c_char {
    let s: &'static CStr = match mode {
        UBLK_DATA_AUTO => c"auto",
        UBLK_DATA_AUTO_BUF_REG => c"auto-buf-reg",
        UBLK_DATA_REGISTER => c"register",
        UBLK_DATA_USER_COPY => c"user-copy",
        UBLK_DATA_COPY => c"copy",
        _ => c"unknown",
    };
    s.as_ptr()
}

pub(crate) fn data_mode_const(m: crate::DataMode) -> u32 {
    match m {
        crate::DataMode::AutoBufReg => UBLK_DATA_AUTO_BUF_REG,
        crate::DataMode::Register => UBLK_DATA_REGISTER,
        crate::DataMode::UserCopy => UBLK_DATA_USER_COPY,
        crate::DataMode::Copy => UBLK_DATA_COPY,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// Runs an entry point's body: panics become `-ENOTRECOVERABLE`, errors become
/// their negative errno (and the calling thread's detailed message).
pub(crate) fn guard(f: impl FnOnce() -> Result<c_int, Error>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_last_error(&e.to_string());
            e.neg_errno()
        }
        Err(_) => {
            set_last_error("internal error: libublk panicked (this is a bug)");
            -PANIC_ERRNO
        }
    }
}

/// Like [`guard`] for entry points that return a plain value: `default` on
/// error or panic.
pub(crate) fn guard_or<T>(default: T, f: impl FnOnce() -> Option<T>) -> T {
    catch_unwind(AssertUnwindSafe(f)).ok().flatten().unwrap_or(default)
}

pub(crate) fn null_err(what: &str) -> Error {
    Error::inval(format!("{what} is NULL"))
}

/// Reads an optional C string argument.
pub(crate) fn opt_str(p: *const c_char, what: &str) -> Result<Option<String>, Error> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller passes a NUL-terminated string (documented).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(|s| Some(s.to_string())).map_err(|_| Error::inval(format!("{what} is not UTF-8")))
}

static STRERROR: Lazy<parking_lot::Mutex<HashMap<c_int, &'static CStr>>> = Lazy::new(Default::default);

/// A static description of an error code: `"EINVAL: Invalid argument"`.
/// Accepts the negative values libublk returns (and positive errno values).
/// The string is owned by the library and valid for the life of the process.
/// Any thread.
#[no_mangle]
pub extern "C" fn ublk_strerror(err: c_int) -> *const c_char {
    guard_or(c"unknown error".as_ptr(), || {
        let e = err.checked_abs().unwrap_or(0);
        let mut map = STRERROR.lock();
        let s = map.entry(e).or_insert_with(|| {
            let text = match e {
                0 => "OK".to_string(),
                PANIC_ERRNO => "ENOTRECOVERABLE: internal error in libublk (a panic was caught)".to_string(),
                _ => format!("{}: {}", crate::errno_name(e), crate::strerror(e)),
            };
            // Leaked once per distinct code: a bounded set of static strings.
            Box::leak(CString::new(text).unwrap_or_default().into_boxed_c_str())
        });
        Some(s.as_ptr())
    })
}

/// Copies the detailed message of the last failed libublk call made by this
/// thread into `buf` (NUL-terminated, truncated to `len`). Returns the full
/// message length (excluding the NUL), 0 if there is none. The errno returned
/// by the failed call is the primary error channel; this adds context.
#[no_mangle]
pub extern "C" fn ublk_last_error_message(buf: *mut c_char, len: usize) -> c_int {
    guard(|| {
        LAST_ERROR.with(|l| {
            let l = l.borrow();
            let bytes = l.as_bytes();
            if !buf.is_null() && len > 0 {
                let n = bytes.len().min(len - 1);
                // SAFETY: the caller gives a writable buffer of `len` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, n);
                    *buf.add(n) = 0;
                }
            }
            Ok(bytes.len() as c_int)
        })
    })
}

/// Writes the running kernel's `UBLK_F_*` feature bits to `*out`.
/// Returns 0, or a negative errno (e.g. -ENOENT without ublk_drv, -EOPNOTSUPP
/// before Linux 6.5). Any thread.
#[no_mangle]
pub extern "C" fn ublk_features(out: *mut u64) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(null_err("out"));
        }
        let f = crate::kernel_features()?;
        // SAFETY: out is non-null and points to a u64 (documented).
        unsafe { *out = f };
        Ok(0)
    })
}

/// The name of one `UBLK_F_*` bit (`bit` = 0..63), e.g. "USER_COPY", or NULL for
/// a bit this library does not know. Static string. Any thread.
#[no_mangle]
pub extern "C" fn ublk_feature_name(bit: u32) -> *const c_char {
    static NAMES: Lazy<Vec<CString>> = Lazy::new(|| crate::sys::FEATURE_NAMES.iter().map(|(_, n)| CString::new(*n).unwrap_or_default()).collect());
    guard_or(std::ptr::null(), || NAMES.get(bit as usize).map(|c| c.as_ptr()))
}
