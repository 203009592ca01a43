//! The double's settings, read from the environment once, at first use, and
//! the fault-spec grammar.
//!
//! A malformed value is never ignored: it is reported on stderr once and
//! `cuInit` (and `cuDriverGetVersion`) fail with `CUDA_ERROR_INVALID_VALUE`.

use std::sync::OnceLock;

use cudarc::driver::sys::CUresult;

use crate::{errors, functions};

/// How many devices the double has (default 2; 0: none, and `cuInit`
/// answers `CUDA_ERROR_NO_DEVICE`).
pub const ENV_DEVICES: &str = "GPUSNAP_CUDA_DOUBLE_DEVICES";
/// Bytes of device memory per device (default 4 GiB).
pub const ENV_MEMORY: &str = "GPUSNAP_CUDA_DOUBLE_MEMORY";
/// Microseconds each stream operation waits before it runs (default 200).
pub const ENV_OP_DELAY_US: &str = "GPUSNAP_CUDA_DOUBLE_OP_DELAY_US";
/// What `cuDriverGetVersion` answers (default 13000).
pub const ENV_DRIVER_VERSION: &str = "GPUSNAP_CUDA_DOUBLE_DRIVER_VERSION";
/// The most bytes one `cuMemHostRegister_v2` call may page-lock (default 512 GiB).
pub const ENV_HOST_REGISTER_MAX: &str = "GPUSNAP_CUDA_DOUBLE_HOST_REGISTER_MAX";
/// Fault rules, `name:nth=CODE[@async]`, comma separated.
pub const ENV_FAULTS: &str = "GPUSNAP_CUDA_DOUBLE_FAULTS";

const GIB: u64 = 1 << 30;
const DEVICES_MAX: usize = 16;
const MEMORY_MIN_BYTES: u64 = 1 << 20;
const MEMORY_MAX_BYTES: u64 = 1 << 40;
const OP_DELAY_MAX_US: u64 = 60_000_000;
const PAGE_BYTES: u64 = 4096;

/// The settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub devices: usize,
    pub memory_bytes: usize,
    pub op_delay_us: u64,
    pub driver_version: i32,
    pub host_register_max_bytes: u64,
    pub faults: Vec<FaultRule>,
}

/// One fault rule: the `nth` call (1-based, counted from when the rule was
/// installed) of `function` returns `code`; with `asynchronous` the call
/// succeeds and its stream operation fails when it runs, breaking the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    pub function: &'static str,
    pub nth: u64,
    pub code: CUresult,
    pub asynchronous: bool,
}

/// A setting the double refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
}

/// The settings from the process environment, read once. The first time a
/// malformed setting is seen it is reported on stderr.
pub fn config() -> Result<&'static Config, CUresult> {
    static CONFIG: OnceLock<Result<Config, ConfigError>> = OnceLock::new();
    let read = CONFIG.get_or_init(|| {
        let read =
            from_lookup(|var| std::env::var_os(var).map(|v| v.to_string_lossy().into_owned()));
        if let Err(e) = &read {
            eprintln!("gpusnap-cuda-double: refusing the environment: {e}");
        }
        read
    });
    read.as_ref()
        .map_err(|_| CUresult::CUDA_ERROR_INVALID_VALUE)
}

