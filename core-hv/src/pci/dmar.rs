//! The ACPI DMAR table: where the Intel VT-d remapping units are and which devices each one
//! translates (DRHD), and the memory firmware says devices keep using (RMRR).
//!
//! Firmware tables are checked like any other input: signature, length against the bytes
//! mapped, checksum, every sub-structure's length inside its parent and at least its header
//! (a zero length would loop), register bases page-aligned, RMRR ranges ordered and aligned.
//! Unknown structure types are skipped by their length.

use core::fmt;

use heapless::Vec;

use super::{ConfigAccess, PciAddress, reg};

/// Most remapping units kept.
pub const MAX_UNITS: usize = 8;
/// Most reserved regions kept.
pub const MAX_RMRRS: usize = 16;
/// Most device scopes per structure.
pub const MAX_SCOPES: usize = 16;
/// Most path elements per device scope.
pub const MAX_PATH: usize = 8;

const HEADER_LEN: usize = 48;

/// A device scope entry's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeKind {
    Endpoint,
    /// A bridge: the scope is every device below it.
    Bridge,
    IoApic,
    Hpet,
    AcpiNamespace,
    Other(u8),
}

/// One device scope: a start bus and a path of (device, function) hops through bridges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceScope {
    pub kind: ScopeKind,
    pub enumeration_id: u8,
    pub start_bus: u8,
    pub path: Vec<(u8, u8), MAX_PATH>,
}

impl DeviceScope {
    /// The function the path ends at, following bridges' secondary bus numbers through `cfg`.
    /// `None` if a hop is not a present bridge or an element is out of range.
    pub fn resolve(&self, segment: u16, cfg: &impl ConfigAccess) -> Option<PciAddress> {
        let mut bus = self.start_bus;
        let (last, hops) = self.path.split_last()?;
        for &(dev, func) in hops {
            let a = PciAddress::new(segment, bus, dev, func)?;
            if cfg.read16(a, reg::VENDOR_ID) == 0xffff || cfg.read8(a, reg::HEADER_TYPE) & 0x7f != 1
            {
                return None;
            }
            bus = cfg.read8(a, reg::SECONDARY_BUS);
        }
        PciAddress::new(segment, bus, last.0, last.1)
    }
}

/// A DMA remapping hardware unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drhd {
    /// Translates every device of its segment that no other unit lists.
    pub include_all: bool,
    pub segment: u16,
    pub register_base: u64,
    pub scopes: Vec<DeviceScope, MAX_SCOPES>,
}

/// A reserved memory region: DMA firmware expects to keep working (e.g. USB legacy support).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rmrr {
    pub segment: u16,
    pub base: u64,
    /// Inclusive.
    pub limit: u64,
    pub scopes: Vec<DeviceScope, MAX_SCOPES>,
}

/// The parsed table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dmar {
    /// Maximum DMA physical address width the platform supports.
    pub host_address_width: u8,
    pub interrupt_remapping: bool,
    pub x2apic_opt_out: bool,
    pub units: Vec<Drhd, MAX_UNITS>,
    pub rmrrs: Vec<Rmrr, MAX_RMRRS>,
    /// Structures not kept (over the limits, or types this parser does not use).
    pub skipped: u32,
}

/// Why the table was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmarError {
    Signature,
    /// Table length below the header or beyond the bytes given.
    Length {
        length: u32,
        available: usize,
    },
    Checksum,
    /// A structure at `offset` is shorter than its header or overruns its parent.
    Structure {
        offset: usize,
    },
    /// A unit's register base is not page-aligned (or zero).
    RegisterBase {
        offset: usize,
        base: u64,
    },
    /// An RMRR's range is empty, reversed or unaligned.
    Range {
        offset: usize,
        base: u64,
        limit: u64,
    },
}

