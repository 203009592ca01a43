//! What a client's devices did when they attached to a registration's
//! staging: the body of the `Attached` request (since version 3).
//!
//! The client attaches its devices only after it has the `Registered`
//! reply and the memfd (CUDA page-locks its mapping there), so it reports
//! afterwards, once per registration. Every string and count is bounded
//! ([`ATTACH_DEVICES_MAX`], [`DEVICE_NAME_BYTES_MAX`],
//! [`PIN_REASON_BYTES_MAX`]); [`AttachReport::new`] makes a report that
//! keeps the bounds whatever it is given, and [`check_reports`] is what the
//! daemon refuses (as a protocol error) when a client did not.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use serde::{Deserialize, Serialize};

/// Devices one `Attached` report may name (a client has one per CUDA
/// ordinal and one for host memory).
pub const ATTACH_DEVICES_MAX: usize = 64;
/// Bytes of a device's name (`"host"`, `"cuda:0"`).
pub const DEVICE_NAME_BYTES_MAX: usize = 64;
/// Bytes of the reason staging stayed unpinned.
pub const PIN_REASON_BYTES_MAX: usize = 1024;

/// What attaching one device did to the registration's staging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachReport {
    /// The device: `"host"`, `"cuda:0"`. Printable ASCII, no spaces, at
    /// most [`DEVICE_NAME_BYTES_MAX`] bytes.
    pub device: String,
    pub pin: PinState,
}

/// Whether a device page-locked the staging mapping for its copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum PinState {
    /// The device copies with plain memory access (host memory), or the
    /// staging is empty.
    NotNeeded,
    /// Page-locked: `bytes` of the mapping, in `pin_ns` (measured by the
    /// client; devices of one process share one registration, and each
    /// reports it).
    Pinned { bytes: u64, pin_ns: u64 },
    /// The driver refused to page-lock it (memory limits, too many
    /// registrations): copies use pageable memory, slower. `reason` is the
    /// driver's refusal, at most [`PIN_REASON_BYTES_MAX`] bytes, no
    /// control characters.
    Unpinned { reason: String },
}

impl PinState {
    /// The state's name as the wire says it (`"not_needed"`).
    pub const fn name(&self) -> &'static str {
        match self {
            PinState::NotNeeded => "not_needed",
            PinState::Pinned { .. } => "pinned",
            PinState::Unpinned { .. } => "unpinned",
        }
    }
}

impl AttachReport {
    /// A report that keeps every bound: the device name reduced to its
    /// printable, non-space ASCII characters (`"unnamed"` if none is left)
    /// and cut to [`DEVICE_NAME_BYTES_MAX`]; an unpinned reason with its
    /// control characters made spaces, cut (at a character boundary) to
    /// [`PIN_REASON_BYTES_MAX`], `"no reason given"` when empty.
    pub fn new(device: &str, pin: PinState) -> AttachReport {
        let mut name: String = device
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(DEVICE_NAME_BYTES_MAX)
            .collect();
        if name.is_empty() {
            name = "unnamed".to_owned();
        }
        let pin = match pin {
            PinState::Unpinned { reason } => {
                let mut cleaned = String::with_capacity(reason.len().min(PIN_REASON_BYTES_MAX));
                for c in reason.chars() {
                    let c = if c.is_control() { ' ' } else { c };
                    if cleaned.len() + c.len_utf8() > PIN_REASON_BYTES_MAX {
                        break;
                    }
                    cleaned.push(c);
                }
                let trimmed = cleaned.trim();
                PinState::Unpinned {
                    reason: if trimmed.is_empty() {
                        "no reason given".to_owned()
                    } else {
                        trimmed.to_owned()
                    },
                }
            }
            other => other,
        };
        AttachReport { device: name, pin }
    }
}

/// Why the daemon refuses an `Attached` report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachReportError {
    #[error("an attach report names no device")]
    NoDevices,
    #[error("an attach report names {count} devices; at most {ATTACH_DEVICES_MAX}")]
    TooManyDevices { count: usize },
    #[error(
        "device {index} of the attach report has a name of {bytes} bytes; 1 to {DEVICE_NAME_BYTES_MAX} printable ASCII characters without spaces"
    )]
    DeviceName { index: usize, bytes: usize },
    #[error(
        "device {device:?} reports an unpinned reason of {bytes} bytes; 1 to {PIN_REASON_BYTES_MAX}"
    )]
    ReasonLength { device: String, bytes: usize },
    #[error("device {device:?} reports an unpinned reason with control characters")]
    ReasonControl { device: String },
    #[error(
        "device {device:?} reports {bytes} bytes pinned, more than the {staging_bytes} bytes of staging"
    )]
    PinnedBeyondStaging {
        device: String,
        bytes: u64,
        staging_bytes: u64,
    },
}

