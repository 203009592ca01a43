//! The peer: fio with io_uring and O_DIRECT on the same directory and size
//! as the store's run, at one [`Setting`] (the benches' single setting is
//! 1 MiB blocks, 16 in flight, `--fio-iodepth`; `fio_sweep` tries more).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

/// The file fio writes and reads back, inside the benchmark directory.
pub const FIO_FILE: &str = "fio-bench.dat";

/// One fio setting: transfers in flight (`--iodepth`) and the size of each
/// (`--bs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Setting {
    /// fio's `--iodepth`: transfers in flight.
    pub iodepth: usize,
    /// fio's `--bs` in bytes: the size of one transfer.
    #[serde(rename = "block_bytes")]
    pub block: u64,
}

impl Setting {
    /// `--iodepth` transfers of 1 MiB, the benches' single setting.
    pub const fn mib_blocks(iodepth: usize) -> Setting {
        Setting {
            iodepth,
            block: 1 << 20,
        }
    }

    /// The block as fio's `--bs` spells it: `1M`, `4M`, `64K`, or bytes.
    pub fn block_arg(self) -> String {
        match self.block {
            b if b > 0 && b.is_multiple_of(1 << 20) => format!("{}M", b >> 20),
            b if b > 0 && b.is_multiple_of(1 << 10) => format!("{}K", b >> 10),
            b => b.to_string(),
        }
    }

    /// `qd 16, bs 1M`, for the tables.
    pub fn label(self) -> String {
        format!("qd {}, bs {}", self.iodepth, self.block_arg())
    }
}

/// Read or write, as fio's `--rw` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Write,
    Read,
}

impl Direction {
    /// fio's `--rw` value, also the JSON key part (`write`, `read`).
    pub fn name(self) -> &'static str {
        match self {
            Direction::Write => "write",
            Direction::Read => "read",
        }
    }
}

/// One fio job's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct FioResult {
    /// fio's `bw_bytes`: bytes per second over the job's runtime.
    pub bw_bytes_per_s: u64,
    /// fio's `runtime` in ms.
    pub runtime_ms: u64,
    /// Wall time of the whole fio process, start-up and end fsync included.
    pub process_wall_s: f64,
    /// The command line, for the report.
    pub command: String,
}

impl FioResult {
    /// `bw_bytes_per_s` in MB/s (1e6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.bw_bytes_per_s as f64 / 1e6
    }
}

/// The fio arguments for one job on `dir` at `setting`.
pub fn args(dir: &Path, direction: Direction, size_bytes: u64, setting: Setting) -> Vec<String> {
    vec![
        format!("--name=gpusnap-{}", direction.name()),
        format!("--directory={}", dir.display()),
        format!("--filename={FIO_FILE}"),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--bs={}", setting.block_arg()),
        format!("--iodepth={}", setting.iodepth),
        format!("--rw={}", direction.name()),
        format!("--size={size_bytes}"),
        "--numjobs=1".into(),
        "--end_fsync=1".into(),
        "--output-format=json".into(),
    ]
}

/// Whether `fio` runs at all, with its version.
pub fn version() -> Result<String, String> {
    let out = Command::new("fio").arg("--version").output().map_err(|e| {
        format!("fio is not installed or not on PATH ({e}); benches/run installs it")
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs one fio job on `dir` at `setting`, stdout captured (it never
/// reaches ours).
pub fn run(
    dir: &Path,
    direction: Direction,
    size_bytes: u64,
    setting: Setting,
) -> Result<FioResult, String> {
    let args = args(dir, direction, size_bytes, setting);
    let command = format!("fio {}", args.join(" "));
    let start = Instant::now();
    let out = Command::new("fio")
        .args(&args)
        .output()
        .map_err(|e| format!("{command}: {e}"))?;
    let process_wall_s = start.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "{command}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let (bw_bytes_per_s, runtime_ms) =
        parse(&out.stdout, direction).map_err(|e| format!("{command}: {e}"))?;
    Ok(FioResult {
        bw_bytes_per_s,
        runtime_ms,
        process_wall_s,
        command,
    })
}

/// `jobs[0].<direction>.bw_bytes` and `.runtime` from fio's JSON output
/// (anything fio prints before the JSON object is skipped).
pub fn parse(stdout: &[u8], direction: Direction) -> Result<(u64, u64), String> {
    let text = String::from_utf8_lossy(stdout);
    let json = text
        .find('{')
        .and_then(|start| text.get(start..))
        .ok_or("fio printed no JSON")?;
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("fio's JSON does not parse: {e}"))?;
    let job = value
        .pointer(&format!("/jobs/0/{}", direction.name()))
        .ok_or_else(|| format!("fio's JSON has no jobs[0].{}", direction.name()))?;
    let field = |name: &str| {
        job.get(name)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("fio's JSON has no jobs[0].{}.{name}", direction.name()))
    };
    let bw = field("bw_bytes")?;
    if bw == 0 {
        return Err(format!("fio reports 0 bytes/s for {}", direction.name()));
    }
    Ok((bw, field("runtime")?))
}

/// Removes fio's file; a missing file is fine.
pub fn remove_file(dir: &Path) -> std::io::Result<()> {
    let path: PathBuf = dir.join(FIO_FILE);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "gpusnap-write",
      "read" : { "io_bytes" : 0, "bw_bytes" : 0, "runtime" : 0 },
      "write" : { "io_bytes" : 67108864, "bw_bytes" : 330585536, "runtime" : 203 }
    }
  ]
}"#;

    #[test]
    fn bandwidth_is_read_from_the_first_job_after_any_preamble() {
        assert_eq!(
            parse(SAMPLE.as_bytes(), Direction::Write),
            Ok((330_585_536, 203))
        );
        assert!(
            parse(SAMPLE.as_bytes(), Direction::Read).is_err(),
            "0 B/s is an error"
        );
        assert!(parse(b"fio: engine io_uring not loadable", Direction::Write).is_err());
    }

    #[test]
    fn the_command_is_the_documented_one() {
        let a = args(
            Path::new("/d"),
            Direction::Read,
            4096,
            Setting::mib_blocks(16),
        )
        .join(" ");
        assert_eq!(
            a,
            "--name=gpusnap-read --directory=/d --filename=fio-bench.dat --ioengine=io_uring \
             --direct=1 --bs=1M --iodepth=16 --rw=read --size=4096 --numjobs=1 --end_fsync=1 \
             --output-format=json"
        );
        let wide = Setting {
            iodepth: 64,
            block: 4 << 20,
        };
        let a = args(Path::new("/d"), Direction::Write, 8 << 20, wide).join(" ");
        assert!(
            a.contains(" --bs=4M --iodepth=64 --rw=write --size=8388608 "),
            "{a}"
        );
    }

    #[test]
    fn blocks_are_spelled_as_fio_reads_them() {
        let bs = |block| Setting { iodepth: 1, block }.block_arg();
        assert_eq!(bs(1 << 20), "1M");
        assert_eq!(bs(4 << 20), "4M");
        assert_eq!(bs(64 << 10), "64K");
        assert_eq!(bs(4097), "4097");
        assert_eq!(Setting::mib_blocks(32).label(), "qd 32, bs 1M");
    }
}
