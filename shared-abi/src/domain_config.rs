//! A domain config as it crosses the management channel: the validated, typed form of an
//! xl.cfg-like TOML file (`hvctl` parses the TOML; this is what it sends).
//!
//! Invariant: [`DomainConfig::validate`] is the one validator. `hvctl` calls it before
//! sending anything, and `ctl-dom` calls it again on what arrives (the channel is a boundary
//! and a config is hostile input), before any builder step runs. Every refusal is a
//! [`ConfigError`] naming the field, the value found and what is allowed.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::capability::Capabilities;
use crate::manifest::{
    MAX_CMDLINE_LEN, MAX_MEMORY_KIB, MAX_NAME_LEN, MAX_VCPUS, MAX_WEIGHT, MIN_MEMORY_KIB,
};

/// Most virtual disks one domain may have.
pub const MAX_DISKS: usize = 16;
/// Most virtual network interfaces one domain may have.
pub const MAX_VIFS: usize = 8;
/// Longest disk target (backing path or volume name).
pub const MAX_TARGET_LEN: usize = 255;
/// Longest virtual device name (`xvda`).
pub const MAX_VDEV_LEN: usize = 16;
/// Highest rate limit a vif may ask for: 100 Gbit/s in bytes per second.
pub const MAX_RATE_BYTES_PER_SEC: u64 = 100_000_000_000 / 8;
/// Rights a domain built at run time may never be granted: they would let it take over
/// the toolstack's or the xenstore domain's role. Refused by policy, not by syntax.
pub const RUNTIME_FORBIDDEN_CAPS: Capabilities =
    Capabilities::DOMAIN_CONTROL.union(Capabilities::XENSTORE_SERVICE);

/// What happens when a domain powers off, reboots or crashes (xl's `on_*` actions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LifecycleAction {
    /// Tear it down and free everything.
    Destroy,
    /// Tear it down and build it again from the same config and kernel.
    Restart,
    /// Leave it dead but present (memory kept) for inspection, until destroyed.
    Preserve,
}

impl LifecycleAction {
    pub const NAMES: &'static [(&'static str, LifecycleAction)] = &[
        ("destroy", LifecycleAction::Destroy),
        ("restart", LifecycleAction::Restart),
        ("preserve", LifecycleAction::Preserve),
    ];

    pub fn from_name(s: &str) -> Option<Self> {
        Self::NAMES.iter().find(|(n, _)| *n == s).map(|(_, a)| *a)
    }

    pub fn name(self) -> &'static str {
        match self {
            LifecycleAction::Destroy => "destroy",
            LifecycleAction::Restart => "restart",
            LifecycleAction::Preserve => "preserve",
        }
    }

    /// The byte code in `domctl` answers (`BootDomain`): 0 destroy, 1 restart, 2 preserve.
    pub fn code(self) -> u8 {
        match self {
            LifecycleAction::Destroy => 0,
            LifecycleAction::Restart => 1,
            LifecycleAction::Preserve => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => LifecycleAction::Destroy,
            1 => LifecycleAction::Restart,
            2 => LifecycleAction::Preserve,
            _ => return None,
        })
    }
}

/// Disk access mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskAccess {
    ReadOnly,
    ReadWrite,
}

/// One virtual disk (`disk = [...]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// What the backend serves: a volume name or path inside the backend domain.
    pub target: String,
    /// The name the guest sees (`xvda`..).
    pub vdev: String,
    pub access: DiskAccess,
    /// The backend domain's name; `None` = the system's default block backend.
    pub backend: Option<String>,
}

/// One virtual network interface (`vif = [...]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VifSpec {
    /// `None` = the toolstack picks one in Xen's 00:16:3e OUI.
    pub mac: Option<[u8; 6]>,
    pub ip: Option<[u8; 4]>,
    /// Transmit rate limit in bytes per second; `None` = unlimited.
    pub rate_bytes_per_sec: Option<u64>,
    pub backend: Option<String>,
}

/// A whole domain config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainConfig {
    pub name: String,
    pub memory_kib: u64,
    /// Ceiling for `mem-set` / balloon growth; at least `memory_kib`.
    pub maxmem_kib: u64,
    pub vcpus: u32,
    pub weight: u32,
    /// Percent of one CPU; 0 = uncapped.
    pub cap_percent: u32,
    pub cmdline: String,
    pub disks: Vec<DiskSpec>,
    pub vifs: Vec<VifSpec>,
    pub on_poweroff: LifecycleAction,
    pub on_reboot: LifecycleAction,
    pub on_crash: LifecycleAction,
    pub capabilities: Capabilities,
}

impl DomainConfig {
    /// A config with xl's defaults for everything but the name and memory.
    pub fn new(name: &str, memory_kib: u64) -> Self {
        DomainConfig {
            name: name.to_string(),
            memory_kib,
            maxmem_kib: memory_kib,
            vcpus: 1,
            weight: 256,
            cap_percent: 0,
            cmdline: String::new(),
            disks: Vec::new(),
            vifs: Vec::new(),
            on_poweroff: LifecycleAction::Destroy,
            on_reboot: LifecycleAction::Restart,
            on_crash: LifecycleAction::Destroy,
            capabilities: Capabilities::empty(),
        }
    }
}

