//! `[remote]`: the object store the daemon uploads committed snapshots to,
//! and the credentials it signs requests with.
//!
//! Credentials come from a file the daemon reads at start
//! (`credentials_file`, TOML with `access_key_id`, `secret_access_key` and
//! an optional `session_token`), or else from the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`). They
//! are never logged, never written into a manifest or a marker, and their
//! `Debug` shows only the key id's first four characters.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ByteSize;

/// Smallest part of a multipart upload S3 accepts (but the last).
pub const PART_BYTES_MIN: u64 = 5 << 20;
/// Largest part S3 accepts.
pub const PART_BYTES_MAX: u64 = 5 << 30;
/// Most parts of one multipart upload S3 accepts.
pub const PARTS_MAX: u64 = 10_000;
/// Most requests of one transfer in flight at once.
pub const CONCURRENCY_MAX: usize = 64;
/// Longest `retry_deadline_s`: a transfer that has failed for an hour is
/// reported and tried again on the next pass instead.
pub const RETRY_DEADLINE_MAX_S: u64 = 3600;

/// The `[remote]` table. Off unless `enabled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// Upload committed snapshots and restore from the object store.
    pub enabled: bool,
    /// The S3-compatible endpoint, `https://host[:port]` (`http://` for a
    /// server on a trusted network only: requests are signed but not
    /// encrypted).
    pub endpoint: String,
    /// The bucket; it must exist (the daemon never creates one).
    pub bucket: String,
    /// Key prefix of every object (`<prefix>/<job>/...`); may be empty.
    pub prefix: String,
    /// The signing region.
    pub region: String,
    /// A TOML file with `access_key_id`, `secret_access_key` and an optional
    /// `session_token`; unset reads the `AWS_*` environment variables.
    pub credentials_file: Option<PathBuf>,
    /// Requests of one upload or download in flight at once.
    pub concurrency: usize,
    /// Size of one part of a multipart upload (and of one ranged GET),
    /// rounded up to whole CRC chunks; 5 MiB to 5 GiB. Upload memory is at
    /// most `concurrency` parts (plus one CRC chunk each).
    pub part_bytes: ByteSize,
    /// Upload bandwidth, bytes per second across all uploads; 0: no cap.
    pub bandwidth_bytes_per_s: ByteSize,
    /// Complete steps kept per job in the object store; at least 1. The
    /// newest complete step is never deleted.
    pub keep_steps: usize,
    /// Longest one request may take before it is abandoned and retried.
    pub request_timeout_s: u64,
    /// How long one operation (a part, a manifest, a marker) is retried
    /// with backoff before the transfer is reported failed (and tried
    /// again on the uploader's next pass).
    pub retry_deadline_s: u64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            enabled: false,
            endpoint: String::new(),
            bucket: String::new(),
            prefix: "gpusnap".into(),
            region: "us-east-1".into(),
            credentials_file: None,
            concurrency: 8,
            part_bytes: ByteSize(16 << 20),
            bandwidth_bytes_per_s: ByteSize(0),
            keep_steps: 3,
            request_timeout_s: 60,
            retry_deadline_s: 300,
        }
    }
}

/// Every key of the table, as errors name them.
const REMOTE_KEYS: [&str; 13] = [
    "remote.enabled",
    "remote.endpoint",
    "remote.bucket",
    "remote.prefix",
    "remote.region",
    "remote.credentials_file",
    "remote.concurrency",
    "remote.part_bytes",
    "remote.bandwidth_bytes_per_s",
    "remote.keep_steps",
    "remote.request_timeout_s",
    "remote.retry_deadline_s",
    "remote",
];

/// Why the `[remote]` table cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {why}")]
pub struct RemoteConfigError {
    pub key: &'static str,
    pub why: String,
}

