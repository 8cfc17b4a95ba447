//! Enumeration: every function on every bus reachable from the root bus of a segment, as the
//! firmware numbered them (buses are not renumbered).
//!
//! Multi-function devices are scanned past function 0 only when function 0's header says so.
//! A bridge's secondary bus is scanned if it lies in the segment's bus range (the ECAM window)
//! and was not scanned yet; a bridge that points at a scanned bus, its own bus or outside the
//! window is counted in [`Stats::bad_bridges`] and not followed, so a loop in the bus
//! numbering cannot make the scan run for ever.

use alloc::vec::Vec;
use core::ops::RangeInclusive;

use super::bar::{self, Bars};
use super::caps::{self, CapList, Msi, Msix, id};
use super::{ConfigAccess, Header, HeaderType, PciAddress};

/// Most functions kept (beyond this they are counted, not stored).
pub const MAX_FUNCTIONS: usize = 1024;

/// One enumerated function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub address: PciAddress,
    pub header: Header,
    pub bars: Bars,
    pub caps: CapList,
    pub msi: Option<Msi>,
    pub msix: Option<Msix>,
}

impl Function {
    pub fn is_bridge(&self) -> bool {
        self.header.header_type != HeaderType::Endpoint
    }
}

/// What the scan saw besides functions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub buses_scanned: u32,
    /// Bridges whose secondary bus was not followed.
    pub bad_bridges: u32,
    /// Functions found beyond [`MAX_FUNCTIONS`].
    pub dropped: u32,
}

/// Scan segment `segment` whose ECAM covers `buses`, starting at its first bus. `extended`:
/// the access reaches 4 KiB of config space per function (ECAM).
pub fn enumerate(
    cfg: &mut impl ConfigAccess,
    segment: u16,
    buses: RangeInclusive<u8>,
    extended: bool,
) -> (Vec<Function>, Stats) {
    let mut out = Vec::new();
    let mut stats = Stats::default();
    let mut scanned = [false; 256];
    let mut pending: heapless::Vec<u8, 256> = heapless::Vec::new();
    let _ = pending.push(*buses.start());
    scanned[*buses.start() as usize] = true;
    while let Some(bus) = pending.pop() {
        stats.buses_scanned += 1;
        for dev in 0..=PciAddress::MAX_DEVICE {
            for func in 0..=PciAddress::MAX_FUNCTION {
                let Some(addr) = PciAddress::new(segment, bus, dev, func) else {
                    continue;
                };
                let Some(header) = Header::read(cfg, addr) else {
                    if func == 0 {
                        break;
                    }
                    continue;
                };
                if let Some((_, secondary, _)) = header.buses {
                    let ok = buses.contains(&secondary) && !scanned[secondary as usize];
                    if ok {
                        scanned[secondary as usize] = true;
                        let _ = pending.push(secondary);
                    } else {
                        stats.bad_bridges += 1;
                    }
                }
                let multifunction = header.multifunction;
                if out.len() < MAX_FUNCTIONS {
                    out.push(read_function(cfg, addr, header, extended));
                } else {
                    stats.dropped += 1;
                }
                if func == 0 && !multifunction {
                    break;
                }
            }
        }
    }
    out.sort_by_key(|f| f.address);
    (out, stats)
}

