//! What a daemon is started with: its config as tables of keys and TOML
//! values, and how long the launcher waits for it.
//!
//! Both start from `testkit/defaults.toml`, embedded here and read by the
//! Python launcher too, so the Rust and the Python tests run the same
//! daemon. A test changes single keys on top (`table -> key -> TOML value`);
//! a benchmark brings a whole config it built
//! ([`Settings::from_config`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

/// The shared defaults, as committed.
pub const DEFAULTS_TOML: &str = include_str!("../defaults.toml");

/// Why settings cannot be built or read.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("testkit/defaults.toml: {0}")]
    Defaults(String),
    #[error("{table}.{key} = {text}: not a TOML value: {why}")]
    NotAValue {
        table: String,
        key: String,
        text: String,
        why: String,
    },
    #[error("[{table}] is set to a value, not a table")]
    NotATable { table: String },
    #[error("the daemon config does not serialize to TOML tables: {0}")]
    Serialize(#[source] toml::ser::Error),
    #[error("{table}.{key} = {}: a TOML string must be UTF-8", path.display())]
    NotUtf8 {
        table: String,
        key: String,
        path: PathBuf,
    },
    #[error("{table}.{key}: {why}")]
    Key {
        table: String,
        key: String,
        why: &'static str,
    },
}

/// A daemon config: tables of keys and TOML values, written out as the
/// daemon's TOML file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Settings {
    tables: toml::Table,
}

/// How long the launcher waits (`[launcher]` of the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waits {
    /// From spawning until the socket accepts a connection.
    pub start: Duration,
    /// Past `daemon.shutdown_deadline_s`, after SIGTERM, before SIGKILL.
    pub stop_grace: Duration,
    /// For a SIGKILLed daemon to be reaped.
    pub kill: Duration,
}

/// `testkit/defaults.toml`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    /// `[config.*]`: the test daemon's config.
    pub config: Settings,
    /// `[launcher]`.
    pub waits: Waits,
}

impl Defaults {
    /// Parses the embedded defaults.
    pub fn load() -> Result<Defaults, SettingsError> {
        Defaults::parse(DEFAULTS_TOML)
    }

    fn parse(text: &str) -> Result<Defaults, SettingsError> {
        let mut file: toml::Table =
            toml::from_str(text).map_err(|e| SettingsError::Defaults(e.to_string()))?;
        let launcher = match file.remove("launcher") {
            Some(toml::Value::Table(t)) => Settings {
                tables: toml::Table::from_iter([("launcher".to_owned(), toml::Value::Table(t))]),
            },
            _ => return Err(SettingsError::Defaults("no [launcher] table".into())),
        };
        let waits = Waits {
            start: launcher.seconds("launcher", "start_wait_s")?,
            stop_grace: launcher.seconds("launcher", "stop_grace_s")?,
            kill: launcher.seconds("launcher", "kill_wait_s")?,
        };
        let config = match file.remove("config") {
            Some(toml::Value::Table(t)) => Settings { tables: t },
            _ => return Err(SettingsError::Defaults("no [config.*] tables".into())),
        };
        if let Some(other) = file.keys().next() {
            return Err(SettingsError::Defaults(format!(
                "unknown top-level key {other:?} (only [launcher] and [config.*])"
            )));
        }
        for (table, value) in &config.tables {
            if !value.is_table() {
                return Err(SettingsError::NotATable {
                    table: table.clone(),
                });
            }
        }
        Ok(Defaults { config, waits })
    }
}

impl Settings {
    /// A whole config (a benchmark's `gpusnapd::config::Config`), as the
    /// daemon would read it back.
    pub fn from_config<T: Serialize>(config: &T) -> Result<Settings, SettingsError> {
        let tables = toml::Table::try_from(config).map_err(SettingsError::Serialize)?;
        for (table, value) in &tables {
            if !value.is_table() {
                return Err(SettingsError::NotATable {
                    table: table.clone(),
                });
            }
        }
        Ok(Settings { tables })
    }

