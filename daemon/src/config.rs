//! The daemon's configuration: one TOML file, every key optional with a
//! documented default (`systemd/gpusnapd.toml.example` lists them all),
//! unknown keys refused. Every check runs at start and names its key.
//!
//! The `[testing]` table injects faults for the daemon's own tests. It is
//! refused at start unless the environment variable `GPUSNAP_TESTING=1` is
//! set ([`TESTING_ENV`]), so a production config cannot turn it on by
//! accident; the example file shows it commented out, after the rest.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};

use gpusnap_proto::{BusyPolicy, FRAME_BYTES_MAX};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::remote::RemoteConfig;
use crate::storage::delay::DelaySpec;
use crate::store::StoreConfig;

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gpusnap/gpusnapd.toml";

/// The environment variable that must be `1` for a `[testing]` table to be
/// accepted.
pub const TESTING_ENV: &str = "GPUSNAP_TESTING";

/// Longest delay `testing.delays` may give one operation: the longest wait
/// the daemon has elsewhere (`daemon.slot_wait_s`'s default), so an injected
/// delay is always bounded.
pub const TESTING_DELAY_MS_MAX: u64 = 600_000;

/// Longest `daemon.hello_wait_s` and `daemon.reply_wait_s`: an hour.
pub const CONNECTION_WAIT_S_MAX: u64 = 3600;

/// The request names the `[testing]` hooks accept: the protocol's own.
pub const REQUEST_NAMES: [&str; 12] = gpusnap_proto::RequestBody::NAMES;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key {key}: {why}")]
    Invalid { key: &'static str, why: String },
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub staging: StagingConfig,
    pub hot_tier: HotTierConfig,
    pub persist: PersistConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
    /// The object store committed snapshots are uploaded to; off by default.
    pub remote: RemoteConfig,
    /// Fault injection for tests; absent in every production config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub testing: Option<TestingConfig>,
}

/// `[daemon]`: the control plane and the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Unix socket trainers connect to (ignored when systemd passes one).
    pub socket: PathBuf,
    /// Permission bits of the socket, octal.
    pub socket_mode: String,
    /// Group that owns the socket (name or number); unset keeps the
    /// daemon's own group.
    pub socket_group: Option<String>,
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter.
    pub log_level: String,
    /// On SIGTERM, how long in-flight persists may take before the daemon
    /// exits anyway (what they had not committed is lost; committed
    /// snapshots never are).
    pub shutdown_deadline_s: u64,
    /// Largest frame accepted from a client, in bytes.
    pub frame_bytes_max: u32,
    /// Most connections at once; more are refused with an error.
    pub max_clients: usize,
    /// How long a snapshot under policy `block` waits for a free slot, and
    /// a restore for that (job, rank)'s in-flight persists and a slot.
    pub slot_wait_s: u64,
    /// How long a new connection may take to send `Hello`; one that has not
    /// by then is closed, so connections that never speak cannot use up
    /// `max_clients`.
    pub hello_wait_s: u64,
    /// How long one reply may take to be written: a client that stops
    /// reading its socket is closed once its socket buffer is full this
    /// long (what it held is given back, like any closed connection).
    pub reply_wait_s: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from(gpusnap_proto::DEFAULT_SOCKET),
            socket_mode: "0660".to_owned(),
            socket_group: None,
            log_level: "info".to_owned(),
            shutdown_deadline_s: 30,
            frame_bytes_max: FRAME_BYTES_MAX,
            max_clients: 1024,
            slot_wait_s: 600,
            hello_wait_s: 10,
            reply_wait_s: 30,
        }
    }
}

/// `[staging]`: the memory trainers capture into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StagingConfig {
    /// All staging memory together (every client's slots and rings).
    pub budget_bytes: ByteSize,
    /// What a snapshot does while every slot of its client is busy.
    pub policy: BusyPolicy,
    /// Two slots per registration where the budget allows, so step N+1 is
    /// captured while step N persists.
    pub double: bool,
    /// Size of each client's stream ring (policy `stream`), rounded down to
    /// whole I/O chunks; at least two chunks.
    pub stream_ring_bytes: ByteSize,
}

