//! The object store, as the remote tier uses it: `object_store`'s S3 client
//! with its own retries kept short, and around each operation a retry loop
//! of ours with backoff and a deadline, and the errors sorted into what is
//! worth retrying and what is not.
//!
//! Not retried: refused credentials (401/403: the same request would be
//! refused again, so there is no retry storm), a missing bucket, a missing
//! object, a conditional put that lost. Retried until the deadline:
//! everything else (connection refused or reset, timeouts, 5xx, throttling).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig,
};

use crate::metrics::Metrics;
use crate::remote::config::{Credentials, RemoteConfig};
use crate::store::StoreError;

/// First wait between two attempts of one operation.
const BACKOFF_START: Duration = Duration::from_millis(200);
/// Longest wait between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Everything that can go wrong in the remote tier. Each variant names the
/// endpoint, the bucket or the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote {endpoint} (bucket {bucket}) refused the credentials for {op} {key}: {source}")]
    Refused {
        endpoint: String,
        bucket: String,
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("remote {endpoint}: bucket {bucket} does not exist ({op} {key})")]
    BucketMissing {
        endpoint: String,
        bucket: String,
        op: &'static str,
        key: String,
    },
    #[error(
        "remote {endpoint} (bucket {bucket}): {op} {key} still failing after {attempts} attempts in {elapsed_s:.1} s: {source}"
    )]
    Unavailable {
        endpoint: String,
        bucket: String,
        op: &'static str,
        key: String,
        attempts: u32,
        elapsed_s: f64,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("remote object {key} does not exist")]
    NotFound { key: String },
    #[error("remote object {key} already exists")]
    AlreadyExists { key: String },
    #[error("remote object {key} is not valid: {why}")]
    Corrupt { key: String, why: String },
    #[error("remote object {key} disagrees with ours: {why}")]
    Conflict { key: String, why: String },
    #[error("remote tier, the local snapshot: {0}")]
    Local(#[from] StoreError),
    /// The committed local file does not match its manifest: it is never
    /// uploaded (the object store never receives bytes the disk corrupted).
    #[error(
        "the local snapshot file {path} does not match its manifest ({why}); it is never uploaded"
    )]
    LocalCorrupt {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("remote tier, {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("remote tier: cannot build the object store client: {0}")]
    Client(String),
    #[error("remote tier: the daemon is stopping")]
    Stopping,
}

impl RemoteError {
    /// A fixed word for metrics and status (`gpusnap_remote_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            RemoteError::Refused { .. } => "refused",
            RemoteError::BucketMissing { .. } => "bucket_missing",
            RemoteError::Unavailable { .. } => "unavailable",
            RemoteError::NotFound { .. } => "not_found",
            RemoteError::AlreadyExists { .. } => "already_exists",
            RemoteError::Corrupt { .. } => "corrupt",
            RemoteError::Conflict { .. } => "conflict",
            RemoteError::Local(_) | RemoteError::Io { .. } => "local",
            RemoteError::LocalCorrupt { .. } => "local_corrupt",
            RemoteError::Client(_) => "client",
            RemoteError::Stopping => "stopping",
        }
    }

    /// Whether the object store itself is unusable as configured (every
    /// request would fail the same way until an operator acts).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            RemoteError::Refused { .. } | RemoteError::BucketMissing { .. }
        )
    }
}

/// Whether an error's text says the store refused the credentials (HTTP
/// 401 or 403, or one of S3's codes for it).
fn says_refused(text: &str) -> bool {
    const SIGNS: [&str; 7] = [
        "status 403",
        "status 401",
        "403 Forbidden",
        "401 Unauthorized",
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
    ];
    SIGNS.iter().any(|sign| text.contains(sign))
}