    /// Sets `table.key` to `value`, adding the table when it is new.
    pub fn set(
        &mut self,
        table: &str,
        key: &str,
        value: impl Into<toml::Value>,
    ) -> Result<(), SettingsError> {
        let entry = self
            .tables
            .entry(table)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(keys) = entry else {
            return Err(SettingsError::NotATable {
                table: table.to_owned(),
            });
        };
        keys.insert(key.to_owned(), value.into());
        Ok(())
    }

    /// Sets `table.key` to `path` (a TOML string: it must be UTF-8).
    pub fn set_path(&mut self, table: &str, key: &str, path: &Path) -> Result<(), SettingsError> {
        let text = path.to_str().ok_or_else(|| SettingsError::NotUtf8 {
            table: table.to_owned(),
            key: key.to_owned(),
            path: path.to_path_buf(),
        })?;
        self.set(table, key, text)
    }

    /// Sets `table.key` to the TOML value written in `text` (`"\"1MiB\""`,
    /// `"16"`, `"true"`).
    pub fn set_toml(&mut self, table: &str, key: &str, text: &str) -> Result<(), SettingsError> {
        let value: toml::Value =
            text.parse()
                .map_err(|e: toml::de::Error| SettingsError::NotAValue {
                    table: table.to_owned(),
                    key: key.to_owned(),
                    text: text.to_owned(),
                    why: e.message().to_owned(),
                })?;
        self.set(table, key, value)
    }

    /// Applies `(table, key, TOML value)` overrides in order.
    pub fn apply(&mut self, overrides: &[(&str, &str, &str)]) -> Result<(), SettingsError> {
        for (table, key, text) in overrides {
            self.set_toml(table, key, text)?;
        }
        Ok(())
    }

    /// The value of `table.key`, if set.
    pub fn get(&self, table: &str, key: &str) -> Option<&toml::Value> {
        self.tables.get(table)?.get(key)
    }

    /// The string `table.key`.
    pub fn string(&self, table: &str, key: &str) -> Result<&str, SettingsError> {
        self.get(table, key)
            .ok_or_else(|| self.key_error(table, key, "is not set"))?
            .as_str()
            .ok_or_else(|| self.key_error(table, key, "is not a string"))
    }

    /// The path `table.key`.
    pub fn path(&self, table: &str, key: &str) -> Result<PathBuf, SettingsError> {
        self.string(table, key).map(PathBuf::from)
    }

    /// `table.key`, a whole number of seconds.
    pub fn seconds(&self, table: &str, key: &str) -> Result<Duration, SettingsError> {
        let value = self
            .get(table, key)
            .ok_or_else(|| self.key_error(table, key, "is not set"))?
            .as_integer()
            .ok_or_else(|| self.key_error(table, key, "is not an integer"))?;
        u64::try_from(value)
            .map(Duration::from_secs)
            .map_err(|_| self.key_error(table, key, "is negative"))
    }

    fn key_error(&self, table: &str, key: &str, why: &'static str) -> SettingsError {
        SettingsError::Key {
            table: table.to_owned(),
            key: key.to_owned(),
            why,
        }
    }

