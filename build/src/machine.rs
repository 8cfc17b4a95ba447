//! The emulated machine a system needs besides CPUs and memory: the `[machine]` table of a
//! system file. It names devices the system's driver domains own, and `cargo hv run` turns it
//! into QEMU arguments.
//!
//! ```toml
//! [machine]
//! iommu = true                  # QEMU's intel-iommu (VT-d), so device DMA is confined
//! [[machine.nic]]               # a virtio-net function on QEMU user networking (slirp)
//! addr = "04.0"                 # its PCI slot.function on bus 0
//! # host ports forwarded to guests on the user network (10.0.2.0/24, host 10.0.2.2)
//! forward = [{ host = 8080, guest = "10.0.2.15:80" }]
//! ```
//!
//! A NIC is a modern-only virtio-net function (`disable-legacy=on`, id 1af4:1041); with the
//! IOMMU it also gets `iommu_platform=on`, without which QEMU's virtio DMA bypasses VT-d.
//! Forwards listen on 127.0.0.1 only: the demo is not published beyond the host.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

use serde::Deserialize;

/// Most NICs a system may ask for.
pub const MAX_NICS: usize = 4;
/// Most forwards per NIC.
pub const MAX_FORWARDS: usize = 8;

/// The validated `[machine]` table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    pub iommu: bool,
    pub nics: Vec<Nic>,
}

/// One virtio-net function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nic {
    /// PCI slot and function on bus 0.
    pub slot: u8,
    pub function: u8,
    pub forwards: Vec<Forward>,
}

