//! System descriptions: which boot domains an image holds (`systems/*.toml`).
//!
//! A system file is hostile input like any other config: every field is checked here, where it
//! enters, and a bad one is refused with an error naming the file, the domain, the field, the
//! value found and what is allowed. The limits are the boot manifest's own
//! (`shared_abi::manifest`), so nothing this module accepts is refused later by `core-hv`.
//!
//! ```toml
//! [system]
//! description = "what this system is for"
//!
//! [[domain]]
//! name = "xenstore"                # unique; a-z A-Z 0-9 - _ . ; at most 32 bytes
//! crate = "xenstore-dom"           # the package that holds the domain binary
//! binary = "xenstore-dom"          # optional; defaults to the crate name
//! memory_mib = 16                  # 1..=65536
//! vcpus = 1                        # optional, 1..=32, default 1
//! weight = 256                     # optional, 1..=65535, default 256
//! cap = 0                          # optional, percent of one CPU, 0..=100*vcpus, 0 = uncapped
//! capabilities = ["xenstore_service"]
//! cmdline = ""                     # optional, at most 1024 bytes
//! # optional, at most 16 entries, needs the device_owner capability; each entry names exactly
//! # one of bdf ([segment:]bus:device.function), id ("vendor" or "vendor:device", hex) or
//! # class ("base", "base.sub" or "base.sub.prog_if", hex). insecure_dma (default false) lets
//! # the device master the bus when no IOMMU confines it.
//! devices = [{ id = "1af4:1001" }, { bdf = "00:03.0", insecure_dma = false }]
//! # optional, each "destroy" (default), "restart" or "preserve": what a control domain
//! # (ctl-dom) does when this domain powers off, reboots or crashes; restart is refused for
//! # a domain holding domain_control or xenstore_service
//! on_poweroff = "destroy"
//! on_reboot = "destroy"
//! on_crash = "restart"
//! ```
//!
//! An optional `[machine]` table names the emulated devices the system's driver domains own
//! (see [`crate::machine`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shared_abi::capability::Capabilities;
use shared_abi::domain_config::LifecycleAction;
use shared_abi::manifest::{
    Blob, DomainSpec, MAX_BOOT_DOMAINS, MAX_CMDLINE_LEN, MAX_MEMORY_KIB, MAX_NAME_LEN, MAX_VCPUS,
    MAX_WEIGHT, MIN_MEMORY_KIB,
};
use shared_abi::pci::{DeviceAssignment, DeviceMatch, MAX_DEVICE_MATCHES, PciAddress};

use crate::machine::{Machine, RawMachine};

/// Default credit-scheduler weight (Xen's default too).
pub const DEFAULT_WEIGHT: u32 = 256;
/// Smallest and largest `memory_mib` (the manifest's KiB limits, in whole MiB).
pub const MIN_MEMORY_MIB: u64 = MIN_MEMORY_KIB.div_ceil(1024);
pub const MAX_MEMORY_MIB: u64 = MAX_MEMORY_KIB / 1024;
/// Longest crate or binary name accepted (cargo's own limit is 64).
pub const MAX_CRATE_NAME_LEN: usize = 64;

/// A validated system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct System {
    /// The file it came from.
    pub path: PathBuf,
    /// The file's stem (`default` for `systems/default.toml`): names the image.
    pub name: String,
    pub description: String,
    pub domains: Vec<DomainConfig>,
    /// Devices QEMU must emulate for it.
    pub machine: Machine,
}

/// One validated boot domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    pub name: String,
    /// The cargo package that holds the domain binary.
    pub krate: String,
    /// The binary target to build and pack.
    pub binary: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub weight: u32,
    pub cap_percent: u32,
    pub capabilities: Capabilities,
    pub cmdline: String,
    /// The PCI functions the domain owns.
    pub devices: Vec<DeviceAssignment>,
    pub on_poweroff: LifecycleAction,
    pub on_reboot: LifecycleAction,
    pub on_crash: LifecycleAction,
}