    /// The daemon's config file.
    pub fn to_toml(&self) -> Result<String, SettingsError> {
        toml::to_string(&self.tables).map_err(SettingsError::Serialize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_defaults_parse_into_config_tables_and_waits() {
        let d = Defaults::load().expect("defaults.toml");
        assert_eq!(d.waits.start, Duration::from_secs(60));
        assert!(d.waits.kill > Duration::ZERO);
        assert_eq!(
            d.config.get("store", "io_buffer_bytes"),
            Some(&toml::Value::Integer(262_144))
        );
        assert_eq!(
            d.config.string("staging", "budget_bytes").ok(),
            Some("2GiB")
        );
        assert_eq!(
            d.config.seconds("daemon", "shutdown_deadline_s").ok(),
            Some(Duration::from_secs(30))
        );
        // The launcher fills these in per daemon.
        assert!(d.config.get("daemon", "socket").is_none());
        assert!(d.config.get("metrics", "listen").is_none());
        assert!(d.config.get("store", "root").is_none());
        assert!(d.config.get("launcher", "start_wait_s").is_none());
    }

    #[test]
    fn overrides_replace_keys_add_tables_and_keep_the_rest() {
        let mut s = Defaults::load().expect("defaults").config;
        s.apply(&[
            ("staging", "budget_bytes", "\"8MiB\""),
            ("staging", "policy", "\"stream\""),
            ("persist", "concurrent_writes", "1"),
            ("hot_tier", "budget_bytes", "0"),
        ])
        .expect("overrides");
        let back: toml::Table = toml::from_str(&s.to_toml().expect("render")).expect("reparse");
        assert_eq!(back["staging"]["budget_bytes"].as_str(), Some("8MiB"));
        assert_eq!(back["staging"]["policy"].as_str(), Some("stream"));
        assert_eq!(back["staging"]["stream_ring_bytes"].as_str(), Some("1MiB"));
        assert_eq!(back["persist"]["concurrent_writes"].as_integer(), Some(1));
        assert_eq!(back["hot_tier"]["budget_bytes"].as_integer(), Some(0));
        assert_eq!(back["store"]["queue_depth"].as_integer(), Some(16));
    }

    #[test]
    fn an_override_that_is_not_a_toml_value_is_refused_naming_its_key() {
        let mut s = Settings::default();
        let e = s
            .set_toml("staging", "budget_bytes", "8MiB")
            .expect_err("bare word");
        assert!(
            matches!(&e, SettingsError::NotAValue { table, key, .. } if table == "staging" && key == "budget_bytes"),
            "{e}"
        );
        assert!(s.get("staging", "budget_bytes").is_none());
    }

    #[test]
    fn a_key_set_on_a_value_that_is_not_a_table_is_refused() {
        let mut s = Settings::default();
        s.tables.insert("daemon".into(), toml::Value::Integer(1));
        assert!(matches!(
            s.set("daemon", "socket", "/x"),
            Err(SettingsError::NotATable { .. })
        ));
    }

    #[test]
    fn a_serializable_config_becomes_its_tables() {
        #[derive(Serialize)]
        struct Daemon {
            socket: PathBuf,
            shutdown_deadline_s: u64,
            socket_group: Option<String>,
        }
        #[derive(Serialize)]
        struct Config {
            daemon: Daemon,
        }
        let s = Settings::from_config(&Config {
            daemon: Daemon {
                socket: "/run/x.sock".into(),
                shutdown_deadline_s: 120,
                socket_group: None,
            },
        })
        .expect("tables");
        assert_eq!(
            s.path("daemon", "socket").ok(),
            Some(PathBuf::from("/run/x.sock"))
        );
        assert_eq!(
            s.seconds("daemon", "shutdown_deadline_s").ok(),
            Some(Duration::from_secs(120))
        );
        assert!(s.get("daemon", "socket_group").is_none());

        #[derive(Serialize)]
        struct Flat {
            daemon: u32,
        }
        assert!(matches!(
            Settings::from_config(&Flat { daemon: 1 }),
            Err(SettingsError::NotATable { .. })
        ));
    }

    #[test]
    fn defaults_without_launcher_waits_or_with_stray_keys_are_refused() {
        assert!(Defaults::parse("[config.daemon]\n").is_err());
        let waits = "[launcher]\nstart_wait_s = 1\nstop_grace_s = 1\nkill_wait_s = 1\n";
        assert!(Defaults::parse(waits).is_err(), "no config");
        let ok = format!("{waits}[config.daemon]\nslot_wait_s = 1\n");
        assert!(Defaults::parse(&ok).is_ok());
        assert!(Defaults::parse(&format!("{ok}[other]\n")).is_err());
        let negative = ok.replace("kill_wait_s = 1", "kill_wait_s = -1");
        assert!(matches!(
            Defaults::parse(&negative),
            Err(SettingsError::Key { .. })
        ));
    }
}