/// A host TCP port forwarded to a guest address on the NIC's user network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub host_port: u16,
    pub guest: SocketAddrV4,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMachine {
    #[serde(default)]
    iommu: bool,
    #[serde(default, rename = "nic")]
    nics: Vec<RawNic>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNic {
    addr: String,
    #[serde(default)]
    forward: Vec<RawForward>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    host: i64,
    guest: String,
}

/// A field of `[machine]` that is wrong: (field, value, what is allowed).
pub(crate) type MachineError = (&'static str, String, String);

fn parse_slot(s: &str) -> Option<(u8, u8)> {
    let (dev, func) = s.split_once('.')?;
    let dev = u8::from_str_radix(dev, 16).ok()?;
    let func = u8::from_str_radix(func, 16).ok()?;
    // Slot 0 is the host bridge; 1f is q35's LPC/SATA/SMBus.
    ((1..0x1f).contains(&dev) && func < 8).then_some((dev, func))
}

impl RawMachine {
    pub(crate) fn validate(self) -> Result<Machine, MachineError> {
        if self.nics.len() > MAX_NICS {
            return Err((
                "machine.nic",
                format!("{} entries", self.nics.len()),
                format!("at most {MAX_NICS}"),
            ));
        }
        let mut nics: Vec<Nic> = Vec::new();
        for n in self.nics {
            let Some((slot, function)) = parse_slot(&n.addr) else {
                return Err((
                    "machine.nic.addr",
                    n.addr,
                    "\"<slot>.<function>\" in hex, slot 01..1e, function 0..7 (e.g. \"04.0\")"
                        .into(),
                ));
            };
            if nics
                .iter()
                .any(|o| (o.slot, o.function) == (slot, function))
            {
                return Err((
                    "machine.nic.addr",
                    n.addr,
                    "an address no other NIC uses".into(),
                ));
            }
            if n.forward.len() > MAX_FORWARDS {
                return Err((
                    "machine.nic.forward",
                    format!("{} entries", n.forward.len()),
                    format!("at most {MAX_FORWARDS}"),
                ));
            }
            let mut forwards = Vec::new();
            for f in n.forward {
                let host_port =
                    u16::try_from(f.host)
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| {
                            (
                                "machine.nic.forward.host",
                                f.host.to_string(),
                                "a TCP port 1..=65535".to_string(),
                            )
                        })?;
                let guest: SocketAddrV4 = f.guest.parse().map_err(|_| {
                    (
                        "machine.nic.forward.guest",
                        f.guest.clone(),
                        "\"a.b.c.d:port\" (an IPv4 address on the user network, e.g. 10.0.2.15:80)"
                            .to_string(),
                    )
                })?;
                if guest.port() == 0 {
                    return Err((
                        "machine.nic.forward.guest",
                        f.guest,
                        "a port 1..=65535".into(),
                    ));
                }
                forwards.push(Forward { host_port, guest });
            }
            nics.push(Nic {
                slot,
                function,
                forwards,
            });
        }
        Ok(Machine {
            iommu: self.iommu,
            nics,
        })
    }
}

/// A forward as QEMU will run it: `host_port` may differ from the file's when that port was
/// taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveForward {
    pub host_port: u16,
    pub guest: SocketAddrV4,
    /// The port the system file asked for.
    pub wanted: u16,
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn any_free_port() -> Option<u16> {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .ok()
        .map(|a| a.port())
}

impl Machine {
    /// QEMU arguments for this machine, with the forwards resolved to host ports that are
    /// free now (the file's port if it is, another free one if not).
    pub fn qemu_args(&self) -> (Vec<String>, Vec<ActiveForward>) {
        let mut args = Vec::new();
        let mut active = Vec::new();
        if self.iommu {
            // Must come before the devices it translates for.
            args.extend(["-device".to_string(), "intel-iommu".to_string()]);
        }
        for (i, n) in self.nics.iter().enumerate() {
            let mut netdev = format!("user,id=nic{i}");
            for f in &n.forwards {
                let port = if port_is_free(f.host_port) {
                    Some(f.host_port)
                } else {
                    any_free_port()
                };
                let Some(port) = port else { continue };
                netdev.push_str(&format!(
                    ",hostfwd=tcp:127.0.0.1:{port}-{}:{}",
                    f.guest.ip(),
                    f.guest.port()
                ));
                active.push(ActiveForward {
                    host_port: port,
                    guest: f.guest,
                    wanted: f.host_port,
                });
            }
            let mut dev = format!(
                "virtio-net-pci,netdev=nic{i},addr={:02x}.{},disable-legacy=on",
                n.slot, n.function
            );
            if self.iommu {
                dev.push_str(",iommu_platform=on");
            }
            args.extend(["-netdev".into(), netdev, "-device".into(), dev]);
        }
        (args, active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(text: &str) -> Result<Machine, MachineError> {
        let raw: RawMachine =
            toml::from_str(text).map_err(|e| ("toml", e.to_string(), String::new()))?;
        raw.validate()
    }

    #[test]
    fn a_nic_with_a_forward_becomes_qemu_arguments() {
        let m = machine(
            "iommu = true\n[[nic]]\naddr = \"04.0\"\nforward = [{ host = 1, guest = \"10.0.2.15:80\" }]\n",
        )
        .unwrap();
        assert_eq!(m.nics[0].slot, 4);
        let (args, active) = m.qemu_args();
        assert_eq!(args[..2], ["-device", "intel-iommu"]);
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].guest, "10.0.2.15:80".parse().unwrap());
        let netdev = &args[3];
        assert!(
            netdev.starts_with("user,id=nic0,hostfwd=tcp:127.0.0.1:")
                && netdev.ends_with("-10.0.2.15:80"),
            "{netdev}"
        );
        assert_eq!(
            args[5],
            "virtio-net-pci,netdev=nic0,addr=04.0,disable-legacy=on,iommu_platform=on"
        );
    }

    #[test]
    fn a_taken_port_is_replaced_by_a_free_one() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let m = Machine {
            iommu: false,
            nics: vec![Nic {
                slot: 4,
                function: 0,
                forwards: vec![Forward {
                    host_port: port,
                    guest: "10.0.2.15:80".parse().unwrap(),
                }],
            }],
        };
        let (args, active) = m.qemu_args();
        assert_eq!(active[0].wanted, port);
        assert_ne!(active[0].host_port, port);
        assert!(!args.iter().any(|a| a.contains("iommu")));
    }

    #[test]
    fn bad_fields_are_named_with_the_value_and_what_is_allowed() {
        let cases = [
            ("[[nic]]\naddr = \"00.0\"\n", "machine.nic.addr"),
            ("[[nic]]\naddr = \"1f.0\"\n", "machine.nic.addr"),
            ("[[nic]]\naddr = \"04.8\"\n", "machine.nic.addr"),
            ("[[nic]]\naddr = \"four\"\n", "machine.nic.addr"),
            (
                "[[nic]]\naddr = \"04.0\"\n[[nic]]\naddr = \"04.0\"\n",
                "machine.nic.addr",
            ),
            (
                "[[nic]]\naddr = \"04.0\"\nforward = [{ host = 0, guest = \"10.0.2.15:80\" }]\n",
                "machine.nic.forward.host",
            ),
            (
                "[[nic]]\naddr = \"04.0\"\nforward = [{ host = 70000, guest = \"10.0.2.15:80\" }]\n",
                "machine.nic.forward.host",
            ),
            (
                "[[nic]]\naddr = \"04.0\"\nforward = [{ host = 80, guest = \"10.0.2.15\" }]\n",
                "machine.nic.forward.guest",
            ),
            (
                "[[nic]]\naddr = \"04.0\"\nforward = [{ host = 80, guest = \"10.0.2.15:0\" }]\n",
                "machine.nic.forward.guest",
            ),
        ];
        for (text, field) in cases {
            let e = machine(text).unwrap_err();
            assert_eq!(e.0, field, "{text}");
            assert!(!e.2.is_empty());
        }
        let five: String = (1..=5)
            .map(|i| format!("[[nic]]\naddr = \"0{i}.0\"\n"))
            .collect();
        assert_eq!(machine(&five).unwrap_err().0, "machine.nic");
    }
}