impl DomainConfig {
    /// The manifest entry for this domain; `build_image` fills in where its ELF lies.
    pub fn spec(&self) -> DomainSpec {
        DomainSpec {
            name: self.name.clone(),
            elf: Blob { offset: 0, len: 0 },
            memory_kib: self.memory_mib * 1024,
            vcpus: self.vcpus,
            weight: self.weight,
            cap_percent: self.cap_percent,
            capabilities: self.capabilities,
            cmdline: self.cmdline.clone(),
            devices: self.devices.clone(),
            on_poweroff: self.on_poweroff,
            on_reboot: self.on_reboot,
            on_crash: self.on_crash,
        }
    }
}

/// Where in the file a problem is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub path: PathBuf,
    /// `domain[index]` and its name (if it had a usable one).
    pub domain: Option<(usize, String)>,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        match &self.domain {
            Some((i, name)) if !name.is_empty() => write!(f, ": domain[{i}] ({name})"),
            Some((i, _)) => write!(f, ": domain[{i}]"),
            None => Ok(()),
        }
    }
}

/// Why a system file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("{path}: cannot read the system file: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{place}: {field} = {value} is outside the allowed range {allowed}")]
    OutOfRange {
        place: Place,
        field: &'static str,
        value: i64,
        allowed: String,
    },
    #[error("{place}: {field} = {value:?} is not allowed: {allowed}")]
    Invalid {
        place: Place,
        field: &'static str,
        value: String,
        allowed: String,
    },
    #[error("{path}: {count} domains listed, at most {MAX_BOOT_DOMAINS} allowed")]
    TooManyDomains { path: String, count: usize },
}

impl SystemError {
    /// The field a validation error names (for tests and tooling).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            SystemError::OutOfRange { field, .. } | SystemError::Invalid { field, .. } => {
                Some(field)
            }
            _ => None,
        }
    }
}

// The file as written. Integers are read as i64 so that a negative or huge value is reported
// with its field and range by `validate`, not as a bare type error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSystem {
    #[serde(default)]
    system: RawHeader,
    #[serde(default, rename = "domain")]
    domains: Vec<RawDomain>,
    #[serde(default)]
    machine: RawMachine,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    name: String,
    #[serde(rename = "crate")]
    krate: String,
    binary: Option<String>,
    memory_mib: i64,
    vcpus: Option<i64>,
    weight: Option<i64>,
    cap: Option<i64>,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    cmdline: String,
    #[serde(default)]
    devices: Vec<RawDevice>,
    on_poweroff: Option<String>,
    on_reboot: Option<String>,
    on_crash: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    bdf: Option<String>,
    id: Option<String>,
    class: Option<String>,
    #[serde(default)]
    insecure_dma: bool,
}

