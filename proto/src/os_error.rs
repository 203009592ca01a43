//! The operating system's error behind a failure, as a typed value on the
//! wire: `"ENOSPC"`, `"EIO"`, `"EDQUOT"`... for the errors a snapshot or a
//! restore meets, the bare number for any other.
//!
//! Numbers are Linux's (the daemon runs on Linux); both sides compare
//! values, never message text.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An errno value, as reported by the daemon.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OsError(i32);

macro_rules! known_errors {
    ($($name:ident = $code:expr),* $(,)?) => {
        impl OsError {
            $(pub const $name: OsError = OsError($code);)*

            /// The symbolic name (`"ENOSPC"`), for the errors listed here.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($code => Some(stringify!($name)),)*
                    _ => None,
                }
            }

            fn from_name(name: &str) -> Option<OsError> {
                match name {
                    $(stringify!($name) => Some(OsError::$name),)*
                    _ => None,
                }
            }
        }
    };
}

known_errors! {
    EPERM = 1,
    ENOENT = 2,
    EINTR = 4,
    EIO = 5,
    ENXIO = 6,
    EBADF = 9,
    EAGAIN = 11,
    ENOMEM = 12,
    EACCES = 13,
    EBUSY = 16,
    EEXIST = 17,
    EXDEV = 18,
    ENODEV = 19,
    ENOTDIR = 20,
    EISDIR = 21,
    EINVAL = 22,
    ENFILE = 23,
    EMFILE = 24,
    EFBIG = 27,
    ENOSPC = 28,
    EROFS = 30,
    EMLINK = 31,
    EPIPE = 32,
    ENAMETOOLONG = 36,
    ENOSYS = 38,
    ENOTEMPTY = 39,
    ELOOP = 40,
    EOVERFLOW = 75,
    EOPNOTSUPP = 95,
    ECONNRESET = 104,
    ETIMEDOUT = 110,
    ESTALE = 116,
    EDQUOT = 122,
    ECANCELED = 125,
}

impl OsError {
    /// The error of raw errno `code` (what `std::io::Error::raw_os_error`
    /// returns).
    pub const fn from_raw(code: i32) -> OsError {
        OsError(code)
    }

    /// The raw errno.
    pub const fn raw(self) -> i32 {
        self.0
    }
}

impl fmt::Debug for OsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for OsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "errno {}", self.0),
        }
    }
}

impl Serialize for OsError {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.name() {
            Some(name) => s.serialize_str(name),
            None => s.serialize_i32(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for OsError {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<OsError, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Name(String),
            Code(i32),
        }
        match Wire::deserialize(d)? {
            Wire::Code(code) => Ok(OsError(code)),
            Wire::Name(name) => OsError::from_name(&name)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown OS error name {name:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_errors_travel_by_name_and_others_by_number() {
        let json = serde_json::to_string(&OsError::ENOSPC).expect("serialize");
        assert_eq!(json, r#""ENOSPC""#);
        assert_eq!(
            serde_json::from_str::<OsError>(&json).expect("parse"),
            OsError::from_raw(28)
        );
        let odd = OsError::from_raw(133);
        assert_eq!(serde_json::to_string(&odd).expect("serialize"), "133");
        assert_eq!(serde_json::from_str::<OsError>("133").expect("parse"), odd);
        assert!(serde_json::from_str::<OsError>(r#""ENOPE""#).is_err());
        assert_eq!(OsError::EDQUOT.to_string(), "EDQUOT");
        assert_eq!(odd.to_string(), "errno 133");
    }
}