impl RemoteConfig {
    /// Checks every value (only when enabled: a disabled table's keys are
    /// not used); the error names the key.
    pub fn validate(&self) -> Result<(), RemoteConfigError> {
        if !self.enabled {
            return Ok(());
        }
        let bad = |key: &'static str, why: String| {
            Err(RemoteConfigError {
                key: REMOTE_KEYS
                    .iter()
                    .find(|k| k.strip_prefix("remote.") == Some(key))
                    .copied()
                    .unwrap_or("remote"),
                why,
            })
        };
        let Some(rest) = self
            .endpoint
            .strip_prefix("https://")
            .or_else(|| self.endpoint.strip_prefix("http://"))
        else {
            return bad(
                "endpoint",
                format!("{:?} is not an http:// or https:// URL", self.endpoint),
            );
        };
        if rest.is_empty() || rest.contains(char::is_whitespace) {
            return bad("endpoint", format!("{:?} names no host", self.endpoint));
        }
        if !valid_bucket(&self.bucket) {
            return bad(
                "bucket",
                format!(
                    "{:?} is not a bucket name (3-63 of a-z 0-9 '.' '-', starting and ending with a letter or digit)",
                    self.bucket
                ),
            );
        }
        if !valid_prefix(&self.prefix) {
            return bad(
                "prefix",
                format!(
                    "{:?} is not '/'-separated segments of A-Z a-z 0-9 '_' '-' '.' (no empty, '.' or '..' segment, no leading or trailing '/')",
                    self.prefix
                ),
            );
        }
        if self.region.is_empty() {
            return bad("region", "is empty".into());
        }
        if !(1..=CONCURRENCY_MAX).contains(&self.concurrency) {
            return bad(
                "concurrency",
                format!("{} is not in 1..={CONCURRENCY_MAX}", self.concurrency),
            );
        }
        if !(PART_BYTES_MIN..=PART_BYTES_MAX).contains(&self.part_bytes.0) {
            return bad(
                "part_bytes",
                format!(
                    "{} is not in {}..={}",
                    self.part_bytes,
                    ByteSize(PART_BYTES_MIN),
                    ByteSize(PART_BYTES_MAX)
                ),
            );
        }
        if self.keep_steps == 0 {
            return bad("keep_steps", "must be at least 1".into());
        }
        if self.request_timeout_s == 0 {
            return bad("request_timeout_s", "must be at least 1".into());
        }
        if !(1..=RETRY_DEADLINE_MAX_S).contains(&self.retry_deadline_s) {
            return bad(
                "retry_deadline_s",
                format!(
                    "{} is not in 1..={RETRY_DEADLINE_MAX_S}",
                    self.retry_deadline_s
                ),
            );
        }
        Ok(())
    }

    /// Whether requests go over plain HTTP.
    pub fn is_http(&self) -> bool {
        self.endpoint.starts_with("http://")
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_s)
    }

    pub fn retry_deadline(&self) -> Duration {
        Duration::from_secs(self.retry_deadline_s)
    }
}

/// S3's bucket naming rules (the common subset every S3-compatible server
/// accepts).
fn valid_bucket(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && !name.contains("..")
}

/// A key prefix of plain segments: nothing an object store would
/// normalize or a shell would need quoted.
fn valid_prefix(prefix: &str) -> bool {
    prefix.is_empty()
        || prefix.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        })
}

/// The environment variables read when no credentials file is named.
pub const ACCESS_KEY_ENV: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_KEY_ENV: &str = "AWS_SECRET_ACCESS_KEY";
pub const SESSION_TOKEN_ENV: &str = "AWS_SESSION_TOKEN";

/// Static credentials. `Debug` never shows the secret or the token.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.access_key_id.chars().take(4).collect();
        f.debug_struct("Credentials")
            .field("access_key_id", &format_args!("{shown}..."))
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Why no credentials could be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the credentials file {path} is not TOML with access_key_id, secret_access_key and an optional session_token: {why}"
    )]
    Parse { path: PathBuf, why: String },
    #[error("the credentials file {path} has an empty {key}")]
    Empty { path: PathBuf, key: &'static str },
    #[error(
        "no credentials: remote.credentials_file is not set and {ACCESS_KEY_ENV} / {SECRET_KEY_ENV} are not both in the environment"
    )]
    NotInEnvironment,
}

impl Credentials {
    /// From `file` when given, else from the environment (`env` looks a
    /// variable up: `std::env::var` in the daemon, a map in tests).
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, CredentialsError> {
        let Some(path) = file else {
            let non_empty = |k: &str| env(k).filter(|v| !v.is_empty());
            return match (non_empty(ACCESS_KEY_ENV), non_empty(SECRET_KEY_ENV)) {
                (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
                    access_key_id,
                    secret_access_key,
                    session_token: non_empty(SESSION_TOKEN_ENV),
                }),
                _ => Err(CredentialsError::NotInEnvironment),
            };
        };
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        warn_if_readable_by_others(path);
        // The parse error of the toml crate quotes the offending line,
        // which may be the secret: only its position is kept.
        let creds: Credentials = toml::from_str(&text).map_err(|e| CredentialsError::Parse {
            path: path.to_path_buf(),
            why: e.span().map_or("malformed".into(), |s| {
                format!("malformed at byte {}", s.start)
            }),
        })?;
        for (key, value) in [
            ("access_key_id", &creds.access_key_id),
            ("secret_access_key", &creds.secret_access_key),
        ] {
            if value.is_empty() {
                return Err(CredentialsError::Empty {
                    path: path.to_path_buf(),
                    key,
                });
            }
        }
        Ok(creds)
    }
}

