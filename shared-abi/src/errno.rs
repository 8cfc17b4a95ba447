//! Xen error numbers (`xen/include/public/errno.h`), returned negated from hypercalls.
//!
//! One enum so a caller can match on meaning; `as_ret()` gives the negative hypercall return.

use core::fmt;

macro_rules! xen_errors {
    ($($name:ident = $val:expr, $text:expr;)*) => {
        /// A Xen errno value (positive; hypercalls return it negated).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(i32)]
        pub enum XenError { $($name = $val,)* }

        impl XenError {
            /// Every known error, for tests and tables.
            pub const ALL: &'static [XenError] = &[$(XenError::$name,)*];

            /// The errno from a (positive) number, if Xen defines it.
            pub const fn from_errno(n: i32) -> Option<Self> {
                match n { $($val => Some(XenError::$name),)* _ => None }
            }

            /// The symbolic name Xen uses (also the xenstore wire error string).
            pub const fn name(self) -> &'static str {
                match self { $(XenError::$name => stringify!($name),)* }
            }

            /// A short human description.
            pub const fn description(self) -> &'static str {
                match self { $(XenError::$name => $text,)* }
            }
        }
    };
}

xen_errors! {
    EPERM = 1, "operation not permitted";
    ENOENT = 2, "no such file or directory";
    ESRCH = 3, "no such process";
    EINTR = 4, "interrupted system call";
    EIO = 5, "i/o error";
    ENXIO = 6, "no such device or address";
    E2BIG = 7, "argument list too long";
    ENOEXEC = 8, "exec format error";
    EBADF = 9, "bad file number";
    ECHILD = 10, "no child processes";
    EAGAIN = 11, "try again";
    ENOMEM = 12, "out of memory";
    EACCES = 13, "permission denied";
    EFAULT = 14, "bad address";
    EBUSY = 16, "device or resource busy";
    EEXIST = 17, "file exists";
    EXDEV = 18, "cross-device link";
    ENODEV = 19, "no such device";
    ENOTDIR = 20, "not a directory";
    EISDIR = 21, "is a directory";
    EINVAL = 22, "invalid argument";
    ENFILE = 23, "file table overflow";
    EMFILE = 24, "too many open files";
    ENOSPC = 28, "no space left on device";
    EROFS = 30, "read-only file system";
    EMLINK = 31, "too many links";
    EDOM = 33, "math argument out of domain of func";
    ERANGE = 34, "math result not representable";
    EDEADLK = 35, "resource deadlock would occur";
    ENAMETOOLONG = 36, "file name too long";
    ENOLCK = 37, "no record locks available";
    ENOSYS = 38, "function not implemented";
    ENOTEMPTY = 39, "directory not empty";
    ENODATA = 61, "no data available";
    ETIME = 62, "timer expired";
    EBADMSG = 74, "not a data message";
    EOVERFLOW = 75, "value too large for defined data type";
    EILSEQ = 84, "illegal byte sequence";
    ERESTART = 85, "interrupted system call should be restarted";
    ENOTSOCK = 88, "socket operation on non-socket";
    EMSGSIZE = 90, "message too large";
    EOPNOTSUPP = 95, "operation not supported on transport endpoint";
    EADDRINUSE = 98, "address already in use";
    EADDRNOTAVAIL = 99, "cannot assign requested address";
    ENOBUFS = 105, "no buffer space available";
    EISCONN = 106, "transport endpoint is already connected";
    ENOTCONN = 107, "transport endpoint is not connected";
    ETIMEDOUT = 110, "connection timed out";
    ECONNREFUSED = 111, "connection refused";
}

impl XenError {
    /// The positive errno number.
    pub const fn errno(self) -> i32 {
        self as i32
    }

    /// The value a hypercall returns in RAX for this error.
    pub const fn as_ret(self) -> i64 {
        -(self as i64)
    }

    /// Decode a hypercall return: `Ok(value)` for non-negative, the error otherwise.
    /// An unknown negative value is reported as `EINVAL` rather than lost.
    pub const fn from_ret(ret: i64) -> Result<u64, XenError> {
        if ret >= 0 {
            Ok(ret as u64)
        } else if ret < -(i32::MAX as i64) {
            Err(XenError::EINVAL)
        } else {
            match XenError::from_errno(-ret as i32) {
                Some(e) => Err(e),
                None => Err(XenError::EINVAL),
            }
        }
    }

    /// Look an error up by its symbolic name (xenstore error replies carry names).
    pub fn from_name(name: &str) -> Option<Self> {
        XenError::ALL.iter().copied().find(|e| e.name() == name)
    }
}

impl fmt::Display for XenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.description())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_numbers_match_xen_header() {
        assert_eq!(XenError::EPERM.errno(), 1);
        assert_eq!(XenError::EAGAIN.errno(), 11);
        assert_eq!(XenError::EINVAL.errno(), 22);
        assert_eq!(XenError::ENOSYS.errno(), 38);
        assert_eq!(XenError::ENOTEMPTY.errno(), 39);
        assert_eq!(XenError::ECONNREFUSED.errno(), 111);
    }

    #[test]
    fn ret_round_trips_every_error() {
        for &e in XenError::ALL {
            assert_eq!(XenError::from_ret(e.as_ret()), Err(e));
            assert_eq!(XenError::from_name(e.name()), Some(e));
        }
        assert_eq!(XenError::from_ret(5), Ok(5));
    }

    #[test]
    fn from_ret_unknown_or_extreme_is_einval_not_panic() {
        assert_eq!(XenError::from_ret(-12345), Err(XenError::EINVAL));
        assert_eq!(XenError::from_ret(i64::MIN), Err(XenError::EINVAL));
    }
}
