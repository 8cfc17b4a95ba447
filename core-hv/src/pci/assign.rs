//! Device assignment: resolve the manifest's device matches against the enumerated functions
//! and give each selected function to exactly one domain.
//!
//! Refused, with the whole manifest (a half-applied assignment would leave a domain without
//! the device it was built for): an invalid match, a match that selects nothing, a function two
//! domains select, and functions no domain may own: bridges (they route other devices'
//! traffic and bus numbers) and anything of base class 0x06 (host, ISA/LPC and PCI bridges:
//! the platform itself, including the legacy devices the hypervisor uses).

use alloc::vec::Vec;
use core::fmt;

use shared_abi::DomId;
use shared_abi::errno::XenError;
use shared_abi::pci::{DeviceAssignment, DeviceMatchError, MAX_DEVICE_MATCHES};

use super::PciAddress;
use super::enumerate::Function;

/// Base class of bridges.
const CLASS_BRIDGE: u8 = 0x06;

/// One function given to one domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub address: PciAddress,
    pub owner: DomId,
    /// Bus mastering allowed without IOMMU confinement (every rule that selected it said so).
    pub insecure_dma: bool,
}

/// What one domain asks for.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub domain: DomId,
    pub devices: &'a [DeviceAssignment],
}

/// Why an assignment was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssignError {
    TooManyMatches {
        domain: DomId,
        count: usize,
    },
    Invalid {
        domain: DomId,
        index: usize,
        error: DeviceMatchError,
    },
    NoMatch {
        domain: DomId,
        index: usize,
    },
    NotAssignable {
        domain: DomId,
        address: PciAddress,
    },
    Conflict {
        address: PciAddress,
        first: DomId,
        second: DomId,
    },
}

impl AssignError {
    /// The Xen errno a control operation reports for this refusal.
    pub const fn errno(&self) -> XenError {
        match self {
            AssignError::TooManyMatches { .. } => XenError::E2BIG,
            AssignError::Invalid { .. } => XenError::EINVAL,
            AssignError::NoMatch { .. } => XenError::ENODEV,
            AssignError::NotAssignable { .. } => XenError::EPERM,
            AssignError::Conflict { .. } => XenError::EBUSY,
        }
    }
}

impl fmt::Display for AssignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AssignError::TooManyMatches { domain, count } => write!(
                f,
                "domain {domain}: {count} device matches, at most {MAX_DEVICE_MATCHES}"
            ),
            AssignError::Invalid {
                domain,
                index,
                error,
            } => write!(f, "domain {domain}: devices[{index}]: {error}"),
            AssignError::NoMatch { domain, index } => {
                write!(
                    f,
                    "domain {domain}: devices[{index}] matches no PCI function"
                )
            }
            AssignError::NotAssignable { domain, address } => write!(
                f,
                "domain {domain}: {address} is a bridge and cannot be assigned"
            ),
            AssignError::Conflict {
                address,
                first,
                second,
            } => write!(
                f,
                "{address} is selected by domain {first} and by domain {second}; a function \
                 belongs to at most one domain"
            ),
        }
    }
}

fn assignable(f: &Function) -> bool {
    !f.is_bridge() && f.header.class[0] != CLASS_BRIDGE
}