/// A secret readable by other users is logged (not refused: the operator
/// may have reasons, such as a group the daemon shares with a vault agent).
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o007 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the remote credentials file is readable by every user; chmod 0600 it");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests unwrap known data")]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn enabled() -> RemoteConfig {
        RemoteConfig {
            enabled: true,
            endpoint: "http://127.0.0.1:8333".into(),
            bucket: "ckpt".into(),
            ..RemoteConfig::default()
        }
    }

    #[test]
    fn a_disabled_table_is_not_checked_and_an_enabled_one_is() {
        assert!(RemoteConfig::default().validate().is_ok());
        assert!(enabled().validate().is_ok());
        assert!(enabled().is_http());
        type Break = Box<dyn Fn(&mut RemoteConfig)>;
        let cases: Vec<(&str, Break)> = vec![
            (
                "endpoint",
                Box::new(|c| c.endpoint = "s3.example.com".into()),
            ),
            ("endpoint", Box::new(|c| c.endpoint = "https://".into())),
            ("bucket", Box::new(|c| c.bucket = "Ab".into())),
            ("bucket", Box::new(|c| c.bucket = "-abc".into())),
            ("prefix", Box::new(|c| c.prefix = "a//b".into())),
            ("prefix", Box::new(|c| c.prefix = "a/../b".into())),
            ("prefix", Box::new(|c| c.prefix = "/a".into())),
            ("region", Box::new(|c| c.region = String::new())),
            ("concurrency", Box::new(|c| c.concurrency = 0)),
            ("part_bytes", Box::new(|c| c.part_bytes = ByteSize(1 << 20))),
            ("keep_steps", Box::new(|c| c.keep_steps = 0)),
            ("request_timeout_s", Box::new(|c| c.request_timeout_s = 0)),
            ("retry_deadline_s", Box::new(|c| c.retry_deadline_s = 0)),
        ];
        for (key, change) in cases {
            let mut c = enabled();
            change(&mut c);
            let err = c.validate().unwrap_err();
            assert_eq!(err.key, format!("remote.{key}"), "{err}");
        }
        let mut c = enabled();
        c.prefix = String::new();
        assert!(c.validate().is_ok(), "an empty prefix puts jobs at the top");
        c.prefix = "team-a/gpusnap.v1".into();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn credentials_come_from_the_file_or_the_environment_and_never_show() {
        let env: HashMap<&str, &str> = [
            (ACCESS_KEY_ENV, "AKIAEXAMPLE"),
            (SECRET_KEY_ENV, "s3cr3t-value"),
        ]
        .into();
        let look = |k: &str| env.get(k).map(|v| (*v).to_owned());
        let creds = Credentials::load(None, look).unwrap();
        assert_eq!(creds.access_key_id, "AKIAEXAMPLE");
        assert_eq!(creds.session_token, None);
        let shown = format!("{creds:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("AKIAEXAMPLE"),
            "{shown}"
        );

        assert!(matches!(
            Credentials::load(None, |_| None),
            Err(CredentialsError::NotInEnvironment)
        ));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.toml");
        std::fs::write(
            &path,
            "access_key_id = \"id\"\nsecret_access_key = \"the-secret\"\nsession_token = \"tok\"\n",
        )
        .unwrap();
        let creds = Credentials::load(Some(&path), |_| None).unwrap();
        assert_eq!(creds.session_token.as_deref(), Some("tok"));

        std::fs::write(
            &path,
            "access_key_id = \"id\"\nsecret_access_key = the-secret\n",
        )
        .unwrap();
        let err = Credentials::load(Some(&path), |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("malformed") && !err.contains("the-secret"),
            "{err}"
        );

        std::fs::write(&path, "access_key_id = \"\"\nsecret_access_key = \"x\"\n").unwrap();
        assert!(matches!(
            Credentials::load(Some(&path), |_| None),
            Err(CredentialsError::Empty {
                key: "access_key_id",
                ..
            })
        ));
        let missing = dir.path().join("absent.toml");
        assert!(matches!(
            Credentials::load(Some(&missing), |_| None),
            Err(CredentialsError::Read { .. })
        ));
    }
}