/// Checks `reports` of a registration whose staging is `staging_bytes`
/// long: the bounds of [`AttachReport::new`], and no device pinning more
/// than the staging holds.
pub fn check_reports(
    reports: &[AttachReport],
    staging_bytes: u64,
) -> Result<(), AttachReportError> {
    if reports.is_empty() {
        return Err(AttachReportError::NoDevices);
    }
    if reports.len() > ATTACH_DEVICES_MAX {
        return Err(AttachReportError::TooManyDevices {
            count: reports.len(),
        });
    }
    for (index, report) in reports.iter().enumerate() {
        let name = &report.device;
        if name.is_empty()
            || name.len() > DEVICE_NAME_BYTES_MAX
            || !name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(AttachReportError::DeviceName {
                index,
                bytes: name.len(),
            });
        }
        match &report.pin {
            PinState::NotNeeded => {}
            PinState::Pinned { bytes, .. } => {
                if *bytes > staging_bytes {
                    return Err(AttachReportError::PinnedBeyondStaging {
                        device: name.clone(),
                        bytes: *bytes,
                        staging_bytes,
                    });
                }
            }
            PinState::Unpinned { reason } => {
                if reason.is_empty() || reason.len() > PIN_REASON_BYTES_MAX {
                    return Err(AttachReportError::ReasonLength {
                        device: name.clone(),
                        bytes: reason.len(),
                    });
                }
                if reason.chars().any(char::is_control) {
                    return Err(AttachReportError::ReasonControl {
                        device: name.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[expect(
    clippy::indexing_slicing,
    reason = "tests slice a list of known length"
)]
mod tests {
    use super::*;

    fn unpinned(reason: &str) -> PinState {
        PinState::Unpinned {
            reason: reason.into(),
        }
    }

    #[test]
    fn reports_made_by_new_always_pass_the_check() {
        let long_name = "cuda:".repeat(40);
        let long_reason = "é".repeat(PIN_REASON_BYTES_MAX); // 2 bytes each
        let cases = [
            AttachReport::new("host", PinState::NotNeeded),
            AttachReport::new(&long_name, unpinned(&long_reason)),
            AttachReport::new(" \n\t", unpinned("\n")),
            AttachReport::new(
                "cuda:0",
                PinState::Pinned {
                    bytes: 4096,
                    pin_ns: 7,
                },
            ),
            AttachReport::new("cuda 1", unpinned("out of memory\nline two\u{7}")),
        ];
        check_reports(&cases, 4096).expect("new keeps the bounds");
        assert_eq!(cases[1].device.len(), DEVICE_NAME_BYTES_MAX);
        let PinState::Unpinned { reason } = &cases[1].pin else {
            panic!("unpinned")
        };
        assert_eq!(reason.len(), PIN_REASON_BYTES_MAX, "cut at a char boundary");
        assert_eq!(cases[2].device, "unnamed");
        assert_eq!(cases[2].pin, unpinned("no reason given"));
        assert_eq!(cases[4].device, "cuda1");
        assert_eq!(cases[4].pin, unpinned("out of memory line two"));
    }

    #[test]
    fn the_check_refuses_what_breaks_a_bound_naming_it() {
        let ok = AttachReport::new("host", PinState::NotNeeded);
        assert_eq!(check_reports(&[], 0), Err(AttachReportError::NoDevices));
        let many = vec![ok.clone(); ATTACH_DEVICES_MAX + 1];
        assert_eq!(
            check_reports(&many, 0),
            Err(AttachReportError::TooManyDevices {
                count: ATTACH_DEVICES_MAX + 1
            })
        );
        check_reports(&many[..ATTACH_DEVICES_MAX], 0).expect("the maximum is allowed");
        for name in [
            "",
            "cuda 0",
            "cuda:\u{1b}",
            &"x".repeat(DEVICE_NAME_BYTES_MAX + 1),
        ] {
            let bad = AttachReport {
                device: name.into(),
                pin: PinState::NotNeeded,
            };
            assert!(
                matches!(
                    check_reports(&[ok.clone(), bad], 0),
                    Err(AttachReportError::DeviceName { index: 1, .. })
                ),
                "{name:?}"
            );
        }
        let with = |pin| AttachReport {
            device: "cuda:0".into(),
            pin,
        };
        assert!(matches!(
            check_reports(&[with(unpinned(""))], 0),
            Err(AttachReportError::ReasonLength { bytes: 0, .. })
        ));
        let long = "x".repeat(PIN_REASON_BYTES_MAX + 1);
        assert!(matches!(
            check_reports(&[with(unpinned(&long))], 0),
            Err(AttachReportError::ReasonLength { .. })
        ));
        assert!(matches!(
            check_reports(&[with(unpinned("a\nb"))], 0),
            Err(AttachReportError::ReasonControl { .. })
        ));
        let pinned = |bytes| with(PinState::Pinned { bytes, pin_ns: 1 });
        check_reports(&[pinned(8192)], 8192).expect("the whole staging");
        let err = check_reports(&[pinned(8193)], 8192).expect_err("beyond staging");
        assert!(err.to_string().contains("8193"), "{err}");
    }

    #[test]
    fn the_wire_form_names_the_state() {
        let report = AttachReport::new(
            "cuda:0",
            PinState::Pinned {
                bytes: 12288,
                pin_ns: 1_500_000,
            },
        );
        let text = serde_json::to_string(&report).expect("encode");
        assert_eq!(
            text,
            r#"{"device":"cuda:0","pin":{"state":"pinned","bytes":12288,"pin_ns":1500000}}"#
        );
        assert_eq!(
            serde_json::from_str::<AttachReport>(&text).expect("decode"),
            report
        );
        for state in [PinState::NotNeeded, unpinned("refused")] {
            let wire = serde_json::to_string(&state).expect("encode");
            assert!(
                wire.contains(&format!("\"state\":\"{}\"", state.name())),
                "{wire}"
            );
        }
        assert!(
            serde_json::from_str::<PinState>(r#"{"state":"pinned","bytes":1}"#).is_err(),
            "pin_ns is required"
        );
        assert!(
            serde_json::from_str::<PinState>(r#"{"state":"unpinned","reason":"r","x":1}"#).is_err(),
            "unknown fields are refused"
        );
    }
}