impl fmt::Display for DmarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmarError::Signature => write!(f, "signature is not DMAR"),
            DmarError::Length { length, available } => write!(
                f,
                "length {length} outside {HEADER_LEN}..={available} (bytes mapped)"
            ),
            DmarError::Checksum => write!(f, "checksum does not sum to zero"),
            DmarError::Structure { offset } => {
                write!(f, "structure at offset {offset:#x} has a bad length")
            }
            DmarError::RegisterBase { offset, base } => write!(
                f,
                "unit at offset {offset:#x}: register base {base:#x} is not a non-zero page address"
            ),
            DmarError::Range {
                offset,
                base,
                limit,
            } => write!(
                f,
                "RMRR at offset {offset:#x}: {base:#x}..={limit:#x} is not a page-aligned range"
            ),
        }
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn scopes(
    b: &[u8],
    base: usize,
    dmar: &mut u32,
) -> Result<Vec<DeviceScope, MAX_SCOPES>, DmarError> {
    let mut out = Vec::new();
    let mut o = 0;
    while o < b.len() {
        if b.len() - o < 6 {
            return Err(DmarError::Structure { offset: base + o });
        }
        let len = b[o + 1] as usize;
        if len < 6 || len > b.len() - o || !(len - 6).is_multiple_of(2) {
            return Err(DmarError::Structure { offset: base + o });
        }
        let kind = match b[o] {
            1 => ScopeKind::Endpoint,
            2 => ScopeKind::Bridge,
            3 => ScopeKind::IoApic,
            4 => ScopeKind::Hpet,
            5 => ScopeKind::AcpiNamespace,
            t => ScopeKind::Other(t),
        };
        let mut path = Vec::new();
        let mut complete = true;
        for p in b[o + 6..o + len].chunks_exact(2) {
            complete &= path.push((p[0], p[1])).is_ok();
        }
        let scope = DeviceScope {
            kind,
            enumeration_id: b[o + 4],
            start_bus: b[o + 5],
            path,
        };
        if !complete || out.push(scope).is_err() {
            *dmar += 1;
        }
        o += len;
    }
    Ok(out)
}

impl Dmar {
    /// Parse a DMAR table (`bytes` = what was mapped; may be longer than the table).
    pub fn parse(bytes: &[u8]) -> Result<Dmar, DmarError> {
        if bytes.len() < 8 || &bytes[0..4] != b"DMAR" {
            return Err(DmarError::Signature);
        }
        let length = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if (length as usize) < HEADER_LEN || length as usize > bytes.len() {
            return Err(DmarError::Length {
                length,
                available: bytes.len(),
            });
        }
        let t = &bytes[..length as usize];
        if t.iter().fold(0u8, |s, &b| s.wrapping_add(b)) != 0 {
            return Err(DmarError::Checksum);
        }
        let mut d = Dmar {
            host_address_width: t[36].saturating_add(1),
            interrupt_remapping: t[37] & 1 != 0,
            x2apic_opt_out: t[37] & 2 != 0,
            ..Dmar::default()
        };
        let mut o = HEADER_LEN;
        while o < t.len() {
            if t.len() - o < 4 {
                return Err(DmarError::Structure { offset: o });
            }
            let kind = u16_at(t, o);
            let len = u16_at(t, o + 2) as usize;
            if len < 4 || len > t.len() - o {
                return Err(DmarError::Structure { offset: o });
            }
            let s = &t[o..o + len];
            match kind {
                0 => {
                    if len < 16 {
                        return Err(DmarError::Structure { offset: o });
                    }
                    let base = u64_at(s, 8);
                    if base == 0 || base & 0xfff != 0 {
                        return Err(DmarError::RegisterBase { offset: o, base });
                    }
                    let unit = Drhd {
                        include_all: s[4] & 1 != 0,
                        segment: u16_at(s, 6),
                        register_base: base,
                        scopes: scopes(&s[16..], o + 16, &mut d.skipped)?,
                    };
                    if d.units.push(unit).is_err() {
                        d.skipped += 1;
                    }
                }
                1 => {
                    if len < 24 {
                        return Err(DmarError::Structure { offset: o });
                    }
                    let (base, limit) = (u64_at(s, 8), u64_at(s, 16));
                    if base > limit || base & 0xfff != 0 || limit & 0xfff != 0xfff {
                        return Err(DmarError::Range {
                            offset: o,
                            base,
                            limit,
                        });
                    }
                    let r = Rmrr {
                        segment: u16_at(s, 6),
                        base,
                        limit,
                        scopes: scopes(&s[24..], o + 24, &mut d.skipped)?,
                    };
                    if d.rmrrs.push(r).is_err() {
                        d.skipped += 1;
                    }
                }
                _ => d.skipped += 1,
            }
            o += len;
        }
        Ok(d)
    }