/// Resolve every request against `functions`. The result is sorted by address.
pub fn assign(
    functions: &[Function],
    requests: &[Request<'_>],
) -> Result<Vec<Assignment>, AssignError> {
    let mut out: Vec<Assignment> = Vec::new();
    for req in requests {
        let domain = req.domain;
        if req.devices.len() > MAX_DEVICE_MATCHES {
            return Err(AssignError::TooManyMatches {
                domain,
                count: req.devices.len(),
            });
        }
        for (index, d) in req.devices.iter().enumerate() {
            d.select.validate().map_err(|error| AssignError::Invalid {
                domain,
                index,
                error,
            })?;
            let mut matched = false;
            for f in functions {
                if !d.select.matches(&f.header.id(f.address)) {
                    continue;
                }
                matched = true;
                if !assignable(f) {
                    return Err(AssignError::NotAssignable {
                        domain,
                        address: f.address,
                    });
                }
                match out.iter_mut().find(|a| a.address == f.address) {
                    Some(a) if a.owner != domain => {
                        return Err(AssignError::Conflict {
                            address: f.address,
                            first: a.owner,
                            second: domain,
                        });
                    }
                    Some(a) => a.insecure_dma &= d.insecure_dma,
                    None => out.push(Assignment {
                        address: f.address,
                        owner: domain,
                        insecure_dma: d.insecure_dma,
                    }),
                }
            }
            if !matched {
                return Err(AssignError::NoMatch { domain, index });
            }
        }
    }
    out.sort_by_key(|a| a.address);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::enumerate::enumerate;
    use crate::pci::fake::{FakeConfig, FakeFunction, bdf};
    use shared_abi::pci::DeviceMatch;

    fn machine() -> std::vec::Vec<Function> {
        let mut cfg = FakeConfig::default();
        cfg.add(
            bdf(0, 0, 0),
            FakeFunction::endpoint(0x8086, 0x29c0, [6, 0, 0]),
        );
        cfg.add(
            bdf(0, 2, 0),
            FakeFunction::endpoint(0x1af4, 0x1000, [2, 0, 0]),
        );
        cfg.add(
            bdf(0, 3, 0),
            FakeFunction::endpoint(0x1af4, 0x1001, [1, 0, 0]),
        );
        cfg.add(
            bdf(0, 4, 0),
            FakeFunction::endpoint(0x1af4, 0x1001, [1, 0, 0]),
        );
        cfg.add(bdf(0, 5, 0), FakeFunction::bridge(0, 1, 1));
        enumerate(&mut cfg, 0, 0..=255, true).0
    }

    fn by(m: DeviceMatch) -> DeviceAssignment {
        DeviceAssignment {
            select: m,
            insecure_dma: false,
        }
    }

    #[test]
    fn assign_gives_each_selected_function_to_its_domain() {
        let fs = machine();
        let blk = [by(DeviceMatch::Id {
            vendor: 0x1af4,
            device: Some(0x1001),
        })];
        let net = [by(DeviceMatch::Class {
            base: 2,
            sub: None,
            prog_if: None,
        })];
        let a = assign(
            &fs,
            &[
                Request {
                    domain: 3,
                    devices: &blk,
                },
                Request {
                    domain: 4,
                    devices: &net,
                },
            ],
        )
        .unwrap();
        let got: std::vec::Vec<_> = a.iter().map(|a| (a.address.to_string(), a.owner)).collect();
        assert_eq!(
            got,
            [
                ("0000:00:02.0".into(), 4),
                ("0000:00:03.0".into(), 3),
                ("0000:00:04.0".into(), 3)
            ]
        );
    }

    #[test]
    fn assign_refuses_a_function_two_domains_select() {
        let fs = machine();
        let a = [by(DeviceMatch::Address(bdf(0, 3, 0)))];
        let b = [by(DeviceMatch::Class {
            base: 1,
            sub: Some(0),
            prog_if: None,
        })];
        let e = assign(
            &fs,
            &[
                Request {
                    domain: 3,
                    devices: &a,
                },
                Request {
                    domain: 5,
                    devices: &b,
                },
            ],
        )
        .unwrap_err();
        assert_eq!(
            e,
            AssignError::Conflict {
                address: bdf(0, 3, 0),
                first: 3,
                second: 5
            }
        );
        assert_eq!(e.errno(), XenError::EBUSY);
    }

    #[test]
    fn assign_refuses_bridges_host_bridges_and_unmatched_or_invalid_rules() {
        let fs = machine();
        let e = assign(
            &fs,
            &[Request {
                domain: 3,
                devices: &[by(DeviceMatch::Address(bdf(0, 5, 0)))],
            }],
        )
        .unwrap_err();
        assert_eq!(e.errno(), XenError::EPERM);
        let e = assign(
            &fs,
            &[Request {
                domain: 3,
                devices: &[by(DeviceMatch::Id {
                    vendor: 0x8086,
                    device: None,
                })],
            }],
        )
        .unwrap_err();
        assert_eq!(
            e,
            AssignError::NotAssignable {
                domain: 3,
                address: bdf(0, 0, 0)
            }
        );
        let e = assign(
            &fs,
            &[Request {
                domain: 3,
                devices: &[by(DeviceMatch::Id {
                    vendor: 0x10ec,
                    device: None,
                })],
            }],
        )
        .unwrap_err();
        assert_eq!(
            (e, e.errno()),
            (
                AssignError::NoMatch {
                    domain: 3,
                    index: 0
                },
                XenError::ENODEV
            )
        );
        let e = assign(
            &fs,
            &[Request {
                domain: 3,
                devices: &[by(DeviceMatch::Id {
                    vendor: 0xffff,
                    device: None,
                })],
            }],
        )
        .unwrap_err();
        assert_eq!(e.errno(), XenError::EINVAL);
        let many = [by(DeviceMatch::Address(bdf(0, 3, 0))); MAX_DEVICE_MATCHES + 1];
        let e = assign(
            &fs,
            &[Request {
                domain: 3,
                devices: &many,
            }],
        )
        .unwrap_err();
        assert_eq!(e.errno(), XenError::E2BIG);
    }

    #[test]
    fn assign_allows_insecure_dma_only_when_every_selecting_rule_does() {
        let fs = machine();
        let rules = [
            DeviceAssignment {
                select: DeviceMatch::Address(bdf(0, 3, 0)),
                insecure_dma: true,
            },
            DeviceAssignment {
                select: DeviceMatch::Id {
                    vendor: 0x1af4,
                    device: Some(0x1001),
                },
                insecure_dma: false,
            },
            DeviceAssignment {
                select: DeviceMatch::Address(bdf(0, 2, 0)),
                insecure_dma: true,
            },
        ];
        let a = assign(
            &fs,
            &[Request {
                domain: 3,
                devices: &rules,
            }],
        )
        .unwrap();
        let flags: std::vec::Vec<_> = a
            .iter()
            .map(|a| (a.address.device, a.insecure_dma))
            .collect();
        assert_eq!(flags, [(2, true), (3, false), (4, false)]);
    }
}
