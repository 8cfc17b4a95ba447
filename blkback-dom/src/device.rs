//! Storage behind the engine: the synchronous [`BlockDevice`] a disk implements, the
//! asynchronous [`BlockIo`] queue the engine submits to (so a request's completion is decoupled
//! from its submission), the [`SyncIo`] adapter between them, and the [`RamDisk`].
//!
//! Offsets and lengths here are in bytes; the engine has already checked them against
//! [`DeviceInfo`] (in range, aligned to the logical sector size). Devices check again and
//! answer [`DeviceError::OutOfRange`] rather than trust their caller.
//!
//! Durability contract: a write completes when the device holds the data (a later read sees
//! it); it is durable across power loss only after a flush completes. `Write { fua: true }`
//! completes only once the data is durable; `preflush` makes everything completed before it
//! durable before the write starts.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

/// What the engine needs to know about a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Logical block size in bytes: a power of two, at least 512.
    pub sector_size: u32,
    /// Physical block size in bytes (a hint for the frontend), a multiple of `sector_size`.
    pub physical_sector_size: u32,
    /// Capacity in logical sectors.
    pub sectors: u64,
    /// The medium refuses writes.
    pub read_only: bool,
    /// Discard support, if any.
    pub discard: Option<DiscardInfo>,
}

impl DeviceInfo {
    /// Capacity in bytes, `None` if it does not fit a `u64`.
    pub fn capacity_bytes(&self) -> Option<u64> {
        self.sectors.checked_mul(u64::from(self.sector_size))
    }

    /// Check the invariants the engine relies on.
    pub fn validate(&self) -> Result<(), DeviceError> {
        let ss = self.sector_size;
        let ok = ss.is_power_of_two()
            && (512..=4096).contains(&ss)
            && self.physical_sector_size >= ss
            && self.physical_sector_size.is_power_of_two()
            && self.capacity_bytes().is_some();
        if ok {
            Ok(())
        } else {
            Err(DeviceError::BadGeometry)
        }
    }
}

/// What a device says about discard (the `discard-*` keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardInfo {
    /// Bytes; discards are most effective in multiples of this.
    pub granularity: u32,
    /// Bytes; offset of the first granule.
    pub alignment: u32,
    /// Discarded data is guaranteed unrecoverable (`discard-secure`).
    pub secure: bool,
}

/// Why the device failed an operation. Not the frontend's fault (it is answered
/// `BLKIF_RSP_ERROR` all the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("range {offset:#x}+{len:#x} is outside the device")]
    OutOfRange { offset: u64, len: u64 },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("the device does not support this operation")]
    Unsupported,
    #[error(
        "device geometry invalid: sector size must be a power of two in 512..=4096, physical sector size a power of two ≥ it, capacity below 2^64 bytes"
    )]
    BadGeometry,
    #[error("I/O error (errno {errno})")]
    Io { errno: i32 },
}

/// A disk, driven synchronously.
pub trait BlockDevice {
    fn info(&self) -> DeviceInfo;
    /// Fill `buf` from byte `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Store `data` at byte `offset`; on return the device holds it (not yet durably).
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// Make every completed write durable.
    fn flush(&mut self) -> Result<(), DeviceError>;
    /// Forget `len` bytes at `offset` (later reads return zeroes). `secure`: the old data
    /// must be unrecoverable; refuse with `Unsupported` if that cannot be promised.
    fn discard(&mut self, offset: u64, len: u64, secure: bool) -> Result<(), DeviceError>;
}

/// A window of another device: `sectors` sectors from sector `start` (a partition), served
/// as a whole disk of its own, optionally read-only. Every access is checked against the
/// window before it reaches the device, so a frontend of one partition never touches another.
pub struct Partition<D> {
    inner: D,
    start_byte: u64,
    len_bytes: u64,
    read_only: bool,
}