    /// The unit that translates `addr`: one listing it (as an endpoint, or below a listed
    /// bridge), else the segment's include-all unit. `cfg` resolves scope paths.
    pub fn unit_for(&self, addr: PciAddress, cfg: &impl ConfigAccess) -> Option<usize> {
        let listed = self.units.iter().position(|u| {
            u.segment == addr.segment
                && u.scopes
                    .iter()
                    .any(|s| match (s.kind, s.resolve(u.segment, cfg)) {
                        (ScopeKind::Endpoint, Some(a)) => a == addr,
                        (ScopeKind::Bridge, Some(b)) => {
                            let sec = cfg.read8(b, reg::SECONDARY_BUS);
                            let sub = cfg.read8(b, reg::SUBORDINATE_BUS);
                            (sec..=sub).contains(&addr.bus) && sec > b.bus
                        }
                        _ => false,
                    })
        });
        listed.or_else(|| {
            self.units
                .iter()
                .position(|u| u.include_all && u.segment == addr.segment)
        })
    }
}

/// Test fixtures: DMAR tables built byte by byte.
#[cfg(test)]
pub mod fixture {
    use std::vec::Vec;

    /// A table with `structures` after the header, checksum fixed.
    pub fn table(haw: u8, flags: u8, structures: &[Vec<u8>]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(b"DMAR");
        t.extend_from_slice(&[0; 4]);
        t.push(1); // revision
        t.push(0); // checksum
        t.extend_from_slice(b"BOCHS ");
        t.extend_from_slice(b"BXPC    ");
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(b"BXPC");
        t.extend_from_slice(&1u32.to_le_bytes());
        t.push(haw);
        t.push(flags);
        t.extend_from_slice(&[0; 10]);
        for s in structures {
            t.extend_from_slice(s);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    pub fn scope(kind: u8, id: u8, bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
        let mut s = std::vec![kind, (6 + 2 * path.len()) as u8, 0, 0, id, bus];
        for &(d, f) in path {
            s.extend_from_slice(&[d, f]);
        }
        s
    }

    pub fn drhd(flags: u8, segment: u16, base: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = scopes.concat();
        let mut s = Vec::new();
        s.extend_from_slice(&0u16.to_le_bytes());
        s.extend_from_slice(&((16 + body.len()) as u16).to_le_bytes());
        s.push(flags);
        s.push(0);
        s.extend_from_slice(&segment.to_le_bytes());
        s.extend_from_slice(&base.to_le_bytes());
        s.extend_from_slice(&body);
        s
    }

    pub fn rmrr(base: u64, limit: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = scopes.concat();
        let mut s = Vec::new();
        s.extend_from_slice(&1u16.to_le_bytes());
        s.extend_from_slice(&((24 + body.len()) as u16).to_le_bytes());
        s.extend_from_slice(&[0, 0, 0, 0]);
        s.extend_from_slice(&base.to_le_bytes());
        s.extend_from_slice(&limit.to_le_bytes());
        s.extend_from_slice(&body);
        s
    }

    /// The table QEMU 7.2 gives with `-device intel-iommu` on q35 and a `pcie-root-port` at
    /// 00:01.0 (read from a boot): 39-bit host width, interrupt remapping flag, one unit at
    /// 0xfed90000 that lists its devices (I/O APIC, 00:00.0, the bridge 00:01.0, 00:1f.0/2/3)
    /// instead of claiming the whole segment.
    pub fn qemu_q35() -> Vec<u8> {
        std::vec![
            0x44, 0x4d, 0x41, 0x52, 0x70, 0x00, 0x00, 0x00, 0x01, 0x27, 0x42, 0x4f, 0x43, 0x48,
            0x53, 0x20, 0x42, 0x58, 0x50, 0x43, 0x20, 0x20, 0x20, 0x20, 0x01, 0x00, 0x00, 0x00,
            0x42, 0x58, 0x50, 0x43, 0x01, 0x00, 0x00, 0x00, 0x26, 0x01, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0xd9, 0xfe, 0x00, 0x00, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x00, 0xff,
            0x00, 0x00, 0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, 0x00,
            0x00, 0x00, 0x01, 0x00, 0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x1f, 0x00, 0x01, 0x08,
            0x00, 0x00, 0x00, 0x00, 0x1f, 0x02, 0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x1f, 0x03,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;
    use crate::pci::fake::{FakeConfig, FakeFunction, bdf};

    #[test]
    fn parse_reads_the_table_qemu_gives() {
        let d = Dmar::parse(&qemu_q35()).unwrap();
        assert_eq!(d.host_address_width, 39);
        assert!(d.interrupt_remapping);
        assert_eq!(d.units.len(), 1);
        let u = &d.units[0];
        assert!(!u.include_all);
        assert_eq!(u.register_base, 0xfed9_0000);
        let kinds: std::vec::Vec<_> = u
            .scopes
            .iter()
            .map(|s| (s.kind, s.start_bus, s.path[0]))
            .collect();
        assert_eq!(
            kinds,
            [
                (ScopeKind::IoApic, 0xff, (0, 0)),
                (ScopeKind::Endpoint, 0, (0, 0)),
                (ScopeKind::Bridge, 0, (1, 0)),
                (ScopeKind::Endpoint, 0, (0x1f, 0)),
                (ScopeKind::Endpoint, 0, (0x1f, 2)),
                (ScopeKind::Endpoint, 0, (0x1f, 3)),
            ]
        );
        assert_eq!(d.skipped, 0);
    }

    #[test]
    fn qemu_table_covers_listed_devices_and_those_behind_the_listed_bridge_only() {
        let mut cfg = FakeConfig::default();
        cfg.add(
            bdf(0, 0, 0),
            FakeFunction::endpoint(0x8086, 0x29c0, [6, 0, 0]),
        );
        cfg.add(bdf(0, 1, 0), FakeFunction::bridge(0, 1, 1));
        cfg.add(
            bdf(1, 0, 0),
            FakeFunction::endpoint(0x1af4, 0x1042, [1, 0, 0]),
        );
        cfg.add(
            bdf(0, 3, 0),
            FakeFunction::endpoint(0x1af4, 0x1000, [2, 0, 0]),
        );
        let d = Dmar::parse(&qemu_q35()).unwrap();
        assert_eq!(d.unit_for(bdf(1, 0, 0), &cfg), Some(0));
        assert_eq!(d.unit_for(bdf(0, 0x1f, 2), &cfg), Some(0));
        assert_eq!(d.unit_for(bdf(0, 3, 0), &cfg), None);
    }

    #[test]
    fn parse_reads_rmrrs_and_skips_unknown_structures() {
        let unknown = std::vec![7, 0, 8, 0, 0, 0, 0, 0];
        let t = table(
            45,
            3,
            &[
                drhd(0, 0, 0xfed9_1000, &[scope(1, 0, 0, &[(2, 0)])]),
                unknown,
                rmrr(0x7f00_0000, 0x7f0f_ffff, &[scope(1, 0, 0, &[(0x1d, 0)])]),
            ],
        );
        let d = Dmar::parse(&t).unwrap();
        assert!(d.interrupt_remapping && d.x2apic_opt_out);
        assert_eq!(d.skipped, 1);
        assert_eq!(
            (d.rmrrs[0].base, d.rmrrs[0].limit),
            (0x7f00_0000, 0x7f0f_ffff)
        );
        assert_eq!(d.units[0].scopes[0].kind, ScopeKind::Endpoint);
    }

    #[test]
    fn parse_refuses_bad_headers() {
        let good = qemu_q35();
        let mut sig = good.clone();
        sig[0] = b'X';
        assert_eq!(Dmar::parse(&sig), Err(DmarError::Signature));
        assert!(matches!(
            Dmar::parse(&good[..40]),
            Err(DmarError::Length { .. })
        ));
        let mut sum = good.clone();
        sum[40] ^= 1;
        assert_eq!(Dmar::parse(&sum), Err(DmarError::Checksum));
        assert!(Dmar::parse(&[]).is_err());
    }

    #[test]
    fn parse_refuses_zero_and_overrunning_structure_lengths() {
        let mut zero = drhd(1, 0, 0xfed9_0000, &[]);
        zero[2] = 0;
        assert_eq!(
            Dmar::parse(&table(38, 0, &[zero])),
            Err(DmarError::Structure { offset: 48 })
        );
        let mut long = drhd(1, 0, 0xfed9_0000, &[]);
        long[2] = 200;
        assert_eq!(
            Dmar::parse(&table(38, 0, &[long])),
            Err(DmarError::Structure { offset: 48 })
        );
        // A scope whose length runs past its unit.
        let mut s = scope(1, 0, 0, &[(3, 0)]);
        s[1] = 40;
        assert_eq!(
            Dmar::parse(&table(38, 0, &[drhd(0, 0, 0xfed9_0000, &[s])])),
            Err(DmarError::Structure { offset: 64 })
        );
        // A scope with length 0 would never advance.
        let mut s = scope(1, 0, 0, &[]);
        s[1] = 0;
        assert!(Dmar::parse(&table(38, 0, &[drhd(0, 0, 0xfed9_0000, &[s])])).is_err());
    }

    #[test]
    fn parse_refuses_unaligned_bases_and_reversed_rmrrs() {
        assert!(matches!(
            Dmar::parse(&table(38, 0, &[drhd(1, 0, 0xfed9_0010, &[])])),
            Err(DmarError::RegisterBase { .. })
        ));
        assert!(matches!(
            Dmar::parse(&table(38, 0, &[drhd(1, 0, 0, &[])])),
            Err(DmarError::RegisterBase { .. })
        ));
        assert!(matches!(
            Dmar::parse(&table(38, 0, &[rmrr(0x2000, 0x1fff, &[])])),
            Err(DmarError::Range { .. })
        ));
    }

    #[test]
    fn unit_for_prefers_a_listing_unit_over_include_all() {
        let mut cfg = FakeConfig::default();
        cfg.add(bdf(0, 1, 0), FakeFunction::bridge(0, 1, 2));
        cfg.add(bdf(1, 0, 0), FakeFunction::endpoint(1, 1, [1, 0, 0]));
        cfg.add(bdf(0, 2, 0), FakeFunction::endpoint(1, 1, [2, 0, 0]));
        cfg.add(bdf(0, 3, 0), FakeFunction::endpoint(1, 1, [3, 0, 0]));
        let t = table(
            38,
            0,
            &[
                drhd(0, 0, 0xfed9_1000, &[scope(1, 0, 0, &[(2, 0)])]),
                drhd(0, 0, 0xfed9_2000, &[scope(2, 0, 0, &[(1, 0)])]),
                drhd(1, 0, 0xfed9_0000, &[]),
            ],
        );
        let d = Dmar::parse(&t).unwrap();
        assert_eq!(d.unit_for(bdf(0, 2, 0), &cfg), Some(0));
        assert_eq!(d.unit_for(bdf(1, 0, 0), &cfg), Some(1));
        assert_eq!(d.unit_for(bdf(0, 3, 0), &cfg), Some(2));
        let other_segment = PciAddress::new(1, 0, 3, 0).unwrap();
        assert_eq!(d.unit_for(other_segment, &cfg), None);
        // A path through a function that is not a bridge resolves to nothing.
        let s = DeviceScope {
            kind: ScopeKind::Endpoint,
            enumeration_id: 0,
            start_bus: 0,
            path: Vec::from_slice(&[(2, 0), (0, 0)]).unwrap(),
        };
        assert_eq!(s.resolve(0, &cfg), None);
    }
}