/// The settings, with `get` standing in for the environment.
pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let devices = number(
        &get,
        ENV_DEVICES,
        2,
        0,
        u64::try_from(DEVICES_MAX).unwrap_or(u64::MAX),
    )?;
    let memory = number(
        &get,
        ENV_MEMORY,
        4 * GIB,
        MEMORY_MIN_BYTES,
        MEMORY_MAX_BYTES,
    )?;
    if memory % PAGE_BYTES != 0 {
        return Err(invalid(&get, ENV_MEMORY, "not a multiple of 4096"));
    }
    let op_delay_us = number(&get, ENV_OP_DELAY_US, 200, 0, OP_DELAY_MAX_US)?;
    let version = number(
        &get,
        ENV_DRIVER_VERSION,
        13000,
        1,
        u64::try_from(i32::MAX).unwrap_or(0),
    )?;
    let host_register_max_bytes = number(&get, ENV_HOST_REGISTER_MAX, 512 * GIB, 1, u64::MAX)?;
    let faults = match get(ENV_FAULTS) {
        None => Vec::new(),
        Some(spec) => parse_fault_spec(&spec).map_err(|reason| ConfigError {
            var: ENV_FAULTS,
            value: spec.clone(),
            reason,
        })?,
    };
    Ok(Config {
        devices: usize::try_from(devices).map_err(|_| invalid(&get, ENV_DEVICES, "too large"))?,
        memory_bytes: usize::try_from(memory)
            .map_err(|_| invalid(&get, ENV_MEMORY, "too large"))?,
        op_delay_us,
        driver_version: i32::try_from(version)
            .map_err(|_| invalid(&get, ENV_DRIVER_VERSION, "too large"))?,
        host_register_max_bytes,
        faults,
    })
}

fn invalid(get: &impl Fn(&str) -> Option<String>, var: &'static str, reason: &str) -> ConfigError {
    ConfigError {
        var,
        value: get(var).unwrap_or_default(),
        reason: reason.to_owned(),
    }
}

fn number(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(text) = get(var) else {
        return Ok(default);
    };
    let value: u64 = text
        .trim()
        .parse()
        .map_err(|_| invalid(get, var, "not a decimal number"))?;
    if value < min || value > max {
        return Err(invalid(get, var, &format!("outside {min}..={max}")));
    }
    Ok(value)
}

/// Parses `name:nth=CODE[@async]`, comma separated; whitespace around an
/// entry is ignored and an empty spec has no rules. `CODE` is a `CUresult`
/// name or number other than `CUDA_SUCCESS`. Every malformed part is an error
/// that says which entry and why.
pub fn parse_fault_spec(spec: &str) -> Result<Vec<FaultRule>, String> {
    if spec.trim().is_empty() {
        return Ok(Vec::new());
    }
    spec.split(',')
        .map(|entry| parse_rule(entry.trim()))
        .collect()
}

fn parse_rule(entry: &str) -> Result<FaultRule, String> {
    let fail = |why: &str| format!("fault rule {entry:?}: {why}");
    let (function, rest) = entry
        .split_once(':')
        .ok_or_else(|| fail("expected name:nth=CODE"))?;
    let (nth, code) = rest
        .split_once('=')
        .ok_or_else(|| fail("expected name:nth=CODE"))?;
    let (code, asynchronous) = match code.split_once('@') {
        None => (code, false),
        Some((code, "async")) => (code, true),
        Some((_, other)) => return Err(fail(&format!("unknown suffix @{other} (only @async)"))),
    };
    let function = functions::lookup(function.trim())
        .ok_or_else(|| fail(&format!("the double exports no function {function:?}")))?;
    let nth: u64 = nth
        .trim()
        .parse()
        .map_err(|_| fail("nth is not a decimal number"))?;
    if nth == 0 {
        return Err(fail("nth counts from 1"));
    }
    let code =
        parse_code(code.trim()).ok_or_else(|| fail(&format!("unknown CUresult {code:?}")))?;
    if code == CUresult::CUDA_SUCCESS {
        return Err(fail("CUDA_SUCCESS is not a fault"));
    }
    if asynchronous && !functions::is_enqueuing(function) {
        return Err(fail(&format!(
            "{function} puts nothing on a stream, so @async cannot apply"
        )));
    }
    Ok(FaultRule {
        function,
        nth,
        code,
        asynchronous,
    })
}