/// One bucket of one endpoint, with the tier's retry rules.
#[derive(Debug, Clone)]
pub struct Bucket {
    store: Arc<AmazonS3>,
    endpoint: String,
    bucket: String,
    retry_deadline: Duration,
    metrics: Option<Arc<Metrics>>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// How one failed attempt is treated.
enum Verdict {
    Final(RemoteError),
    Retry(object_store::Error),
}

impl Bucket {
    /// A client for `config`'s bucket signing with `credentials`. `stopping`
    /// flips to true when the daemon stops: retries end then.
    pub fn new(
        config: &RemoteConfig,
        credentials: &Credentials,
        metrics: Option<Arc<Metrics>>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Bucket, RemoteError> {
        // The allow_http flag lives in the client options, so it is set on
        // them (setting it on the builder first and then the options would
        // lose it).
        let options = ClientOptions::new()
            .with_allow_http(config.is_http())
            .with_timeout(config.request_timeout())
            .with_connect_timeout(Duration::from_secs(5).min(config.request_timeout()));
        // object_store's own retries stay short: the deadline is ours.
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: config.request_timeout(),
            ..RetryConfig::default()
        };
        let mut builder = AmazonS3Builder::new()
            .with_endpoint(&config.endpoint)
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(&credentials.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_client_options(options)
            .with_retry(retry);
        if let Some(token) = &credentials.session_token {
            builder = builder.with_token(token);
        }
        let store = builder
            .build()
            .map_err(|e| RemoteError::Client(e.to_string()))?;
        Ok(Bucket {
            store: Arc::new(store),
            endpoint: config.endpoint.clone(),
            bucket: config.bucket.clone(),
            retry_deadline: config.retry_deadline(),
            metrics,
            stopping,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn name(&self) -> &str {
        &self.bucket
    }

    /// The same bucket with another retry deadline (the operator's tool
    /// waits less than the daemon).
    pub fn with_retry_deadline(mut self, deadline: Duration) -> Bucket {
        self.retry_deadline = deadline;
        self
    }

    fn verdict(&self, op: &'static str, key: &ObjectPath, e: object_store::Error) -> Verdict {
        use object_store::Error as E;
        let key_s = key.to_string();
        let refused = |key: String, source: object_store::Error| {
            Verdict::Final(RemoteError::Refused {
                endpoint: self.endpoint.clone(),
                bucket: self.bucket.clone(),
                op,
                key,
                source: Box::new(source),
            })
        };
        match e {
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => refused(key_s, e),
            E::NotFound { .. } if e.to_string().contains("NoSuchBucket") => {
                Verdict::Final(self.bucket_missing(op, key_s))
            }
            E::NotFound { .. } => Verdict::Final(RemoteError::NotFound { key: key_s }),
            E::AlreadyExists { .. } | E::Precondition { .. } => {
                Verdict::Final(RemoteError::AlreadyExists { key: key_s })
            }
            E::Generic { .. } if e.to_string().contains("NoSuchBucket") => {
                Verdict::Final(self.bucket_missing(op, key_s))
            }
            // object_store says a refused LIST as a generic error: the
            // status and S3's code are in its text.
            E::Generic { .. } if says_refused(&e.to_string()) => refused(key_s, e),
            other => Verdict::Retry(other),
        }
    }

    fn bucket_missing(&self, op: &'static str, key: String) -> RemoteError {
        RemoteError::BucketMissing {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            op,
            key,
        }
    }

    fn record(&self, op: &'static str, outcome: Result<(), &RemoteError>) {
        let Some(m) = &self.metrics else { return };
        match outcome {
            Ok(()) => m.remote_up.set(1),
            Err(e) => {
                m.remote_errors_total
                    .with_label_values(&[op, e.kind()])
                    .inc();
                // A missing object or a lost race is an answer: the store
                // is up.
                let up = matches!(
                    e,
                    RemoteError::NotFound { .. } | RemoteError::AlreadyExists { .. }
                );
                m.remote_up.set(i64::from(up));
            }
        }
    }

    /// Runs `call` until it succeeds, fails for good, or the retry deadline
    /// passes (each wait between attempts doubles, up to 10 s).
    async fn retried<T, F, Fut>(
        &self,
        op: &'static str,
        key: &ObjectPath,
        mut call: F,
    ) -> Result<T, RemoteError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let started = Instant::now();
        let mut wait = BACKOFF_START;
        let mut attempts = 0u32;
        let mut stopping = self.stopping.clone();
        loop {
            attempts += 1;
            let error = match call().await {
                Ok(v) => {
                    self.record(op, Ok(()));
                    return Ok(v);
                }
                Err(e) => e,
            };
            let source = match self.verdict(op, key, error) {
                Verdict::Final(e) => {
                    self.record(op, Err(&e));
                    return Err(e);
                }
                Verdict::Retry(source) => source,
            };
            if started.elapsed() + wait > self.retry_deadline || *stopping.borrow() {
                let e = RemoteError::Unavailable {
                    endpoint: self.endpoint.clone(),
                    bucket: self.bucket.clone(),
                    op,
                    key: key.to_string(),
                    attempts,
                    elapsed_s: started.elapsed().as_secs_f64(),
                    source: Box::new(source),
                };
                self.record(op, Err(&e));
                return Err(e);
            }
            if let Some(m) = &self.metrics {
                m.remote_retries_total.with_label_values(&[op]).inc();
                m.remote_up.set(0);
            }
            tracing::debug!(op, key = %key, attempt = attempts, error = %source, wait_ms = wait.as_millis(), "remote request failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stopping.wait_for(|s| *s) => return Err(RemoteError::Stopping),
            }
            wait = (wait * 2).min(BACKOFF_MAX);
        }
    }

    /// The whole object at `key`, refused when longer than `len_max` (read
    /// with a HEAD first, so a huge object is never downloaded).
    pub async fn get_small(&self, key: &ObjectPath, len_max: u64) -> Result<Bytes, RemoteError> {
        let meta = self.head(key).await?;
        if meta.size > len_max {
            return Err(RemoteError::Corrupt {
                key: key.to_string(),
                why: format!("{} bytes, more than the {len_max} allowed", meta.size),
            });
        }
        let bytes = self
            .retried("get", key, || async {
                self.store
                    .get_opts(key, GetOptions::default())
                    .await?
                    .bytes()
                    .await
            })
            .await?;
        if u64::try_from(bytes.len()).ok().is_none_or(|n| n > len_max) {
            return Err(RemoteError::Corrupt {
                key: key.to_string(),
                why: format!("{} bytes, more than the {len_max} allowed", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Bytes `range` of the object at `key`, exactly that many.
    pub async fn get_range(
        &self,
        key: &ObjectPath,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, RemoteError> {
        let want = range.end - range.start;
        let bytes = self
            .retried("get_range", key, || async {
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(range.clone())),
                    ..GetOptions::default()
                };
                self.store.get_opts(key, opts).await?.bytes().await
            })
            .await?;
        if u64::try_from(bytes.len()).ok() != Some(want) {
            return Err(RemoteError::Corrupt {
                key: key.to_string(),
                why: format!(
                    "bytes {}..{} came back as {} bytes (the object is shorter than its manifest says)",
                    range.start,
                    range.end,
                    bytes.len()
                ),
            });
        }
        Ok(bytes)
    }

    pub async fn head(&self, key: &ObjectPath) -> Result<ObjectMeta, RemoteError> {
        self.retried("head", key, || self.store.head(key)).await
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &ObjectPath) -> Result<Option<ObjectMeta>, RemoteError> {
        match self.head(key).await {
            Ok(meta) => Ok(Some(meta)),
            Err(RemoteError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `bytes` at `key` only if no object is there
    /// ([`RemoteError::AlreadyExists`] otherwise). A create whose answer was
    /// lost and that is sent again finds its own object: callers read the
    /// object back and compare.
    pub async fn create(&self, key: &ObjectPath, bytes: Bytes) -> Result<(), RemoteError> {
        self.retried("create", key, || {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            self.store
                .put_opts(key, PutPayload::from(bytes.clone()), opts)
        })
        .await
        .map(drop)
    }

    /// Deletes the object at `key`; one already gone is not an error.
    pub async fn delete(&self, key: &ObjectPath) -> Result<(), RemoteError> {
        match self.retried("delete", key, || self.store.delete(key)).await {
            Ok(()) | Err(RemoteError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every object under `prefix` (recursively).
    pub async fn list(&self, prefix: &ObjectPath) -> Result<Vec<ObjectMeta>, RemoteError> {
        use futures::TryStreamExt;
        self.retried("list", prefix, || {
            self.store.list(Some(prefix)).try_collect::<Vec<_>>()
        })
        .await
    }

    /// The names one level below `prefix` (`None`: the bucket's top).
    pub async fn list_dirs(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> Result<Vec<ObjectPath>, RemoteError> {
        let shown = prefix.cloned().unwrap_or_default();
        self.retried("list", &shown, || self.store.list_with_delimiter(prefix))
            .await
            .map(|l| l.common_prefixes)
    }

    /// Starts a multipart upload to `key`; its id, for the journal.
    pub async fn create_multipart(&self, key: &ObjectPath) -> Result<String, RemoteError> {
        self.retried("create_multipart", key, || self.store.create_multipart(key))
            .await
    }

    pub async fn put_part(
        &self,
        key: &ObjectPath,
        upload: &str,
        index: usize,
        bytes: Bytes,
    ) -> Result<PartId, RemoteError> {
        let id = upload.to_owned();
        self.retried("put_part", key, || {
            self.store
                .put_part(key, &id, index, PutPayload::from(bytes.clone()))
        })
        .await
    }

    pub async fn complete_multipart(
        &self,
        key: &ObjectPath,
        upload: &str,
        parts: Vec<PartId>,
    ) -> Result<(), RemoteError> {
        let id = upload.to_owned();
        self.retried("complete_multipart", key, || {
            self.store.complete_multipart(key, &id, parts.clone())
        })
        .await
        .map(drop)
    }

    /// Aborts a multipart upload; one the server no longer knows is gone
    /// already.
    pub async fn abort_multipart(&self, key: &ObjectPath, upload: &str) -> Result<(), RemoteError> {
        let id = upload.to_owned();
        match self
            .retried("abort_multipart", key, || {
                self.store.abort_multipart(key, &id)
            })
            .await
        {
            Ok(()) | Err(RemoteError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::says_refused;

    #[test]
    fn a_refused_listing_is_told_from_a_server_error_by_its_text() {
        assert!(says_refused(
            "Generic S3 error: Error performing list request: Client error with status 403 Forbidden: <Code>SignatureDoesNotMatch</Code>"
        ));
        assert!(says_refused("... <Code>InvalidAccessKeyId</Code> ..."));
        assert!(!says_refused(
            "Generic S3 error: Error performing list request: Server error with status 503 Service Unavailable"
        ));
        assert!(!says_refused("connection refused (os error 111)"));
    }
}