/// Read and validate a system file.
pub fn load(path: &Path) -> Result<System, SystemError> {
    let text = std::fs::read_to_string(path).map_err(|source| SystemError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(path, &text)
}

/// Validate the text of a system file (`path` names it in errors and gives the system's name).
pub fn parse(path: &Path, text: &str) -> Result<System, SystemError> {
    let raw: RawSystem = toml::from_str(text).map_err(|e| SystemError::Syntax {
        path: path.display().to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;
    if raw.domains.len() > MAX_BOOT_DOMAINS {
        return Err(SystemError::TooManyDomains {
            path: path.display().to_string(),
            count: raw.domains.len(),
        });
    }
    let machine =
        raw.machine
            .validate()
            .map_err(|(field, value, allowed)| SystemError::Invalid {
                place: Place {
                    path: path.to_path_buf(),
                    domain: None,
                },
                field,
                value,
                allowed,
            })?;
    let mut domains: Vec<DomainConfig> = Vec::with_capacity(raw.domains.len());
    for (index, d) in raw.domains.into_iter().enumerate() {
        let place = Place {
            path: path.to_path_buf(),
            domain: Some((index, d.name.clone())),
        };
        let checked = validate_domain(&place, d)?;
        if domains.iter().any(|e| e.name == checked.name) {
            return Err(SystemError::Invalid {
                place,
                field: "name",
                value: checked.name,
                allowed: "each domain needs a name no earlier domain uses".into(),
            });
        }
        domains.push(checked);
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "system".into());
    Ok(System {
        path: path.to_path_buf(),
        name,
        description: raw.system.description,
        domains,
        machine,
    })
}

fn range(
    place: &Place,
    field: &'static str,
    value: i64,
    min: i64,
    max: i64,
) -> Result<i64, SystemError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(SystemError::OutOfRange {
            place: place.clone(),
            field,
            value,
            allowed: format!("{min}..={max}"),
        })
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn is_crate_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_')
}

fn check_crate_name(place: &Place, field: &'static str, v: &str) -> Result<(), SystemError> {
    if v.is_empty() || v.len() > MAX_CRATE_NAME_LEN || !v.chars().all(is_crate_char) {
        return Err(SystemError::Invalid {
            place: place.clone(),
            field,
            value: v.into(),
            allowed: format!("1 to {MAX_CRATE_NAME_LEN} characters of a-z A-Z 0-9 - _"),
        });
    }
    Ok(())
}

fn validate_domain(place: &Place, d: RawDomain) -> Result<DomainConfig, SystemError> {
    if d.name.is_empty() || d.name.len() > MAX_NAME_LEN || !d.name.chars().all(is_name_char) {
        return Err(SystemError::Invalid {
            place: place.clone(),
            field: "name",
            value: d.name,
            allowed: format!("1 to {MAX_NAME_LEN} characters of a-z A-Z 0-9 - _ ."),
        });
    }
    check_crate_name(place, "crate", &d.krate)?;
    let binary = d.binary.unwrap_or_else(|| d.krate.clone());
    check_crate_name(place, "binary", &binary)?;
    let memory_mib = range(
        place,
        "memory_mib",
        d.memory_mib,
        MIN_MEMORY_MIB as i64,
        MAX_MEMORY_MIB as i64,
    )?;
    let vcpus = range(place, "vcpus", d.vcpus.unwrap_or(1), 1, MAX_VCPUS.into())?;
    let weight = range(
        place,
        "weight",
        d.weight.unwrap_or(DEFAULT_WEIGHT.into()),
        1,
        MAX_WEIGHT.into(),
    )?;
    let cap = range(place, "cap", d.cap.unwrap_or(0), 0, 100 * vcpus)?;
    let mut capabilities = Capabilities::empty();
    for name in &d.capabilities {
        let Some(c) = Capabilities::from_config_name(name) else {
            let known: Vec<&str> = Capabilities::NAMES.iter().map(|(n, _)| *n).collect();
            return Err(SystemError::Invalid {
                place: place.clone(),
                field: "capabilities",
                value: name.clone(),
                allowed: format!("one of {}", known.join(", ")),
            });
        };
        if capabilities.contains(c) {
            return Err(SystemError::Invalid {
                place: place.clone(),
                field: "capabilities",
                value: name.clone(),
                allowed: "each capability at most once".into(),
            });
        }
        capabilities |= c;
    }
    if d.cmdline.len() > MAX_CMDLINE_LEN {
        return Err(SystemError::OutOfRange {
            place: place.clone(),
            field: "cmdline length",
            value: d.cmdline.len() as i64,
            allowed: format!("0..={MAX_CMDLINE_LEN} bytes"),
        });
    }
    if d.devices.len() > MAX_DEVICE_MATCHES {
        return Err(SystemError::OutOfRange {
            place: place.clone(),
            field: "devices length",
            value: d.devices.len() as i64,
            allowed: format!("0..={MAX_DEVICE_MATCHES} entries"),
        });
    }
    let devices = d
        .devices
        .iter()
        .map(|raw| validate_device(place, raw))
        .collect::<Result<Vec<_>, _>>()?;
    if !devices.is_empty() && !capabilities.contains(Capabilities::DEVICE_OWNER) {
        return Err(SystemError::Invalid {
            place: place.clone(),
            field: "devices",
            value: format!("{} entries", devices.len()),
            allowed: "only for a domain with the device_owner capability".into(),
        });
    }
    let action =
        |field: &'static str, v: &Option<String>| -> Result<LifecycleAction, SystemError> {
            let Some(v) = v else {
                return Ok(LifecycleAction::Destroy);
            };
            let a = LifecycleAction::from_name(v).ok_or_else(|| SystemError::Invalid {
                place: place.clone(),
                field,
                value: v.clone(),
                allowed: "one of destroy, restart, preserve".into(),
            })?;
            if a == LifecycleAction::Restart
                && capabilities
                    .intersects(Capabilities::DOMAIN_CONTROL | Capabilities::XENSTORE_SERVICE)
            {
                return Err(SystemError::Invalid {
                    place: place.clone(),
                    field,
                    value: v.clone(),
                    allowed: "destroy or preserve for a domain holding domain_control or \
                          xenstore_service (it cannot be restarted safely)"
                        .into(),
                });
            }
            Ok(a)
        };
    let on_poweroff = action("on_poweroff", &d.on_poweroff)?;
    let on_reboot = action("on_reboot", &d.on_reboot)?;
    let on_crash = action("on_crash", &d.on_crash)?;
    // Every conversion below is in range: each value was checked against a u32/u64 limit.
    Ok(DomainConfig {
        name: d.name,
        krate: d.krate,
        binary,
        memory_mib: memory_mib as u64,
        vcpus: vcpus as u32,
        weight: weight as u32,
        cap_percent: cap as u32,
        capabilities,
        cmdline: d.cmdline,
        devices,
        on_poweroff,
        on_reboot,
        on_crash,
    })
}

/// Hex field of at most `max_len` digits.
fn hex_field(t: &str, max_len: usize) -> Option<u32> {
    if t.is_empty() || t.len() > max_len || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(t, 16).ok()
}

/// `vvvv` or `vvvv:dddd`.
fn parse_id(s: &str) -> Option<DeviceMatch> {
    let (v, d) = match s.split_once(':') {
        Some((v, d)) => (v, Some(d)),
        None => (s, None),
    };
    let vendor = hex_field(v, 4)? as u16;
    let device = match d {
        Some(d) => Some(hex_field(d, 4)? as u16),
        None => None,
    };
    Some(DeviceMatch::Id { vendor, device })
}

/// `cc`, `cc.ss` or `cc.ss.pp`.
fn parse_class(s: &str) -> Option<DeviceMatch> {
    let mut parts = s.split('.');
    let base = hex_field(parts.next()?, 2)? as u8;
    let sub = match parts.next() {
        Some(t) => Some(hex_field(t, 2)? as u8),
        None => None,
    };
    let prog_if = match parts.next() {
        Some(t) => Some(hex_field(t, 2)? as u8),
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(DeviceMatch::Class { base, sub, prog_if })
}

fn validate_device(place: &Place, d: &RawDevice) -> Result<DeviceAssignment, SystemError> {
    let invalid = |field: &'static str, value: &str, allowed: String| SystemError::Invalid {
        place: place.clone(),
        field,
        value: value.into(),
        allowed,
    };
    let select = match (&d.bdf, &d.id, &d.class) {
        (Some(b), None, None) => DeviceMatch::Address(
            b.parse::<PciAddress>()
                .map_err(|e| invalid("devices.bdf", b, e.to_string()))?,
        ),
        (None, Some(i), None) => parse_id(i).ok_or_else(|| {
            invalid(
                "devices.id",
                i,
                "\"vendor\" or \"vendor:device\", each 1 to 4 hex digits".into(),
            )
        })?,
        (None, None, Some(c)) => parse_class(c).ok_or_else(|| {
            invalid(
                "devices.class",
                c,
                "\"base\", \"base.sub\" or \"base.sub.prog_if\", each 1 to 2 hex digits".into(),
            )
        })?,
        _ => {
            let given: Vec<&str> = [("bdf", &d.bdf), ("id", &d.id), ("class", &d.class)]
                .iter()
                .filter(|(_, v)| v.is_some())
                .map(|(n, _)| *n)
                .collect();
            return Err(invalid(
                "devices",
                &format!("{{ {} }}", given.join(", ")),
                "each entry names exactly one of bdf, id or class".into(),
            ));
        }
    };
    let field = match select {
        DeviceMatch::Address(_) => "devices.bdf",
        DeviceMatch::Id { .. } => "devices.id",
        DeviceMatch::Class { .. } => "devices.class",
    };
    let value = d.bdf.as_ref().or(d.id.as_ref()).or(d.class.as_ref());
    select
        .validate()
        .map_err(|e| invalid(field, value.map_or("", |v| v.as_str()), e.to_string()))?;
    Ok(DeviceAssignment {
        select,
        insecure_dma: d.insecure_dma,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<System, SystemError> {
        parse(Path::new("systems/test.toml"), text)
    }

    const GOOD: &str = r#"
        [system]
        description = "two domains"

        [[domain]]
        name = "xenstore"
        crate = "xenstore-dom"
        memory_mib = 16
        capabilities = ["xenstore_service", "grant_map"]

        [[domain]]
        name = "blk"
        crate = "blkback-dom"
        binary = "blkback"
        memory_mib = 32
        vcpus = 2
        weight = 512
        cap = 150
        cmdline = "disk=0"
    "#;

    #[test]
    fn good_system_parses_with_defaults_filled_in() {
        let s = parse_str(GOOD).unwrap();
        assert_eq!(s.name, "test");
        assert_eq!(s.description, "two domains");
        assert_eq!(s.domains.len(), 2);
        let x = &s.domains[0];
        assert_eq!(x.binary, "xenstore-dom");
        assert_eq!((x.vcpus, x.weight, x.cap_percent), (1, DEFAULT_WEIGHT, 0));
        assert_eq!(
            x.capabilities,
            Capabilities::XENSTORE_SERVICE | Capabilities::GRANT_MAP
        );
        let b = &s.domains[1];
        assert_eq!(b.binary, "blkback");
        assert_eq!((b.vcpus, b.weight, b.cap_percent), (2, 512, 150));
        assert_eq!(b.spec().memory_kib, 32 * 1024);
        assert_eq!(b.spec().cmdline, "disk=0");
    }

    #[test]
    fn empty_system_has_no_domains() {
        let s = parse_str("").unwrap();
        assert!(s.domains.is_empty());
    }

    #[test]
    fn shipped_systems_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systems");
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                load(&path).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    #[test]
    fn a_bad_machine_table_names_the_file_and_field() {
        let e = parse_str("[machine]\n[[machine.nic]]\naddr = \"zz\"\n").unwrap_err();
        assert_eq!(e.field(), Some("machine.nic.addr"));
        assert!(
            e.to_string()
                .starts_with("systems/test.toml: machine.nic.addr"),
            "{e}"
        );
        let e = parse_str("[machine]\nfloppy = true\n").unwrap_err();
        assert!(e.to_string().contains("floppy"), "{e}");
    }

    fn one_domain(extra: &str) -> String {
        format!("[[domain]]\nname = \"d\"\ncrate = \"dom\"\nmemory_mib = 4\n{extra}\n")
    }

    #[test]
    fn out_of_range_values_name_field_value_and_range() {
        let cases = [
            (
                "vcpus = 0",
                "vcpus",
                "vcpus = 0 is outside the allowed range 1..=32",
            ),
            (
                "vcpus = 33",
                "vcpus",
                "vcpus = 33 is outside the allowed range 1..=32",
            ),
            (
                "weight = 0",
                "weight",
                "weight = 0 is outside the allowed range 1..=65535",
            ),
            ("weight = -5", "weight", "weight = -5 is outside"),
            (
                "cap = 101",
                "cap",
                "cap = 101 is outside the allowed range 0..=100",
            ),
            (
                "vcpus = 2\ncap = 201",
                "cap",
                "cap = 201 is outside the allowed range 0..=200",
            ),
        ];
        for (extra, field, text) in cases {
            let e = parse_str(&one_domain(extra)).unwrap_err();
            assert_eq!(e.field(), Some(field), "{extra}");
            let msg = e.to_string();
            assert!(msg.contains(text), "{extra}: {msg}");
            assert!(
                msg.starts_with("systems/test.toml: domain[0] (d): "),
                "{msg}"
            );
        }
    }

    #[test]
    fn memory_outside_manifest_limits_is_refused() {
        let text = one_domain("").replace("memory_mib = 4", "memory_mib = 0");
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.field(), Some("memory_mib"));
        assert!(
            e.to_string()
                .contains("memory_mib = 0 is outside the allowed range 1..=65536")
        );
        let text = one_domain("").replace("memory_mib = 4", "memory_mib = 65537");
        assert_eq!(parse_str(&text).unwrap_err().field(), Some("memory_mib"));
    }

    #[test]
    fn unknown_capability_lists_the_known_ones() {
        let e = parse_str(&one_domain("capabilities = [\"root\"]")).unwrap_err();
        assert_eq!(e.field(), Some("capabilities"));
        let msg = e.to_string();
        assert!(
            msg.contains("capabilities = \"root\" is not allowed"),
            "{msg}"
        );
        assert!(msg.contains("domain_control"), "{msg}");
        let e = parse_str(&one_domain("capabilities = [\"grant_map\", \"grant_map\"]"));
        assert_eq!(e.unwrap_err().field(), Some("capabilities"));
    }

    #[test]
    fn bad_names_and_duplicates_are_refused() {
        let bad = one_domain("").replace("name = \"d\"", "name = \"has space\"");
        assert_eq!(parse_str(&bad).unwrap_err().field(), Some("name"));
        let long =
            one_domain("").replace("name = \"d\"", &format!("name = \"{}\"", "x".repeat(33)));
        assert_eq!(parse_str(&long).unwrap_err().field(), Some("name"));
        let dup = format!("{}{}", one_domain(""), one_domain(""));
        let e = parse_str(&dup).unwrap_err();
        assert_eq!(e.field(), Some("name"));
        assert!(e.to_string().contains("domain[1] (d)"), "{e}");
        let badcrate = one_domain("").replace("crate = \"dom\"", "crate = \"../evil\"");
        assert_eq!(parse_str(&badcrate).unwrap_err().field(), Some("crate"));
        assert_eq!(
            parse_str(&one_domain("binary = \"\"")).unwrap_err().field(),
            Some("binary")
        );
    }

    #[test]
    fn long_cmdline_is_refused() {
        let extra = format!("cmdline = \"{}\"", "a".repeat(MAX_CMDLINE_LEN + 1));
        let e = parse_str(&one_domain(&extra)).unwrap_err();
        assert_eq!(e.field(), Some("cmdline length"));
    }

    #[test]
    fn unknown_and_missing_fields_and_bad_types_are_syntax_errors_naming_the_key() {
        let e = parse_str(&one_domain("vcpu = 2")).unwrap_err();
        assert!(matches!(e, SystemError::Syntax { .. }));
        assert!(e.to_string().contains("vcpu"), "{e}");
        let e = parse_str("[[domain]]\nname = \"d\"\ncrate = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("memory_mib"), "{e}");
        let e = parse_str(&one_domain("vcpus = \"two\"")).unwrap_err();
        assert!(e.to_string().contains("vcpus"), "{e}");
    }

    #[test]
    fn too_many_domains_are_refused() {
        let text: String = (0..=MAX_BOOT_DOMAINS)
            .map(|i| one_domain("").replace("name = \"d\"", &format!("name = \"d{i}\"")))
            .collect();
        assert!(matches!(
            parse_str(&text).unwrap_err(),
            SystemError::TooManyDomains { count: 65, .. }
        ));
    }

    #[test]
    fn devices_parse_by_bdf_id_and_class() {
        let s = parse_str(&one_domain(
            "capabilities = [\"device_owner\"]\ndevices = [{ id = \"1af4:1001\" }, \
             { bdf = \"00:03.0\", insecure_dma = true }, { id = \"8086\" }, { class = \"01.08\" }]",
        ))
        .unwrap();
        let d = &s.domains[0].devices;
        assert_eq!(d.len(), 4);
        assert_eq!(
            d[0].select,
            DeviceMatch::Id {
                vendor: 0x1af4,
                device: Some(0x1001)
            }
        );
        assert!(!d[0].insecure_dma);
        assert_eq!(
            d[1].select,
            DeviceMatch::Address(PciAddress::new(0, 0, 3, 0).unwrap())
        );
        assert!(d[1].insecure_dma);
        assert_eq!(
            d[2].select,
            DeviceMatch::Id {
                vendor: 0x8086,
                device: None
            }
        );
        assert_eq!(
            d[3].select,
            DeviceMatch::Class {
                base: 1,
                sub: Some(8),
                prog_if: None
            }
        );
        assert_eq!(s.domains[0].spec().devices, *d);
    }

    #[test]
    fn lifecycle_policies_default_to_destroy_and_are_validated() {
        let s = parse_str(&one_domain("")).unwrap();
        let d = &s.domains[0];
        assert_eq!(
            (d.on_poweroff, d.on_reboot, d.on_crash),
            (
                LifecycleAction::Destroy,
                LifecycleAction::Destroy,
                LifecycleAction::Destroy
            )
        );
        let s = parse_str(&one_domain(
            "on_crash = \"restart\"\non_reboot = \"preserve\"",
        ))
        .unwrap();
        let spec = s.domains[0].spec();
        assert_eq!(spec.on_crash, LifecycleAction::Restart);
        assert_eq!(spec.on_reboot, LifecycleAction::Preserve);
        let e = parse_str(&one_domain("on_crash = \"reboot\"")).unwrap_err();
        assert_eq!(e.field(), Some("on_crash"));
        assert!(
            e.to_string().contains("one of destroy, restart, preserve"),
            "{e}"
        );
        let e = parse_str(&one_domain(
            "capabilities = [\"domain_control\"]\non_poweroff = \"restart\"",
        ))
        .unwrap_err();
        assert_eq!(e.field(), Some("on_poweroff"));
    }

    #[test]
    fn bad_device_entries_name_the_field() {
        let with = |devices: &str| {
            parse_str(&one_domain(&format!(
                "capabilities = [\"device_owner\"]\ndevices = [{devices}]"
            )))
        };
        let cases = [
            ("{ bdf = \"00:20.0\" }", "devices.bdf", "above 0x1f"),
            (
                "{ bdf = \"nonsense\" }",
                "devices.bdf",
                "bus:device.function",
            ),
            ("{ id = \"12345\" }", "devices.id", "1 to 4 hex digits"),
            ("{ id = \"ffff\" }", "devices.id", "0xffff"),
            ("{ id = \"1af4:\" }", "devices.id", "vendor:device"),
            ("{ class = \"01.x\" }", "devices.class", "base.sub"),
            ("{ class = \"01.00.00.00\" }", "devices.class", "base.sub"),
            (
                "{ id = \"1af4\", bdf = \"00:03.0\" }",
                "devices",
                "exactly one",
            ),
            ("{ insecure_dma = true }", "devices", "exactly one"),
        ];
        for (entry, field, text) in cases {
            let e = with(entry).unwrap_err();
            assert_eq!(e.field(), Some(field), "{entry}");
            assert!(e.to_string().contains(text), "{entry}: {e}");
        }
        let e = with("{ vendor = \"1af4\" }").unwrap_err();
        assert!(matches!(e, SystemError::Syntax { .. }), "{e}");
    }

    #[test]
    fn devices_need_device_owner_and_at_most_sixteen_entries() {
        let e = parse_str(&one_domain("devices = [{ id = \"1af4\" }]")).unwrap_err();
        assert_eq!(e.field(), Some("devices"));
        assert!(e.to_string().contains("device_owner"), "{e}");
        let many = vec!["{ id = \"1af4\" }"; MAX_DEVICE_MATCHES + 1].join(", ");
        let e = parse_str(&one_domain(&format!(
            "capabilities = [\"device_owner\"]\ndevices = [{many}]"
        )))
        .unwrap_err();
        assert_eq!(e.field(), Some("devices length"));
        assert!(e.to_string().contains("17 is outside"), "{e}");
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let e = load(Path::new("/nonexistent/system.toml")).unwrap_err();
        assert!(matches!(e, SystemError::Read { .. }));
    }
}
