//! The engine over a real file: a seeded mix of writes, flushes and discards, then the file
//! reopened and compared byte for byte with a model.
#![allow(clippy::unwrap_used)]

mod common;

use blkback_dom::device::{BlockDevice, DeviceError, SyncIo};
use blkback_dom::engine::VbdConfig;
use blkback_dom::file::FileDisk;
use common::*;
use shared_abi::PAGE_SIZE;
use shared_abi::blkif::{BlkifRequestDiscard, BlkifRequestSlot, op, rsp};

const SECTORS: u64 = 4096; // 2 MiB

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn seeded_writes_with_flushes_survive_reopen_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let file = FileDisk::create(&path, 512, SECTORS).unwrap();
    let mut cfg = VbdConfig::new(FRONT);
    cfg.max_indirect_segments = 64;
    let mut h = Harness::new(cfg, SyncIo::new(file), 1, 0);
    let mut model = vec![0u8; (SECTORS * 512) as usize];
    let mut rng = Rng(0x5EED_B10C);

    for round in 0..200u64 {
        match rng.below(10) {
            // A flush, with or without data.
            0 => {
                h.rw(0, 0, op::FLUSH_DISKCACHE, 0, &[]);
                assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
            }
            // A discard.
            1 => {
                let nr = 1 + rng.below(64);
                let sector = rng.below(SECTORS - nr);
                let d = BlkifRequestDiscard {
                    operation: op::DISCARD,
                    id: round,
                    sector_number: sector,
                    nr_sectors: nr,
                    ..Default::default()
                };
                h.push(0, 0, BlkifRequestSlot::from_discard(&d));
                assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
                let (a, b) = (sector as usize * 512, (sector + nr) as usize * 512);
                model[a..b].fill(0);
            }
            // A write of 1..=40 segments of random shapes (indirect beyond 11).
            _ => {
                let nseg = 1 + rng.below(40) as usize;
                let mut segs = Vec::new();
                let mut data = Vec::new();
                for i in 0..nseg {
                    let first = rng.below(8) as u8;
                    let last = first + rng.below(u64::from(8 - first)) as u8;
                    let n = usize::from(last - first + 1) * 512;
                    let bytes = pattern(n, round * 1000 + i as u64);
                    let mut page = vec![0u8; PAGE_SIZE];
                    page[usize::from(first) * 512..usize::from(first) * 512 + n]
                        .copy_from_slice(&bytes);
                    segs.push(seg(h.grant(0, &page, true), first, last));
                    data.extend_from_slice(&bytes);
                }
                let sectors = (data.len() / 512) as u64;
                let sector = rng.below(SECTORS - sectors + 1);
                let o = if rng.below(4) == 0 {
                    op::FLUSH_DISKCACHE
                } else {
                    op::WRITE
                };
                if nseg > 11 {
                    h.indirect(0, 0, op::WRITE, sector, &segs);
                } else {
                    h.rw(0, 0, o, sector, &segs);
                }
                assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
                let a = sector as usize * 512;
                model[a..a + data.len()].copy_from_slice(&data);
            }
        }
    }
    let flushes = h.vbd().io().device().flushes;
    assert!(flushes > 10, "real flushes happened: {flushes}");
    drop(h);

    // Reopen: the file holds exactly the model.
    let mut reopened = FileDisk::open(&path, 512, true).unwrap();
    assert_eq!(reopened.info().sectors, SECTORS);
    let mut all = vec![0u8; model.len()];
    reopened.read(0, &mut all).unwrap();
    assert!(all == model, "file contents differ from the model");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SECTORS * 512);

    // And the engine reads the same through a read-only reopen.
    let mut h = Harness::new(VbdConfig::new(FRONT), SyncIo::new(reopened), 1, 0);
    let segs = h.read_segments(0, 88);
    h.rw(0, 0, op::READ, 1000, &segs);
    assert_eq!(h.one_response(0, 0).status, rsp::OKAY);
    assert!(h.gather(0, &segs) == model[1000 * 512..1088 * 512]);
    let w = h.data_segments(0, &[1u8; 512]);
    h.rw(0, 0, op::WRITE, 0, &w);
    assert_eq!(h.one_response(0, 0).status, rsp::ERROR, "read-only reopen");
}

#[test]
fn file_device_checks_ranges_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    let mut d = FileDisk::create(&path, 4096, 4).unwrap();
    assert_eq!(d.info().sector_size, 4096);
    assert!(matches!(
        d.write(16384 - 512, &[0; 1024]),
        Err(DeviceError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.read(u64::MAX, &mut [0; 1]),
        Err(DeviceError::OutOfRange { .. })
    ));
    d.write(4096, &[9; 4096]).unwrap();
    d.flush().unwrap();
    d.discard(4096, 4096, false).unwrap();
    let mut b = [1u8; 4096];
    d.read(4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "punched range reads zero");
    assert_eq!(d.discard(0, 4096, true), Err(DeviceError::Unsupported));
    let mut ro = FileDisk::open(&path, 4096, true).unwrap();
    assert_eq!(ro.write(0, &[0; 4096]), Err(DeviceError::ReadOnly));
    assert!(FileDisk::open(&dir.path().join("missing"), 512, false).is_err());
}
