//! Errors: a negative-errno style code plus a human message.

use std::fmt;

/// An engine error: an errno value (positive, e.g. `libc::EINVAL`) and what failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    errno: i32,
    msg: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// `errno` may be given positive or negative; it is stored positive.
    pub fn new(errno: i32, msg: impl Into<String>) -> Self {
        Error { errno: errno.abs(), msg: msg.into() }
    }

    /// An EINVAL error, the usual answer to bad arguments.
    pub fn inval(msg: impl Into<String>) -> Self {
        Error::new(libc::EINVAL, msg)
    }

    /// Wraps the last OS error (`errno`) with a message saying what was attempted.
    pub fn last_os(what: impl Into<String>) -> Self {
        Error::from_io(std::io::Error::last_os_error(), what)
    }

    pub fn from_io(e: std::io::Error, what: impl Into<String>) -> Self {
        Error::new(e.raw_os_error().unwrap_or(libc::EIO), what)
    }

    /// The positive errno value.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The negative errno value, ready to be an IO result or a C return code.
    pub fn neg_errno(&self) -> i32 {
        -self.errno
    }

    pub fn message(&self) -> &str {
        &self.msg
    }

    /// Prefixes the message with more context.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error { errno: self.errno, msg: format!("{what}: {}", self.msg) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.msg, errno_name(self.errno), strerror(self.errno))
    }
}

impl std::error::Error for Error {}

/// The text of an errno value (`strerror`).
pub fn strerror(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno.abs()).to_string().split(" (os error").next().unwrap_or("").to_string()
}

/// The symbolic name of an errno value (`EINVAL`), or `E<number>`.
pub fn errno_name(errno: i32) -> String {
    let e = errno.abs();
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOTTY => "ENOTTY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EPIPE => "EPIPE",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECANCELED => "ECANCELED",
        libc::EALREADY => "EALREADY",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ENOTCONN => "ENOTCONN",
        libc::EPROTO => "EPROTO",
        libc::EBADMSG => "EBADMSG",
        libc::ESTALE => "ESTALE",
        libc::EDEADLK => "EDEADLK",
        libc::ENOTRECOVERABLE => "ENOTRECOVERABLE",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EMSGSIZE => "EMSGSIZE",
        _ => return format!("E{e}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_name_and_text() {
        let e = Error::new(-libc::EINVAL, "ADD_DEV refused");
        assert_eq!(e.errno(), libc::EINVAL);
        assert_eq!(e.neg_errno(), -libc::EINVAL);
        let s = e.to_string();
        assert!(s.starts_with("ADD_DEV refused: EINVAL (Invalid argument)"), "{s}");
        assert_eq!(errno_name(9999), "E9999");
        assert_eq!(errno_name(libc::ESTALE), "ESTALE");
        assert_eq!(strerror(libc::ENODEV), "No such device");
    }
}