/// Why a config was refused: the field, the value found and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `vif[1].mac`.
    pub field: String,
    pub value: String,
    pub allowed: String,
}

impl ConfigError {
    pub fn new(
        field: impl Into<String>,
        value: impl fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        ConfigError {
            field: field.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} is not allowed; allowed: {}",
            self.field, self.value, self.allowed
        )
    }
}

/// Whether `s` is a valid domain (or backend) name: the manifest's rule.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

const NAME_RULE: &str = "1..=32 characters from A-Z a-z 0-9 - _ .";

fn quoted(s: &str) -> String {
    // Bounded so a hostile 1 MiB string does not come back in an error message whole.
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    format!("{out:?}")
}

/// Whether `vdev` is an `xvd` name: `xvd` followed by 1..=3 lowercase letters.
fn valid_vdev(vdev: &str) -> bool {
    vdev.len() <= MAX_VDEV_LEN
        && vdev.strip_prefix("xvd").is_some_and(|s| {
            (1..=3).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_lowercase())
        })
}

impl DomainConfig {
    /// Check every field; the first problem found is the answer.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_name(&self.name) {
            return Err(ConfigError::new("name", quoted(&self.name), NAME_RULE));
        }
        let mem_rule = format!("{MIN_MEMORY_KIB}..={MAX_MEMORY_KIB} KiB, a multiple of 4 KiB");
        if !(MIN_MEMORY_KIB..=MAX_MEMORY_KIB).contains(&self.memory_kib)
            || !self.memory_kib.is_multiple_of(4)
        {
            return Err(ConfigError::new(
                "memory",
                format!("{} KiB", self.memory_kib),
                mem_rule,
            ));
        }
        if self.maxmem_kib < self.memory_kib
            || self.maxmem_kib > MAX_MEMORY_KIB
            || !self.maxmem_kib.is_multiple_of(4)
        {
            return Err(ConfigError::new(
                "maxmem",
                format!("{} KiB", self.maxmem_kib),
                format!(
                    "{}..={MAX_MEMORY_KIB} KiB (at least memory), a multiple of 4 KiB",
                    self.memory_kib
                ),
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::new(
                "vcpus",
                self.vcpus,
                format!("1..={MAX_VCPUS}"),
            ));
        }
        if !(1..=MAX_WEIGHT).contains(&self.weight) {
            return Err(ConfigError::new(
                "weight",
                self.weight,
                format!("1..={MAX_WEIGHT}"),
            ));
        }
        let max_cap = 100 * self.vcpus;
        if self.cap_percent > max_cap {
            return Err(ConfigError::new(
                "cap",
                self.cap_percent,
                format!("0..={max_cap} (0 = uncapped; 100 per vcpu)"),
            ));
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::new(
                "cmdline",
                format!("{} bytes", self.cmdline.len()),
                format!("at most {MAX_CMDLINE_LEN} bytes"),
            ));
        }
        let unknown = self.capabilities.bits() & !Capabilities::all().bits();
        if unknown != 0 {
            return Err(ConfigError::new(
                "capabilities",
                format!("bits {unknown:#x}"),
                "names from the capability list",
            ));
        }
        self.validate_disks()?;
        self.validate_vifs()
    }

    fn validate_disks(&self) -> Result<(), ConfigError> {
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::new(
                "disk",
                format!("{} entries", self.disks.len()),
                format!("at most {MAX_DISKS} entries"),
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if d.target.is_empty() || d.target.len() > MAX_TARGET_LEN || d.target.contains('\0') {
                return Err(ConfigError::new(
                    format!("disk[{i}].target"),
                    quoted(&d.target),
                    format!("1..={MAX_TARGET_LEN} bytes, no NUL"),
                ));
            }
            if !valid_vdev(&d.vdev) {
                return Err(ConfigError::new(
                    format!("disk[{i}].vdev"),
                    quoted(&d.vdev),
                    "xvd followed by 1..=3 lowercase letters (xvda, xvdb, ...)",
                ));
            }
            if self.disks[..i].iter().any(|o| o.vdev == d.vdev) {
                return Err(ConfigError::new(
                    format!("disk[{i}].vdev"),
                    quoted(&d.vdev),
                    "a vdev not used by an earlier disk",
                ));
            }
            if let Some(b) = &d.backend
                && !valid_name(b)
            {
                return Err(ConfigError::new(
                    format!("disk[{i}].backend"),
                    quoted(b),
                    NAME_RULE,
                ));
            }
        }
        Ok(())
    }

    fn validate_vifs(&self) -> Result<(), ConfigError> {
        if self.vifs.len() > MAX_VIFS {
            return Err(ConfigError::new(
                "vif",
                format!("{} entries", self.vifs.len()),
                format!("at most {MAX_VIFS} entries"),
            ));
        }
        for (i, v) in self.vifs.iter().enumerate() {
            if let Some(mac) = v.mac {
                // Multicast (I/G bit) or all-zero addresses cannot name one interface.
                if mac[0] & 1 != 0 || mac == [0; 6] {
                    return Err(ConfigError::new(
                        format!("vif[{i}].mac"),
                        MacFmt(mac),
                        "a unicast, non-zero address (first octet even)",
                    ));
                }
                if self.vifs[..i].iter().any(|o| o.mac == Some(mac)) {
                    return Err(ConfigError::new(
                        format!("vif[{i}].mac"),
                        MacFmt(mac),
                        "an address not used by an earlier vif",
                    ));
                }
            }
            if let Some(ip) = v.ip
                && (ip == [0; 4] || ip == [255; 4] || ip[0] >= 224 || ip[0] == 127)
            {
                return Err(ConfigError::new(
                    format!("vif[{i}].ip"),
                    format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]),
                    "a unicast IPv4 address (not 0.0.0.0, loopback, multicast or broadcast)",
                ));
            }
            if let Some(r) = v.rate_bytes_per_sec
                && (r == 0 || r > MAX_RATE_BYTES_PER_SEC)
            {
                return Err(ConfigError::new(
                    format!("vif[{i}].rate"),
                    format!("{r} B/s"),
                    format!("1..={MAX_RATE_BYTES_PER_SEC} B/s (omit for unlimited)"),
                ));
            }
            if let Some(b) = &v.backend
                && !valid_name(b)
            {
                return Err(ConfigError::new(
                    format!("vif[{i}].backend"),
                    quoted(b),
                    NAME_RULE,
                ));
            }
        }
        Ok(())
    }
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug)]
pub struct MacFmt(pub [u8; 6]);