impl<D: BlockDevice> Partition<D> {
    /// `BadGeometry` for an empty window or one that does not lie inside `inner`.
    pub fn new(inner: D, start: u64, sectors: u64, read_only: bool) -> Result<Self, DeviceError> {
        let info = inner.info();
        let ss = u64::from(info.sector_size);
        let start_byte = start.checked_mul(ss).ok_or(DeviceError::BadGeometry)?;
        let len_bytes = sectors.checked_mul(ss).ok_or(DeviceError::BadGeometry)?;
        let end = start.checked_add(sectors).ok_or(DeviceError::BadGeometry)?;
        if sectors == 0 || end > info.sectors {
            return Err(DeviceError::BadGeometry);
        }
        Ok(Partition {
            inner,
            start_byte,
            len_bytes,
            read_only: read_only || info.read_only,
        })
    }

    /// The device it is a window of.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: BlockDevice> BlockDevice for Partition<D> {
    fn info(&self) -> DeviceInfo {
        let mut i = self.inner.info();
        i.sectors = self.len_bytes / u64::from(i.sector_size);
        i.read_only = self.read_only;
        i
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_range(offset, buf.len() as u64, self.len_bytes)?;
        self.inner.read(self.start_byte + offset, buf)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        check_range(offset, data.len() as u64, self.len_bytes)?;
        self.inner.write(self.start_byte + offset, data)
    }

    fn flush(&mut self) -> Result<(), DeviceError> {
        self.inner.flush()
    }

    fn discard(&mut self, offset: u64, len: u64, secure: bool) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        check_range(offset, len, self.len_bytes)?;
        self.inner.discard(self.start_byte + offset, len, secure)
    }
}

/// Check `offset + len` against `capacity` without overflow.
pub fn check_range(offset: u64, len: u64, capacity: u64) -> Result<(), DeviceError> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(DeviceError::OutOfRange { offset, len }),
    }
}

/// One operation submitted to a [`BlockIo`]. Buffers are owned, so the device may keep them
/// (e.g. for DMA) until it completes the operation.
#[derive(Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Read `buf.len()` bytes from `offset` into `buf`.
    Read {
        offset: u64,
        buf: Vec<u8>,
    },
    /// Write `data` at `offset`; `preflush`: flush before; `fua`: durable on completion.
    Write {
        offset: u64,
        data: Vec<u8>,
        preflush: bool,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
        secure: bool,
    },
}

/// A submitted operation, tagged by the submitter.
#[derive(Debug, PartialEq, Eq)]
pub struct IoRequest {
    pub tag: u64,
    pub op: IoOp,
}

/// A finished operation. `buf` holds the data of a read (and gives back a write's buffer).
#[derive(Debug, PartialEq, Eq)]
pub struct IoCompletion {
    pub tag: u64,
    pub result: Result<(), DeviceError>,
    pub buf: Vec<u8>,
}

/// A device driven as a queue: submit now, collect completions later, in any order.
pub trait BlockIo {
    fn info(&self) -> DeviceInfo;
    /// Start `req`. Never refuses: the engine bounds what it keeps in flight.
    fn submit(&mut self, req: IoRequest);
    /// The next finished operation, if any.
    fn poll(&mut self) -> Option<IoCompletion>;
}

/// A [`BlockIo`] over a synchronous [`BlockDevice`]: runs each operation at submission and
/// queues its completion.
#[derive(Debug)]
pub struct SyncIo<D> {
    device: D,
    done: VecDeque<IoCompletion>,
}