fn parse_code(text: &str) -> Option<CUresult> {
    if let Ok(raw) = text.parse::<u32>() {
        return errors::from_raw(raw);
    }
    errors::TABLE
        .iter()
        .find(|e| e.name.to_bytes() == text.as_bytes())
        .map(|e| e.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |var| pairs.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone())
    }

    #[test]
    fn defaults() {
        let c = from_lookup(env(&[])).unwrap();
        assert_eq!(c.devices, 2);
        assert_eq!(c.memory_bytes, 4 << 30);
        assert_eq!(c.op_delay_us, 200);
        assert_eq!(c.driver_version, 13000);
        assert_eq!(c.host_register_max_bytes, 512 << 30);
        assert!(c.faults.is_empty());
    }

    #[test]
    fn overrides() {
        let c = from_lookup(env(&[
            (ENV_DEVICES, "0"),
            (ENV_MEMORY, "1048576"),
            (ENV_OP_DELAY_US, " 5 "),
            (ENV_DRIVER_VERSION, "12080"),
            (ENV_HOST_REGISTER_MAX, "8192"),
        ]))
        .unwrap();
        assert_eq!((c.devices, c.memory_bytes, c.op_delay_us), (0, 1 << 20, 5));
        assert_eq!((c.driver_version, c.host_register_max_bytes), (12080, 8192));
    }

    #[test]
    fn malformed_settings_are_refused() {
        for (var, value) in [
            (ENV_DEVICES, "two"),
            (ENV_DEVICES, "17"),
            (ENV_MEMORY, "1000"),
            (ENV_MEMORY, "1048577"),
            (ENV_OP_DELAY_US, "-1"),
            (ENV_DRIVER_VERSION, "0"),
            (ENV_HOST_REGISTER_MAX, "0"),
            (ENV_FAULTS, "cuInit"),
        ] {
            let e = from_lookup(env(&[(var, value)])).unwrap_err();
            assert_eq!(e.var, var, "{value}");
        }
    }

    #[test]
    fn fault_spec_of_the_brief_parses() {
        let rules =
            parse_fault_spec("cuMemHostRegister_v2:1=CUDA_ERROR_OUT_OF_MEMORY,cuMemcpyDtoHAsync_v2:3=CUDA_ERROR_ILLEGAL_ADDRESS@async")
                .unwrap();
        assert_eq!(
            rules,
            vec![
                FaultRule {
                    function: "cuMemHostRegister_v2",
                    nth: 1,
                    code: CUresult::CUDA_ERROR_OUT_OF_MEMORY,
                    asynchronous: false,
                },
                FaultRule {
                    function: "cuMemcpyDtoHAsync_v2",
                    nth: 3,
                    code: CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
                    asynchronous: true,
                },
            ]
        );
    }

    #[test]
    fn fault_spec_accepts_numbers_spaces_and_nothing() {
        assert_eq!(parse_fault_spec("  ").unwrap(), vec![]);
        let rules = parse_fault_spec(" cuInit:2=100 , cuEventRecord:1=700@async").unwrap();
        assert_eq!(rules[0].code, CUresult::CUDA_ERROR_NO_DEVICE);
        assert_eq!(rules[0].nth, 2);
        assert!(rules[1].asynchronous);
    }

    #[test]
    fn malformed_fault_specs_say_why() {
        for (spec, why) in [
            ("cuInit", "expected name:nth=CODE"),
            ("cuInit:1", "expected name:nth=CODE"),
            ("cuMemcpy:1=CUDA_ERROR_UNKNOWN", "exports no function"),
            ("cuInit:0=CUDA_ERROR_UNKNOWN", "counts from 1"),
            ("cuInit:x=CUDA_ERROR_UNKNOWN", "not a decimal"),
            ("cuInit:1=CUDA_ERROR_NOPE", "unknown CUresult"),
            ("cuInit:1=12345", "unknown CUresult"),
            ("cuInit:1=CUDA_SUCCESS", "not a fault"),
            ("cuInit:1=CUDA_ERROR_UNKNOWN@later", "unknown suffix"),
            (
                "cuMemAlloc_v2:1=CUDA_ERROR_UNKNOWN@async",
                "puts nothing on a stream",
            ),
            ("cuInit:1=CUDA_ERROR_UNKNOWN,", "expected name:nth=CODE"),
        ] {
            let e = parse_fault_spec(spec).unwrap_err();
            assert!(e.contains(why), "{spec}: {e}");
        }
    }
}