/// Everything about one present function (probes its BARs: see [`bar::probe`]).
pub fn read_function(
    cfg: &mut impl ConfigAccess,
    address: PciAddress,
    header: Header,
    extended: bool,
) -> Function {
    let bars = bar::probe(cfg, address, &header);
    let caps = caps::walk(cfg, address, header.header_type, extended);
    let msi = caps.find(id::MSI).map(|o| Msi::read(cfg, address, o));
    let msix = caps.find(id::MSIX).map(|o| Msix::read(cfg, address, o));
    Function {
        address,
        header,
        bars,
        caps,
        msi,
        msix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::fake::{FakeConfig, FakeFunction, bdf};

    fn addrs(fs: &[Function]) -> std::vec::Vec<std::string::String> {
        fs.iter().map(|f| f.address.to_string()).collect()
    }

    #[test]
    fn enumerate_finds_functions_behind_bridges_and_multifunction_devices() {
        let mut cfg = FakeConfig::default();
        cfg.add(
            bdf(0, 0, 0),
            FakeFunction::endpoint(0x8086, 0x29c0, [6, 0, 0]),
        );
        cfg.add(bdf(0, 1, 0), FakeFunction::bridge(0, 1, 1));
        let mut mf = FakeFunction::endpoint(0x8086, 0x2918, [6, 1, 0]);
        mf.set8(0x0e, 0x80);
        cfg.add(bdf(0, 0x1f, 0), mf);
        cfg.add(
            bdf(0, 0x1f, 3),
            FakeFunction::endpoint(0x8086, 0x2930, [0xc, 5, 0]),
        );
        cfg.add(
            bdf(1, 0, 0),
            FakeFunction::endpoint(0x1af4, 0x1001, [1, 0, 0]),
        );
        let (fs, stats) = enumerate(&mut cfg, 0, 0..=255, true);
        assert_eq!(
            addrs(&fs),
            [
                "0000:00:00.0",
                "0000:00:01.0",
                "0000:00:1f.0",
                "0000:00:1f.3",
                "0000:01:00.0"
            ]
        );
        assert_eq!(
            stats,
            Stats {
                buses_scanned: 2,
                bad_bridges: 0,
                dropped: 0
            }
        );
    }

    #[test]
    fn enumerate_skips_functions_past_zero_on_single_function_devices() {
        let mut cfg = FakeConfig::default();
        cfg.add(bdf(0, 2, 0), FakeFunction::endpoint(1, 1, [3, 0, 0]));
        // A function 1 on a device whose function 0 says "single function": some devices
        // decode only the device number and answer on every function.
        cfg.add(bdf(0, 2, 1), FakeFunction::endpoint(1, 1, [3, 0, 0]));
        let (fs, _) = enumerate(&mut cfg, 0, 0..=255, true);
        assert_eq!(addrs(&fs), ["0000:00:02.0"]);
    }

    #[test]
    fn enumerate_does_not_follow_bridge_loops_or_buses_outside_the_window() {
        let mut cfg = FakeConfig::default();
        cfg.add(bdf(0, 1, 0), FakeFunction::bridge(0, 1, 1));
        // Bus 1 has a bridge back to bus 0 and one to itself, and one beyond the window.
        cfg.add(bdf(1, 0, 0), FakeFunction::bridge(1, 0, 0));
        cfg.add(bdf(1, 1, 0), FakeFunction::bridge(1, 1, 1));
        cfg.add(bdf(1, 2, 0), FakeFunction::bridge(1, 200, 200));
        let (fs, stats) = enumerate(&mut cfg, 0, 0..=63, true);
        assert_eq!(fs.len(), 4);
        assert_eq!(stats.buses_scanned, 2);
        assert_eq!(stats.bad_bridges, 3);
    }

    #[test]
    fn enumerate_records_bars_caps_and_msix() {
        let mut cfg = FakeConfig::default();
        let mut f = FakeFunction::endpoint(0x1af4, 0x1000, [2, 0, 0]);
        f.io_bar(0, 0xc040, 0x20);
        f.mem_bar(1, 0xfebd_2000, 0x1000, false, false);
        f.caps(&[(0x98, caps::id::MSIX, 0)]);
        f.set16(0x9a, 1);
        f.set32(0x9c, 1);
        f.set32(0xa0, 0x800 | 1);
        cfg.add(bdf(0, 2, 0), f);
        let (fs, _) = enumerate(&mut cfg, 0, 0..=255, true);
        let f = &fs[0];
        assert_eq!(f.bars.iter().count(), 2);
        assert_eq!(f.msix.unwrap().entries, 2);
        assert_eq!(f.msi, None);
    }
}
