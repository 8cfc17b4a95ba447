//! The `pci` role: a driver domain's view of its assigned PCI functions through the
//! `physdev_op` config hypercalls.
//!
//! With `expect=owner`: every function in the start info must read back a real vendor/device
//! id (reported as `RESULT <name> pass <n> device(s): 00:03.0 1af4:1001 ...`), a function it
//! was not given must answer `-ENODEV`, a malformed access `-EINVAL`, and turning bus
//! mastering on must succeed exactly when `dma=confined` or `dma=insecure` (refused with
//! `dma=blocked`).
//! With `expect=refused probe=<bus:dev.fn>`: the domain owns nothing; reading the probed
//! function must be refused (`-EPERM` without `device_owner`, `-ENODEV` with it).

use core::fmt::Write;

use dom_rt::hypercall::{pci_config_read, pci_config_write};
use dom_rt::{StartInfo, println};
use shared_abi::errno::XenError;
use shared_abi::start_info::PciAddress;

use super::roles::param;

/// `bb:dd.f` (hex) on segment 0.
fn parse_bdf(s: &str) -> Option<PciAddress> {
    let (bus, rest) = s.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let dev = u8::from_str_radix(dev, 16).ok().filter(|d| *d < 32)?;
    let func = u8::from_str_radix(func, 16).ok().filter(|f| *f < 8)?;
    Some(PciAddress {
        segment: 0,
        bus,
        devfn: (dev << 3) | func,
    })
}

struct Report {
    failures: alloc::string::String,
    failed: u32,
}

impl Report {
    fn check(&mut self, ok: bool, what: core::fmt::Arguments<'_>) {
        if !ok {
            self.failed += 1;
            let _ = write!(self.failures, "{what}; ");
        }
    }
}

pub fn run(si: &StartInfo) {
    let name = si.name();
    let cmd = si.cmdline();
    let mut r = Report {
        failures: alloc::string::String::new(),
        failed: 0,
    };
    let mut summary: alloc::string::String = alloc::string::String::new();
    match param(cmd, "expect") {
        Some("owner") => {
            let devices = si.devices();
            r.check(
                !devices.is_empty(),
                format_args!("no devices in start info"),
            );
            for d in devices {
                let id = pci_config_read(*d, 0, 4);
                let (bus, dev, func) = (d.bus, d.devfn >> 3, d.devfn & 7);
                match id {
                    Ok(v) if v != u32::MAX && v != 0 => {
                        let _ = write!(
                            summary,
                            " {bus:02x}:{dev:02x}.{func} {:04x}:{:04x}",
                            v & 0xffff,
                            v >> 16
                        );
                    }
                    other => r.check(
                        false,
                        format_args!("{bus:02x}:{dev:02x}.{func} id read {other:?}"),
                    ),
                }
                let bad = pci_config_read(*d, 1, 2);
                r.check(
                    bad == Err(XenError::EINVAL),
                    format_args!("misaligned read gave {bad:?}"),
                );
                let cmd_reg = pci_config_read(*d, 4, 2).unwrap_or(0);
                let master = pci_config_write(*d, 4, 2, cmd_reg | 0x4);
                let want_ok = matches!(param(cmd, "dma"), Some("confined" | "insecure"));
                r.check(
                    master.is_ok() == want_ok,
                    format_args!("bus master on gave {master:?}, confined={want_ok}"),
                );
                let _ = pci_config_write(*d, 4, 2, cmd_reg & !0x4);
            }
            if let Some(p) = param(cmd, "probe").and_then(parse_bdf) {
                let got = pci_config_read(p, 0, 4);
                r.check(
                    got == Err(XenError::ENODEV),
                    format_args!("probe of a function not owned gave {got:?}"),
                );
            }
        }
        Some("refused") => {
            r.check(
                si.devices().is_empty(),
                format_args!("start info lists devices"),
            );
            let want = match param(cmd, "want") {
                Some("eperm") => XenError::EPERM,
                _ => XenError::ENODEV,
            };
            match param(cmd, "probe").and_then(parse_bdf) {
                Some(p) => {
                    let got = pci_config_read(p, 0, 4);
                    r.check(got == Err(want), format_args!("read gave {got:?}"));
                    let got = pci_config_write(p, 4, 2, 0x6);
                    r.check(got == Err(want), format_args!("write gave {got:?}"));
                    let _ = write!(summary, " refused with {want:?}");
                }
                None => r.check(false, format_args!("no probe=bb:dd.f given")),
            }
        }
        other => r.check(false, format_args!("unknown expect={other:?}")),
    }
    if r.failed == 0 {
        println!(
            "RESULT {name} pass {} device(s):{summary}",
            si.devices().len()
        );
    } else {
        println!("RESULT {name} fail {} check(s): {}", r.failed, r.failures);
    }
}