impl<D: BlockDevice> SyncIo<D> {
    pub fn new(device: D) -> Self {
        SyncIo {
            device,
            done: VecDeque::new(),
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn into_inner(self) -> D {
        self.device
    }

    /// Run one operation on `device` (shared by every synchronous adapter).
    pub fn execute(device: &mut D, op: IoOp) -> (Result<(), DeviceError>, Vec<u8>) {
        match op {
            IoOp::Read { offset, mut buf } => {
                let r = device.read(offset, &mut buf);
                (r, buf)
            }
            IoOp::Write {
                offset,
                data,
                preflush,
                fua,
            } => {
                let r = (|| {
                    if preflush {
                        device.flush()?;
                    }
                    device.write(offset, &data)?;
                    if fua {
                        device.flush()?;
                    }
                    Ok(())
                })();
                (r, data)
            }
            IoOp::Flush => (device.flush(), Vec::new()),
            IoOp::Discard {
                offset,
                len,
                secure,
            } => (device.discard(offset, len, secure), Vec::new()),
        }
    }
}

impl<D: BlockDevice> BlockIo for SyncIo<D> {
    fn info(&self) -> DeviceInfo {
        self.device.info()
    }

    fn submit(&mut self, req: IoRequest) {
        let (result, buf) = Self::execute(&mut self.device, req.op);
        self.done.push_back(IoCompletion {
            tag: req.tag,
            result,
            buf,
        });
    }

    fn poll(&mut self) -> Option<IoCompletion> {
        self.done.pop_front()
    }
}

/// A disk in memory. Flush has nothing to do (there is no volatile cache between the
/// engine and the bytes); discard zeroes, which is also a secure discard.
#[derive(Clone, Debug)]
pub struct RamDisk {
    data: Vec<u8>,
    sector_size: u32,
    read_only: bool,
    /// Flushes performed (observable by tests and benches).
    pub flushes: u64,
}

impl RamDisk {
    /// A zeroed disk of `sectors` logical sectors of `sector_size` bytes.
    pub fn new(sectors: u64, sector_size: u32) -> Result<Self, DeviceError> {
        let info = DeviceInfo {
            sector_size,
            physical_sector_size: sector_size,
            sectors,
            read_only: false,
            discard: None,
        };
        info.validate()?;
        let bytes = info
            .capacity_bytes()
            .and_then(|b| usize::try_from(b).ok())
            .ok_or(DeviceError::BadGeometry)?;
        Ok(RamDisk {
            data: vec![0; bytes],
            sector_size,
            read_only: false,
            flushes: 0,
        })
    }

    /// The same disk, refusing writes.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// The disk's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The disk's bytes, writable (tests preloading content).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    fn range(&self, offset: u64, len: usize) -> Result<core::ops::Range<usize>, DeviceError> {
        let err = DeviceError::OutOfRange {
            offset,
            len: len as u64,
        };
        let start = usize::try_from(offset).map_err(|_| err)?;
        let end = start.checked_add(len).ok_or(err)?;
        if end > self.data.len() {
            return Err(err);
        }
        Ok(start..end)
    }
}

impl BlockDevice for RamDisk {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            sector_size: self.sector_size,
            physical_sector_size: self.sector_size,
            sectors: self.data.len() as u64 / u64::from(self.sector_size),
            read_only: self.read_only,
            discard: Some(DiscardInfo {
                granularity: self.sector_size,
                alignment: 0,
                secure: true,
            }),
        }
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        let r = self.range(offset, data.len())?;
        self.data[r].copy_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DeviceError> {
        self.flushes += 1;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64, _secure: bool) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        let len_usize =
            usize::try_from(len).map_err(|_| DeviceError::OutOfRange { offset, len })?;
        let r = self.range(offset, len_usize)?;
        self.data[r].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_disk_reads_back_writes_and_refuses_out_of_range() {
        let mut d = RamDisk::new(16, 512).unwrap();
        d.write(1024, &[7; 512]).unwrap();
        let mut b = [0u8; 1024];
        d.read(512, &mut b).unwrap();
        assert_eq!(&b[..512], &[0; 512]);
        assert_eq!(&b[512..], &[7; 512]);
        assert_eq!(
            d.read(8192 - 511, &mut [0; 512]),
            Err(DeviceError::OutOfRange {
                offset: 8192 - 511,
                len: 512
            })
        );
        assert!(d.write(u64::MAX, &[1]).is_err());
        assert!(d.discard(4096, u64::MAX, false).is_err());
        d.discard(1024, 512, true).unwrap();
        d.read(1024, &mut b[..512]).unwrap();
        assert_eq!(&b[..512], &[0; 512]);
    }

