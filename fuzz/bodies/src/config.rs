//! Target `config`: the daemon's TOML configuration ([`Config::parse`]).
//!
//! Invariants: any text is a `Config` or a `ConfigError`, never a panic; a
//! config that parses also validates, and its derived values stay in their
//! bounds (`ring_chunks` at least 2, `socket_mode` at most `0o777`, frame
//! limit within the protocol's, an I/O buffer a positive multiple of 4096);
//! written back as TOML it parses to the same config. The `[testing]` table
//! is checked as a daemon with `GPUSNAP_TESTING=1` checks it.

use std::ffi::OsStr;

use gpusnap_proto::FRAME_BYTES_MAX;
use gpusnapd::config::Config;

/// Parses `data` as a config file and checks it (see the module doc).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text) {
        check_valid(&config, None);
    }
    // The same text under GPUSNAP_TESTING=1, which admits `[testing]`.
    if let Ok(config) = toml::from_str::<Config>(text)
        && config.validate_with(Some(OsStr::new("1"))).is_ok()
    {
        check_valid(&config, Some(OsStr::new("1")));
    }
}

fn check_valid(config: &Config, testing_env: Option<&OsStr>) {
    config
        .validate_with(testing_env)
        .expect("a config that parsed validates again");
    assert!(config.ring_chunks() >= 2, "a ring of at least two chunks");
    let mode = config.socket_mode().expect("a valid socket mode");
    assert!(mode <= 0o777);
    let d = &config.daemon;
    assert!((4096..=FRAME_BYTES_MAX).contains(&d.frame_bytes_max));
    assert!(d.max_clients >= 1);
    let io = config.store.io_buffer_bytes;
    assert!(io > 0 && io.is_multiple_of(4096), "io_buffer_bytes {io}");
    assert!(config.store.keep_snapshots >= 1);
    assert!(config.staging.budget_bytes.0 >= 4096);
    let text = toml::to_string(config).expect("a valid config serializes");
    let again: Config = toml::from_str(&text).expect("its own TOML parses");
    assert_eq!(&again, config, "TOML round trip:\n{text}");
    again
        .validate_with(testing_env)
        .expect("its own TOML validates");
}
