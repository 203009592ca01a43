//! A real S3-compatible server for the remote-tier tests: SeaweedFS's
//! `weed server -s3` (installed by `tests/seaweedfs-install`, once per
//! process) on loopback ports in a scratch directory, with one admin
//! identity, the bucket [`S3Server::BUCKET`], and a small blocking S3
//! client (object_store on a current-thread runtime) to look at what the
//! daemon wrote.
//!
//! Nothing is left running: the server runs in its own process group, and
//! [`S3Server::kill`] and `Drop` SIGKILL that group and reap it (SIGTERM
//! takes `weed` 16 to 27 s, so it is never used).

use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use object_store::aws::{AmazonS3, AmazonS3Builder, AwsAuthorizer, AwsCredential};
use object_store::client::{HttpConnector, HttpRequest, HttpRequestBody, ReqwestConnector};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use crate::endpoints::free_port;

/// The signing region (SeaweedFS accepts any; the daemon's default).
const REGION: &str = "us-east-1";
/// The admin identity's keys (a loopback server that lives for one test).
const ACCESS_KEY: &str = "gpusnaptestadmin";
const SECRET_KEY: &str = "gpusnap-test-secret-key";
/// What [`S3Server::wrong_credentials_file`] puts in place of the secret.
const WRONG_SECRET_KEY: &str = "gpusnap-test-wrong-secret";
/// The readiness probe's key (deleted again once it answered).
const PROBE_KEY: &str = "gpusnap-testkit-probe";
/// The longest wait for a started server to take a PUT and a GET.
const READY_WAIT: Duration = Duration::from_secs(60);
/// The longest wait for a SIGKILLed server to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);
/// Lines of the log an error message carries.
const LOG_TAIL_LINES: usize = 40;
/// Starts with fresh ports when `weed` exits at once (a port taken by
/// someone else between [`free_port`] and its bind).
const START_ATTEMPTS: usize = 3;
/// One request of the test client, at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the server could not be installed, started, killed or asked.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("installing SeaweedFS with {}: {detail}", script.display())]
    Install { script: PathBuf, detail: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("finding free loopback ports for weed: {0}")]
    Port(#[source] std::io::Error),
    #[error("starting {}: {source}", weed.display())]
    Spawn {
        weed: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("weed exited at start ({status}); its log:\n{log}")]
    ExitedAtStart { status: ExitStatus, log: String },
    #[error(
        "weed did not answer a PUT and a GET on {endpoint} within {} s (killed); last error: {last}; its log:\n{log}",
        wait.as_secs()
    )]
    NotReady {
        endpoint: String,
        wait: Duration,
        last: String,
        log: String,
    },
    #[error("weed (pid {pid}) was not reaped within {limit:?} of SIGKILL")]
    NotReaped { pid: u32, limit: Duration },
    #[error("weed is not running")]
    NotRunning,
    #[error("weed is already running (pid {pid})")]
    AlreadyRunning { pid: u32 },
    #[error("signalling or waiting for weed (pid {pid}): {source}")]
    Wait {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("making the S3 client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("S3 client for {endpoint}: {source}")]
    Client {
        endpoint: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{key:?} is not an object key: {source}")]
    Key {
        key: String,
        #[source]
        source: object_store::path::Error,
    },
    #[error("S3 {op} {key:?}: {source}")]
    Request {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("creating bucket {name:?}: {detail}")]
    CreateBucket { name: String, detail: String },
}

/// The loopback ports one server listens on (kept across restarts).
#[derive(Debug, Clone, Copy)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
}

impl Ports {
    /// Eight distinct ports that were free a moment ago.
    fn free() -> std::io::Result<Ports> {
        let mut seen = BTreeSet::new();
        let mut next = || -> std::io::Result<u16> {
            loop {
                let port = free_port()?;
                if seen.insert(port) {
                    return Ok(port);
                }
            }
        };
        Ok(Ports {
            master: next()?,
            master_grpc: next()?,
            volume: next()?,
            volume_grpc: next()?,
            filer: next()?,
            filer_grpc: next()?,
            s3: next()?,
            s3_grpc: next()?,
        })
    }

    /// The Unix sockets `weed` makes in /tmp next to these ports (it has
    /// no flag for the gRPC ones); removed once the server is gone.
    fn tmp_sockets(&self) -> Vec<PathBuf> {
        [
            format!("seaweedfs-master-grpc-{}.sock", self.master_grpc),
            format!("seaweedfs-volume-grpc-{}.sock", self.volume_grpc),
            format!("seaweedfs-filer-{}.sock", self.filer),
            format!("seaweedfs-filer-grpc-{}.sock", self.filer_grpc),
            format!("seaweedfs-s3-{}.sock", self.s3),
            format!("seaweedfs-s3-grpc-{}.sock", self.s3_grpc),
        ]
        .into_iter()
        .map(|name| Path::new("/tmp").join(name))
        .collect()
    }
}

/// One `weed server -s3` in one scratch directory, running or killed.
#[derive(Debug)]
pub struct S3Server {
    /// First: `Drop` kills it before anything else goes.
    child: Option<Child>,
    weed: PathBuf,
    data_dir: PathBuf,
    s3_config: PathBuf,
    log_path: PathBuf,
    credentials_file: PathBuf,
    wrong_credentials_file: PathBuf,
    ports: Ports,
    store: AmazonS3,
    http: object_store::client::HttpClient,
    runtime: tokio::runtime::Runtime,
}

impl S3Server {
    /// The bucket every server has from the start.
    pub const BUCKET: &'static str = "gpusnap-test";

    /// Installs weed if needed, starts `weed server -s3` on loopback with
    /// free ports in `dir` (data + log + s3 identities file), creates the
    /// bucket [`S3Server::BUCKET`] and waits until a PUT+GET round trip of a
    /// probe object works.
    pub fn start(dir: &Path) -> Result<S3Server, S3Error> {
        let weed = installed_weed()?;
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| S3Error::Io { what, path, source }
        };
        let data_dir = dir.join("seaweedfs-data");
        std::fs::create_dir_all(&data_dir).map_err(io("creating", &data_dir))?;
        let s3_config = dir.join("seaweedfs-s3.json");
        std::fs::write(&s3_config, identities_json()).map_err(io("writing", &s3_config))?;
        let credentials_file = dir.join("s3-credentials.toml");
        std::fs::write(&credentials_file, credentials_toml(ACCESS_KEY, SECRET_KEY))
            .map_err(io("writing", &credentials_file))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports = Ports::free().map_err(S3Error::Port)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(S3Error::Runtime)?;
            let endpoint = endpoint(ports.s3);
            let client_error = |source| S3Error::Client {
                endpoint: endpoint.clone(),
                source,
            };
            let store = store(&endpoint).map_err(client_error)?;
            let http = ReqwestConnector::default()
                .connect(&client_options())
                .map_err(client_error)?;
            let mut server = S3Server {
                child: None,
                weed: weed.clone(),
                data_dir: data_dir.clone(),
                s3_config: s3_config.clone(),
                log_path: dir.join("seaweedfs.log"),
                credentials_file: credentials_file.clone(),
                wrong_credentials_file: dir.join("s3-credentials-wrong.toml"),
                ports,
                store,
                http,
                runtime,
            };
            match server.spawn(true) {
                Ok(()) => return Ok(server),
                Err(S3Error::ExitedAtStart { .. }) if attempt < START_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// `http://127.0.0.1:<s3 port>`.
    pub fn endpoint(&self) -> String {
        endpoint(self.ports.s3)
    }

    /// The identity with admin rights on every bucket.
    pub fn access_key(&self) -> &str {
        ACCESS_KEY
    }

    pub fn secret_key(&self) -> &str {
        SECRET_KEY
    }

    /// A TOML file (in the server's directory) with `access_key_id` and
    /// `secret_access_key`: what the daemon's `[remote] credentials_file`
    /// reads.
    pub fn credentials_file(&self) -> &Path {
        &self.credentials_file
    }

    /// Writes another credentials file with a wrong secret (same key id)
    /// and returns its path (for the wrong-credentials test). Panics when
    /// the file cannot be written.
    pub fn wrong_credentials_file(&self) -> PathBuf {
        let path = &self.wrong_credentials_file;
        std::fs::write(path, credentials_toml(ACCESS_KEY, WRONG_SECRET_KEY))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.clone()
    }

    /// The `[remote]` table for a daemon config using this server, as
    /// (key, TOML value text) pairs, with short test timings.
    pub fn remote_settings(&self, prefix: &str) -> Vec<(&'static str, String)> {
        let text = |s: &str| toml::Value::String(s.to_owned()).to_string();
        vec![
            ("enabled", "true".to_owned()),
            ("endpoint", text(&self.endpoint())),
            ("bucket", text(Self::BUCKET)),
            ("prefix", text(prefix)),
            ("region", text(REGION)),
            (
                "credentials_file",
                text(&self.credentials_file.to_string_lossy()),
            ),
            ("request_timeout_s", "5".to_owned()),
            ("retry_deadline_s", "30".to_owned()),
            ("part_bytes", (5u64 << 20).to_string()),
            ("concurrency", "4".to_owned()),
        ]
    }

    /// SIGKILL (the whole process group) and reap. A server not reaped
    /// within the kill wait stays here (`Drop` tries again) and is an error.
    pub fn kill(&mut self) -> Result<(), S3Error> {
        let mut child = self.child.take().ok_or(S3Error::NotRunning)?;
        let pid = child.id();
        let wait_error = |source| S3Error::Wait { pid, source };
        kill_group(&child).map_err(wait_error)?;
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            if child.try_wait().map_err(wait_error)?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.child = Some(child);
                return Err(S3Error::NotReaped {
                    pid,
                    limit: KILL_WAIT,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Starts the server again after [`S3Server::kill`]: same ports, same
    /// data directory (the objects are kept); waits for readiness again.
    pub fn restart(&mut self) -> Result<(), S3Error> {
        self.spawn(false)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Where weed's stdout and stderr go (appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of weed's log (a log that cannot be read says
    /// why).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = match std::fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return format!("(cannot read {}: {e})", self.log_path.display()),
        };
        let all: Vec<&str> = log.lines().collect();
        all.get(all.len().saturating_sub(lines)..)
            .unwrap_or_default()
            .join("\n")
    }

    /// Every key in [`S3Server::BUCKET`] that starts with `prefix` (a plain
    /// string prefix, not only whole `/` segments), all pages, sorted.
    pub fn list_keys(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        // object_store lists whole segments (`dir/`): list the directory
        // the prefix is in and filter.
        let dir = match prefix.rfind('/') {
            Some(end) if !prefix[..end].is_empty() => Some(object_path(&prefix[..end])?),
            _ => None,
        };
        let request = |source| S3Error::Request {
            op: "LIST",
            key: prefix.to_owned(),
            source,
        };
        let objects: Vec<_> = self
            .runtime
            .block_on(self.store.list(dir.as_ref()).try_collect())
            .map_err(request)?;
        let mut keys: Vec<String> = objects
            .into_iter()
            .map(|meta| meta.location.to_string())
            .filter(|key| key.starts_with(prefix))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// An object's bytes.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, S3Error> {
        let path = object_path(key)?;
        let request = |source| S3Error::Request {
            op: "GET",
            key: key.to_owned(),
            source,
        };
        let bytes = self
            .runtime
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .map_err(request)?;
        Ok(bytes.to_vec())
    }

    /// Writes (or overwrites) an object.
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<(), S3Error> {
        let path = object_path(key)?;
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(bytes.to_vec())))
            .map_err(|source| S3Error::Request {
                op: "PUT",
                key: key.to_owned(),
                source,
            })?;
        Ok(())
    }

    /// Deletes an object (a missing one is no error, as in S3).
    pub fn delete(&self, key: &str) -> Result<(), S3Error> {
        let path = object_path(key)?;
        self.runtime
            .block_on(self.store.delete(&path))
            .map_err(|source| S3Error::Request {
                op: "DELETE",
                key: key.to_owned(),
                source,
            })
    }

    /// Creates a bucket (one this identity already owns is no error).
    ///
    /// object_store cannot create buckets, so this sends the S3
    /// CreateBucket request itself (`PUT /<bucket>`, path style), signed
    /// with object_store's public SigV4 signer ([`AwsAuthorizer`]) and sent
    /// through its HTTP client: no `weed shell` process (which also needs
    /// the master's gRPC port spelled `host:port.grpc`), and the request
    /// goes through the same S3 gateway and authentication the daemon
    /// uses.
    pub fn create_bucket(&self, name: &str) -> Result<(), S3Error> {
        let failed = |detail: String| S3Error::CreateBucket {
            name: name.to_owned(),
            detail,
        };
        let url = format!("{}/{name}", self.endpoint());
        let mut request = HttpRequest::new(HttpRequestBody::empty());
        *request.method_mut() = "PUT".parse().map_err(|e| failed(format!("method: {e}")))?;
        *request.uri_mut() = url.parse().map_err(|e| failed(format!("URL {url}: {e}")))?;
        let credential = AwsCredential {
            key_id: ACCESS_KEY.to_owned(),
            secret_key: SECRET_KEY.to_owned(),
            token: None,
        };
        AwsAuthorizer::new(&credential, "s3", REGION)
            .try_authorize(&mut request, None)
            .map_err(|e| failed(format!("signing: {e}")))?;
        let (status, body) = self
            .runtime
            .block_on(async {
                let response = self.http.execute(request).await?;
                let status = response.status().as_u16();
                let body = response.into_body().bytes().await?;
                Ok::<_, object_store::client::HttpError>((status, body))
            })
            .map_err(|e| failed(format!("PUT {url}: {e}")))?;
        let body = String::from_utf8_lossy(&body);
        if (200..300).contains(&status) || body.contains("BucketAlreadyOwnedByYou") {
            return Ok(());
        }
        Err(failed(format!("PUT {url}: status {status}: {body}")))
    }

    /// Starts weed on this server's ports and waits until it takes a PUT
    /// and a GET (creating [`S3Server::BUCKET`] first when `create`).
    fn spawn(&mut self, create: bool) -> Result<(), S3Error> {
        if let Some(child) = &self.child {
            return Err(S3Error::AlreadyRunning { pid: child.id() });
        }
        let started = Instant::now();
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| S3Error::Io { what, path, source }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io("opening", &self.log_path))?;
        let log_err = log.try_clone().map_err(io("opening", &self.log_path))?;
        let p = self.ports;
        let mut command = Command::new(&self.weed);
        command
            .arg("server")
            .arg("-s3")
            .arg(flag("dir", self.data_dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(flag("master.port", p.master))
            .arg(flag("master.port.grpc", p.master_grpc))
            .arg(flag("volume.port", p.volume))
            .arg(flag("volume.port.grpc", p.volume_grpc))
            .arg(flag("filer.port", p.filer))
            .arg(flag("filer.port.grpc", p.filer_grpc))
            .arg(flag("s3.port", p.s3))
            .arg(flag("s3.port.grpc", p.s3_grpc))
            .arg(flag("s3.config", self.s3_config.display()))
            .args([
                // No Iceberg and Lance listeners on fixed ports.
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                // Like S3: a PUT into a missing bucket fails.
                "-s3.autoCreateBucket=false",
                "-master.electionTimeout=1s",
                "-master.telemetry=false",
                // Small volumes, never preallocated; 64 x 128 MiB at most.
                "-master.volumeSizeLimitMB=128",
                "-volume.max=64",
                "-volume.preStopSeconds=0",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group, so that a kill takes everything.
            .process_group(0);
        let child = command.spawn().map_err(|source| S3Error::Spawn {
            weed: self.weed.clone(),
            source,
        })?;
        let pid = child.id();
        self.child = Some(child);

        let deadline = started + READY_WAIT;
        let mut bucket_made = !create;
        let mut last = String::from("nothing tried yet");
        loop {
            let exited = self
                .child
                .as_mut()
                .map(Child::try_wait)
                .transpose()
                .map_err(|source| S3Error::Wait { pid, source })?
                .flatten();
            if let Some(status) = exited {
                self.child = None;
                return Err(S3Error::ExitedAtStart {
                    status,
                    log: self.log_tail(LOG_TAIL_LINES),
                });
            }
            if !bucket_made {
                match self.create_bucket(Self::BUCKET) {
                    Ok(()) => bucket_made = true,
                    Err(e) => last = e.to_string(),
                }
            }
            if bucket_made {
                match self.probe() {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                self.kill()?;
                return Err(S3Error::NotReady {
                    endpoint: self.endpoint(),
                    wait: READY_WAIT,
                    last,
                    log: self.log_tail(LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// A PUT and a GET of the probe object (GETs answer 500 for a while
    /// after the port opens), then its DELETE, so the bucket lists clean.
    fn probe(&self) -> Result<(), S3Error> {
        let bytes = format!("probe {:?}", Instant::now()).into_bytes();
        self.put(PROBE_KEY, &bytes)?;
        let back = self.get(PROBE_KEY)?;
        if back != bytes {
            return Err(S3Error::Request {
                op: "GET",
                key: PROBE_KEY.to_owned(),
                source: object_store::Error::Generic {
                    store: "S3",
                    source: format!(
                        "read back {} bytes, not the {} put",
                        back.len(),
                        bytes.len()
                    )
                    .into(),
                },
            });
        }
        self.delete(PROBE_KEY)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.kill()
        {
            eprintln!("gpusnapd-testkit: {e}");
            return;
        }
        for socket in self.ports.tmp_sockets() {
            let is_socket =
                std::fs::symlink_metadata(&socket).is_ok_and(|meta| meta.file_type().is_socket());
            if is_socket {
                let _ = std::fs::remove_file(&socket);
            }
        }
    }
}

/// `weed` from `tests/seaweedfs-install` (run once per process: it prints
/// the path as its last stdout line).
fn installed_weed() -> Result<PathBuf, S3Error> {
    static WEED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("seaweedfs-install");
    WEED.get_or_init(|| run_install(&script))
        .clone()
        .map_err(|detail| S3Error::Install { script, detail })
}

fn run_install(script: &Path) -> Result<PathBuf, String> {
    let output = Command::new(script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr_tail: Vec<&str> = stderr.lines().collect();
    let stderr_tail = stderr_tail
        .get(stderr_tail.len().saturating_sub(LOG_TAIL_LINES)..)
        .unwrap_or_default()
        .join("\n");
    if !output.status.success() {
        return Err(format!("it failed ({}):\n{stderr_tail}", output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let weed = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| format!("it printed no path; its stderr:\n{stderr_tail}"))?;
    if !weed.is_absolute() || !weed.is_file() {
        return Err(format!(
            "its last line {} is not an absolute path to a file",
            weed.display()
        ));
    }
    Ok(weed)
}

fn endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

fn flag(name: &str, value: impl std::fmt::Display) -> String {
    format!("-{name}={value}")
}

/// The `-s3.config` file: one identity allowed everything.
fn identities_json() -> String {
    format!(
        r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
    )
}

fn credentials_toml(access_key: &str, secret_key: &str) -> String {
    let text = |s: &str| toml::Value::String(s.to_owned()).to_string();
    format!(
        "access_key_id = {}\nsecret_access_key = {}\n",
        text(access_key),
        text(secret_key)
    )
}

/// Short timeouts and few retries: a killed server is an error at once.
fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(true)
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(Duration::from_secs(2))
}

fn store(endpoint: &str) -> Result<AmazonS3, object_store::Error> {
    AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(S3Server::BUCKET)
        .with_region(REGION)
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .with_virtual_hosted_style_request(false)
        .with_client_options(client_options())
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: REQUEST_TIMEOUT,
        })
        .build()
}

fn object_path(key: &str) -> Result<ObjectPath, S3Error> {
    ObjectPath::parse(key).map_err(|source| S3Error::Key {
        key: key.to_owned(),
        source,
    })
}

fn kill_group(child: &Child) -> std::io::Result<()> {
    let pid = i32::try_from(child.id()).map_err(std::io::Error::other)?;
    // The child is not reaped yet, so its pid (its process group's id, as
    // it was started with `process_group(0)`) cannot have been reused.
    nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL).map_err(std::io::Error::from)
}