impl fmt::Display for MacFmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> DomainConfig {
        let mut c = DomainConfig::new("guest-1", 65536);
        c.disks.push(DiskSpec {
            target: "vol0".into(),
            vdev: "xvda".into(),
            access: DiskAccess::ReadWrite,
            backend: None,
        });
        c.vifs.push(VifSpec {
            mac: Some([0x00, 0x16, 0x3e, 1, 2, 3]),
            ip: Some([10, 0, 0, 2]),
            rate_bytes_per_sec: Some(1_250_000),
            backend: Some("netback".into()),
        });
        c
    }

    fn field_of(c: &DomainConfig) -> String {
        c.validate().unwrap_err().field
    }

    #[test]
    fn validate_accepts_a_full_config() {
        assert_eq!(good().validate(), Ok(()));
    }

    #[test]
    fn validate_names_each_bad_field() {
        type Mutation = fn(&mut DomainConfig);
        let cases: Vec<(Mutation, &str)> = vec![
            (|c| c.name = String::new(), "name"),
            (|c| c.name = "a b".into(), "name"),
            (|c| c.memory_kib = 4, "memory"),
            (|c| c.memory_kib = 65537, "memory"),
            (|c| c.maxmem_kib = 1024, "maxmem"),
            (|c| c.vcpus = 0, "vcpus"),
            (|c| c.vcpus = MAX_VCPUS + 1, "vcpus"),
            (|c| c.weight = 0, "weight"),
            (|c| c.cap_percent = 101, "cap"),
            (|c| c.cmdline = "x".repeat(MAX_CMDLINE_LEN + 1), "cmdline"),
            (|c| c.disks[0].vdev = "sda".into(), "disk[0].vdev"),
            (|c| c.disks[0].target = String::new(), "disk[0].target"),
            (|c| c.disks.push(c.disks[0].clone()), "disk[1].vdev"),
            (|c| c.vifs[0].mac = Some([1, 0, 0, 0, 0, 0]), "vif[0].mac"),
            (|c| c.vifs[0].ip = Some([127, 0, 0, 1]), "vif[0].ip"),
            (|c| c.vifs[0].rate_bytes_per_sec = Some(0), "vif[0].rate"),
            (|c| c.vifs[0].backend = Some("".into()), "vif[0].backend"),
        ];
        for (mutate, field) in cases {
            let mut c = good();
            mutate(&mut c);
            assert_eq!(field_of(&c), field);
        }
    }

    #[test]
    fn error_message_names_field_value_and_allowed_range() {
        let mut c = good();
        c.vcpus = 99;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("vcpus"), "{msg}");
        assert!(msg.contains("99"), "{msg}");
        assert!(msg.contains("1..=32"), "{msg}");
    }

    #[test]
    fn hostile_long_name_is_truncated_in_the_error() {
        let mut c = good();
        c.name = "é".repeat(10_000);
        let e = c.validate().unwrap_err();
        assert!(e.value.len() < 300);
    }

    #[test]
    fn config_round_trips_through_postcard() {
        let c = good();
        let bytes = postcard::to_allocvec(&c).unwrap();
        let back: DomainConfig = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, c);
    }
}