impl Default for StagingConfig {
    fn default() -> Self {
        StagingConfig {
            budget_bytes: ByteSize(16 << 30),
            policy: BusyPolicy::Block,
            double: true,
            stream_ring_bytes: ByteSize(64 << 20),
        }
    }
}

/// `[hot_tier]`: the newest snapshot of each (job, rank) kept in memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotTierConfig {
    /// Memory for hot snapshots, least recently used evicted first; 0 turns
    /// the hot tier off.
    pub budget_bytes: ByteSize,
}

impl Default for HotTierConfig {
    fn default() -> Self {
        HotTierConfig {
            budget_bytes: ByteSize(8 << 30),
        }
    }
}

/// `[persist]`: the engine that writes staging to disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersistConfig {
    /// Snapshots written at once across all clients (each has its own
    /// queue depth of I/O in flight).
    pub concurrent_writes: usize,
    /// How long a captured snapshot waits for one of those writes before it
    /// fails with a timeout (a hung write elsewhere holds its turn).
    pub write_wait_s: u64,
}

impl Default for PersistConfig {
    fn default() -> Self {
        PersistConfig {
            concurrent_writes: 2,
            write_wait_s: 600,
        }
    }
}

/// `[testing]`: faults injected into the daemon for its own end-to-end
/// tests. Refused at start unless `GPUSNAP_TESTING=1` is in the daemon's
/// environment. Every key is unset by default.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// The first request of this kind (one of [`REQUEST_NAMES`]) that any
    /// connection handles panics that connection's task, as a bug would;
    /// later ones are served.
    pub panic_once_on_request: Option<String>,
    /// Every persist of this step, in a lane or streamed, panics before it
    /// writes anything, as a bug would.
    pub panic_persisting_step: Option<u64>,
    /// The latency backend: the store's storage is wrapped in a
    /// [`DelayedStorage`](crate::storage::delay::DelayedStorage) that
    /// delays the operations these specs name, e.g.
    /// `[{ op = "sync_data", delay_ms = 2000, first_n = 1 }]` (the first
    /// snapshot's fdatasync takes two seconds longer), so a test of what
    /// happens while a persist runs does not race the disk. Each delay is
    /// 1..=[`TESTING_DELAY_MS_MAX`] ms, and a `first_n` at least 1. Empty:
    /// the storage is not wrapped.
    pub delays: Vec<DelaySpec>,
}

