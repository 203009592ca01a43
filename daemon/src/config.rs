//! The daemon's configuration: one TOML file, every key optional with a
//! documented default (`systemd/gpusnapd.toml.example` lists them all),
//! unknown keys refused. Every check runs at start and names its key.

use std::fmt;
use std::path::{Path, PathBuf};

use gpusnap_proto::{BusyPolicy, FRAME_BYTES_MAX};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::store::StoreConfig;

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gpusnap/gpusnapd.toml";

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
}

impl Default for PersistConfig {
    fn default() -> Self {
        PersistConfig {
            concurrent_writes: 2,
        }
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

    /// Every check, each error naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: String| Err(ConfigError::Invalid { key, why });
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
        self.store.validate().map_err(|e| ConfigError::Invalid {
            key: "store",
            why: e.to_string(),
        })?;
        let chunk = self.store.io_buffer_bytes as u64;
        if self.staging.stream_ring_bytes.0 / chunk < 2 {
            return invalid(
                "staging.stream_ring_bytes",
                format!(
                    "{} holds fewer than two {chunk}-byte I/O chunks",
                    self.staging.stream_ring_bytes
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

    /// Stream ring chunks per client.
    pub fn ring_chunks(&self) -> u32 {
        let chunks = self.staging.stream_ring_bytes.0 / self.store.io_buffer_bytes as u64;
        u32::try_from(chunks).unwrap_or(u32::MAX)
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
            ("[daemon]\nlog_level = \"[\"\n", "daemon.log_level"),
            ("[nonsense]\n", "nonsense"),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }
}