    #[test]
    fn ram_disk_read_only_refuses_writes_and_discards() {
        let mut d = RamDisk::new(8, 512).unwrap().read_only();
        assert!(d.info().read_only);
        assert_eq!(d.write(0, &[1; 512]), Err(DeviceError::ReadOnly));
        assert_eq!(d.discard(0, 512, false), Err(DeviceError::ReadOnly));
    }

    #[test]
    fn geometry_is_validated() {
        assert_eq!(RamDisk::new(8, 1000).unwrap_err(), DeviceError::BadGeometry);
        assert_eq!(RamDisk::new(8, 256).unwrap_err(), DeviceError::BadGeometry);
        assert_eq!(
            RamDisk::new(u64::MAX, 4096).unwrap_err(),
            DeviceError::BadGeometry
        );
        assert_eq!(
            check_range(u64::MAX, 1, u64::MAX),
            Err(DeviceError::OutOfRange {
                offset: u64::MAX,
                len: 1
            })
        );
        assert_eq!(check_range(10, 6, 16), Ok(()));
    }

    #[test]
    fn sync_io_write_with_preflush_and_fua_flushes_twice() {
        let mut io = SyncIo::new(RamDisk::new(8, 512).unwrap());
        io.submit(IoRequest {
            tag: 5,
            op: IoOp::Write {
                offset: 0,
                data: vec![3; 512],
                preflush: true,
                fua: true,
            },
        });
        let c = io.poll().unwrap();
        assert_eq!((c.tag, c.result), (5, Ok(())));
        assert_eq!(io.device().flushes, 2);
        assert_eq!(&io.device().bytes()[..512], &[3; 512]);
        assert!(io.poll().is_none());
    }

    #[test]
    fn a_partition_is_a_disk_of_its_own_and_never_reaches_outside() {
        let mut disk = RamDisk::new(64, 512).unwrap();
        disk.write(0, &[0xaa; 512 * 64]).unwrap();
        let mut p = Partition::new(disk, 8, 16, false).unwrap();
        assert_eq!(p.info().sectors, 16);
        p.write(0, &[1; 512]).unwrap();
        p.write(15 * 512, &[2; 512]).unwrap();
        assert_eq!(
            p.write(16 * 512, &[3; 1]),
            Err(DeviceError::OutOfRange {
                offset: 16 * 512,
                len: 1
            })
        );
        assert!(p.read(15 * 512 + 1, &mut [0; 512]).is_err());
        assert!(p.read(u64::MAX, &mut [0; 1]).is_err());
        assert!(p.discard(0, 17 * 512, false).is_err());
        let mut whole = [0u8; 512 * 64];
        p.inner.read(0, &mut whole).unwrap();
        assert!(whole[..8 * 512].iter().all(|&b| b == 0xaa));
        assert!(whole[8 * 512..9 * 512].iter().all(|&b| b == 1));
        assert!(whole[23 * 512..24 * 512].iter().all(|&b| b == 2));
        assert!(whole[24 * 512..].iter().all(|&b| b == 0xaa));
        // Read-only windows refuse writes and discards but read.
        let mut ro = Partition::new(p.inner, 0, 8, true).unwrap();
        assert!(ro.info().read_only);
        assert_eq!(ro.write(0, &[0; 512]), Err(DeviceError::ReadOnly));
        assert_eq!(ro.discard(0, 512, false), Err(DeviceError::ReadOnly));
        let mut b = [0u8; 512];
        ro.read(0, &mut b).unwrap();
        assert_eq!(b, [0xaa; 512]);
    }

    #[test]
    fn partitions_outside_the_disk_are_refused() {
        for (start, sectors) in [(0, 0), (60, 5), (64, 1), (u64::MAX, 2), (1, u64::MAX)] {
            let disk = RamDisk::new(64, 512).unwrap();
            assert_eq!(
                Partition::new(disk, start, sectors, false).err(),
                Some(DeviceError::BadGeometry),
                "{start}+{sectors}"
            );
        }
        assert!(Partition::new(RamDisk::new(64, 512).unwrap(), 0, 64, false).is_ok());
    }
}