impl TestingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let TestingConfig {
            panic_once_on_request,
            panic_persisting_step: _,
            delays,
        } = self;
        for (index, spec) in delays.iter().enumerate() {
            let invalid = |why: String| {
                Err(ConfigError::Invalid {
                    key: "testing.delays",
                    why: format!("entry {index} ({:?}): {why}", spec.op),
                })
            };
            if !(1..=TESTING_DELAY_MS_MAX).contains(&spec.delay_ms) {
                return invalid(format!(
                    "delay_ms {} is not in 1..={TESTING_DELAY_MS_MAX}",
                    spec.delay_ms
                ));
            }
            if spec.first_n == Some(0) {
                return invalid(
                    "first_n = 0 delays nothing; leave first_n out to delay every operation".into(),
                );
            }
        }
        if let Some(name) = panic_once_on_request
            && !REQUEST_NAMES.contains(&name.as_str())
        {
            return Err(ConfigError::Invalid {
                key: "testing.panic_once_on_request",
                why: format!(
                    "{name:?} is not a request name ({})",
                    REQUEST_NAMES.join(", ")
                ),
            });
        }
        Ok(())
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` for `GET /metrics` and `GET /healthz`; empty turns it off.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".to_owned(),
        }
    }
}

impl Config {
    /// Reads and checks `path`. A missing default file means defaults; a
    /// missing file named on the command line is an error.
    pub fn load(path: &Path, must_exist: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Every check, each error naming its key. A `[testing]` table needs
    /// `GPUSNAP_TESTING=1` in this process's environment.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with(std::env::var_os(TESTING_ENV).as_deref())
    }

    /// As [`Config::validate`], with the value of `GPUSNAP_TESTING` given.
    pub fn validate_with(&self, testing_env: Option<&OsStr>) -> Result<(), ConfigError> {
        let invalid = |key, why: String| Err(ConfigError::Invalid { key, why });
        if let Some(testing) = &self.testing {
            if testing_env != Some(OsStr::new("1")) {
                return invalid(
                    "testing",
                    format!(
                        "the [testing] table injects faults for the daemon's own tests and is refused unless the environment variable {TESTING_ENV}=1 is set; remove it from a production config"
                    ),
                );
            }
            testing.validate()?;
        }
        let d = &self.daemon;
        if !d.socket.is_absolute() {
            return invalid(
                "daemon.socket",
                format!("{} is not an absolute path", d.socket.display()),
            );
        }
        if let Err(why) = self.socket_mode() {
            return invalid("daemon.socket_mode", why);
        }
        if d.socket_group.as_deref() == Some("") {
            return invalid(
                "daemon.socket_group",
                "is empty; leave it out instead".into(),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&d.log_level).is_err() {
            return invalid(
                "daemon.log_level",
                format!("{:?} is not a log level or filter", d.log_level),
            );
        }
        if d.frame_bytes_max < 4096 || d.frame_bytes_max > FRAME_BYTES_MAX {
            return invalid(
                "daemon.frame_bytes_max",
                format!("{} is not in 4096..={FRAME_BYTES_MAX}", d.frame_bytes_max),
            );
        }
        if d.max_clients == 0 {
            return invalid("daemon.max_clients", "must be at least 1".into());
        }
        for (key, seconds) in [
            ("daemon.hello_wait_s", d.hello_wait_s),
            ("daemon.reply_wait_s", d.reply_wait_s),
        ] {
            if !(1..=CONNECTION_WAIT_S_MAX).contains(&seconds) {
                return invalid(
                    key,
                    format!("{seconds} is not in 1..={CONNECTION_WAIT_S_MAX}"),
                );
            }
        }
        self.store.validate().map_err(|e| ConfigError::Invalid {
            key: "store",
            why: e.to_string(),
        })?;
        self.remote.validate().map_err(|e| ConfigError::Invalid {
            key: e.key,
            why: e.why,
        })?;
        let chunk = gpusnap_proto::convert::to_u64(self.store.io_buffer_bytes);
        let ring_chunks = self.staging.stream_ring_bytes.0 / chunk;
        if ring_chunks < 2 || u32::try_from(ring_chunks).is_err() {
            return invalid(
                "staging.stream_ring_bytes",
                format!(
                    "{} holds {ring_chunks} {chunk}-byte I/O chunks, not 2..={}",
                    self.staging.stream_ring_bytes,
                    u32::MAX
                ),
            );
        }
        if self.staging.budget_bytes.0 < 4096 {
            return invalid(
                "staging.budget_bytes",
                format!("{} is below one page", self.staging.budget_bytes),
            );
        }
        if !(1..=256).contains(&self.persist.concurrent_writes) {
            return invalid(
                "persist.concurrent_writes",
                format!("{} is not in 1..=256", self.persist.concurrent_writes),
            );
        }
        if self.persist.write_wait_s == 0 {
            return invalid("persist.write_wait_s", "must be at least 1".into());
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return invalid(
                "metrics.listen",
                format!(
                    "{:?} is not host:port (an IP address and a port), nor empty",
                    self.metrics.listen
                ),
            );
        }
        Ok(())
    }

    /// The socket's permission bits.
    pub fn socket_mode(&self) -> Result<u32, String> {
        let mode = &self.daemon.socket_mode;
        match u32::from_str_radix(mode, 8) {
            Ok(m) if m <= 0o777 => Ok(m),
            _ => Err(format!(
                "{mode:?} is not octal permission bits like \"0660\""
            )),
        }
    }

    /// Stream ring chunks per client (of a validated config).
    pub fn ring_chunks(&self) -> u32 {
        let chunk = gpusnap_proto::convert::to_u64(self.store.io_buffer_bytes);
        u32::try_from(self.staging.stream_ring_bytes.0 / chunk)
            .expect("validate bounds the ring to u32::MAX chunks")
    }
}

/// A byte count written as an integer or as a string with a unit:
/// `"512MiB"`, `"8GiB"`, `"64M"` (binary units: K, M, G, T with or without
/// `iB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(digits_end);
        let value: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?} is not a byte size like 1048576 or \"64MiB\""))?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KiB" => 10,
            "M" | "MiB" => 20,
            "G" | "GiB" => 30,
            "T" | "TiB" => 40,
            other => return Err(format!("{other:?} is not a unit (B, KiB, MiB, GiB, TiB)")),
        };
        value
            .checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("{text:?} overflows 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if v != 0 && v.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", v >> shift);
            }
        }
        write!(f, "{v}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(v) => Ok(ByteSize(v)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults_and_defaults_are_valid() {
        let c = Config::parse("").expect("defaults");
        assert_eq!(c, Config::default());
        assert_eq!(c.socket_mode(), Ok(0o660));
        assert_eq!(c.ring_chunks(), 64);
    }

    #[test]
    fn the_example_file_lists_every_key_with_its_default() {
        let text = include_str!("../../systemd/gpusnapd.toml.example");
        let example = Config::parse(text).expect("the example parses");
        assert_eq!(example, Config::default(), "the example shows the defaults");
        // Every key of the defaults appears in the example, uncommented or
        // (for unset options) commented out.
        let defaults = toml::Value::try_from(Config::default()).expect("serialize");
        for (table, keys) in defaults.as_table().expect("table") {
            assert!(text.contains(&format!("[{table}]")), "[{table}] missing");
            for key in keys.as_table().expect("table").keys() {
                assert!(
                    text.contains(&format!("\n{key} = ")),
                    "{table}.{key} missing"
                );
            }
        }
        assert!(text.contains("# socket_group = "));
    }

    /// The `[testing]` block of the example, uncommented: its header and
    /// its `# key = value` lines.
    fn example_testing_block(text: &str) -> String {
        let (_, block) = text
            .split_once("\n# [testing]\n")
            .expect("the example shows [testing], commented out");
        let mut toml = String::from("[testing]\n");
        for line in block.lines() {
            let line = line
                .strip_prefix("# ")
                .expect("the whole block is commented");
            let is_key = line
                .split_once(" = ")
                .is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            if is_key {
                toml.push_str(line);
                toml.push('\n');
            }
        }
        toml
    }

    #[test]
    fn the_example_shows_every_testing_key_commented_out() {
        let text = include_str!("../../systemd/gpusnapd.toml.example");
        let block = example_testing_block(text);
        let config: Config = toml::from_str(&block).expect("the block parses");
        config
            .validate_with(Some(OsStr::new("1")))
            .expect("the example values are valid");
        // Naming every field: a key added to the table does not compile
        // here until the example shows it.
        let TestingConfig {
            panic_once_on_request,
            panic_persisting_step,
            delays,
        } = config.testing.expect("a [testing] table");
        assert!(panic_once_on_request.is_some(), "{block}");
        assert!(panic_persisting_step.is_some(), "{block}");
        assert!(!delays.is_empty(), "{block}");
    }

    #[test]
    fn testing_delays_are_specs_of_the_latency_backend_and_bounded() {
        use crate::storage::delay::DelayedOp;
        let text = "[testing]\ndelays = [{ op = \"sync_data\", delay_ms = 2000, first_n = 1 }, { op = \"data_read\", delay_ms = 5 }]\n";
        let config: Config = toml::from_str(text).expect("parses");
        config
            .validate_with(Some(OsStr::new("1")))
            .expect("valid with GPUSNAP_TESTING=1");
        let delays = &config.testing.as_ref().expect("table").delays;
        assert_eq!(
            delays,
            &[
                DelaySpec {
                    op: DelayedOp::SyncData,
                    delay_ms: 2000,
                    first_n: Some(1)
                },
                DelaySpec {
                    op: DelayedOp::DataRead,
                    delay_ms: 5,
                    first_n: None
                },
            ]
        );
        let err = config.validate_with(None).expect_err("refused").to_string();
        assert!(err.contains("GPUSNAP_TESTING=1"), "{err}");
        for (bad, says) in [
            ("{ op = \"rename\", delay_ms = 0 }", "delay_ms 0"),
            ("{ op = \"rename\", delay_ms = 600001 }", "delay_ms 600001"),
            (
                "{ op = \"rename\", delay_ms = 1, first_n = 0 }",
                "first_n = 0",
            ),
        ] {
            let config: Config =
                toml::from_str(&format!("[testing]\ndelays = [{bad}]\n")).expect("parses");
            let err = config
                .validate_with(Some(OsStr::new("1")))
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("testing.delays") && err.contains(says) && err.contains("Rename"),
                "{bad}: {err}"
            );
        }
        assert!(
            toml::from_str::<Config>(
                "[testing]\ndelays = [{ op = \"fsync_all\", delay_ms = 1 }]\n"
            )
            .is_err(),
            "an operation the backend does not know"
        );
    }

    #[test]
    fn a_testing_table_is_refused_without_the_environment_variable() {
        for text in ["[testing]\n", "[testing]\npanic_persisting_step = 3\n"] {
            let config: Config = toml::from_str(text).expect("parses");
            for env in [None, Some("0"), Some("yes"), Some("")] {
                let err = config
                    .validate_with(env.map(OsStr::new))
                    .expect_err("refused");
                let message = err.to_string();
                assert!(
                    message.contains("GPUSNAP_TESTING=1") && message.contains("testing"),
                    "{text:?} with {env:?}: {message}"
                );
            }
            config
                .validate_with(Some(OsStr::new("1")))
                .expect("accepted with GPUSNAP_TESTING=1");
        }
        let bad: Config =
            toml::from_str("[testing]\npanic_once_on_request = \"snapshot\"\n").expect("parses");
        let err = bad
            .validate_with(Some(OsStr::new("1")))
            .expect_err("not a request name")
            .to_string();
        assert!(
            err.contains("testing.panic_once_on_request") && err.contains("captured"),
            "{err}"
        );
        assert!(
            toml::from_str::<Config>("[testing]\npanic_always = true\n").is_err(),
            "unknown testing keys are refused too"
        );
    }

    #[test]
    fn byte_sizes_take_integers_and_units() {
        let c = Config::parse(
            "[staging]\nbudget_bytes = \"2GiB\"\nstream_ring_bytes = 8388608\n[hot_tier]\nbudget_bytes = \"0\"\n",
        )
        .expect("parse");
        assert_eq!(c.staging.budget_bytes, ByteSize(2 << 30));
        assert_eq!(c.staging.stream_ring_bytes, ByteSize(8 << 20));
        assert_eq!(c.hot_tier.budget_bytes, ByteSize(0));
        assert_eq!(ByteSize::parse("64M"), Ok(ByteSize(64 << 20)));
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("99999999999T").is_err());
        assert_eq!(ByteSize(3 << 30).to_string(), "3GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[daemon]\nsocekt = \"/x\"\n", "socekt"),
            ("[staging]\npolicy = \"drop\"\n", "drop"),
            ("[daemon]\nsocket_mode = \"rw\"\n", "daemon.socket_mode"),
            ("[daemon]\nsocket = \"rel.sock\"\n", "daemon.socket"),
            ("[metrics]\nlisten = \"localhost\"\n", "metrics.listen"),
            ("[store]\nkeep_snapshots = 0\n", "keep_snapshots"),
            (
                "[staging]\nstream_ring_bytes = \"1MiB\"\n",
                "staging.stream_ring_bytes",
            ),
            (
                "[persist]\nconcurrent_writes = 0\n",
                "persist.concurrent_writes",
            ),
            ("[persist]\nwrite_wait_s = 0\n", "persist.write_wait_s"),
            ("[daemon]\nlog_level = \"[\"\n", "daemon.log_level"),
            ("[daemon]\nhello_wait_s = 0\n", "daemon.hello_wait_s"),
            ("[daemon]\nreply_wait_s = 3601\n", "daemon.reply_wait_s"),
            ("[nonsense]\n", "nonsense"),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }
}
