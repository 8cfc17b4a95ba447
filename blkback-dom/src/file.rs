//! A disk backed by a host file (feature `std`): positional reads and writes, `fdatasync`
//! (`File::sync_data`) for flush, and hole punching for discard.
//!
//! The capacity is fixed when the file is opened (its length rounded down to whole logical
//! sectors); the file is never grown or shrunk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{FallocateFlags, fallocate};

use crate::device::{BlockDevice, DeviceError, DeviceInfo, DiscardInfo, check_range};

fn io_err(e: &std::io::Error) -> DeviceError {
    // EIO when the error carries no errno (never expected from file I/O).
    DeviceError::Io {
        errno: e.raw_os_error().unwrap_or(5),
    }
}

/// A file used as a disk.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    sector_size: u32,
    sectors: u64,
    read_only: bool,
    /// Flushes performed (`fdatasync` calls).
    pub flushes: u64,
}

impl FileDisk {
    /// Open `path` as a disk of `sector_size`-byte sectors; `read_only` opens it without
    /// write access.
    pub fn open(path: &Path, sector_size: u32, read_only: bool) -> Result<Self, DeviceError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| io_err(&e))?;
        let len = file.metadata().map_err(|e| io_err(&e))?.len();
        let disk = FileDisk {
            file,
            sector_size,
            sectors: len / u64::from(sector_size.max(1)),
            read_only,
            flushes: 0,
        };
        disk.info().validate()?;
        Ok(disk)
    }

    /// Create (or truncate) `path` as a zeroed disk of `sectors` sectors and open it.
    pub fn create(path: &Path, sector_size: u32, sectors: u64) -> Result<Self, DeviceError> {
        let bytes = sectors
            .checked_mul(u64::from(sector_size))
            .ok_or(DeviceError::BadGeometry)?;
        let file = File::create(path).map_err(|e| io_err(&e))?;
        file.set_len(bytes).map_err(|e| io_err(&e))?;
        drop(file);
        FileDisk::open(path, sector_size, false)
    }

    fn capacity(&self) -> u64 {
        self.sectors * u64::from(self.sector_size)
    }
}

impl BlockDevice for FileDisk {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            sector_size: self.sector_size,
            physical_sector_size: self.sector_size,
            sectors: self.sectors,
            read_only: self.read_only,
            discard: (!self.read_only).then_some(DiscardInfo {
                granularity: 4096.max(self.sector_size),
                alignment: 0,
                // A punched hole may leave the old blocks on the medium.
                secure: false,
            }),
        }
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_range(offset, buf.len() as u64, self.capacity())?;
        self.file.read_exact_at(buf, offset).map_err(|e| io_err(&e))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        check_range(offset, data.len() as u64, self.capacity())?;
        self.file.write_all_at(data, offset).map_err(|e| io_err(&e))
    }

    fn flush(&mut self) -> Result<(), DeviceError> {
        self.flushes += 1;
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| io_err(&e))
    }

    fn discard(&mut self, offset: u64, len: u64, secure: bool) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        if secure {
            return Err(DeviceError::Unsupported);
        }
        check_range(offset, len, self.capacity())?;
        if len == 0 {
            return Ok(());
        }
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match fallocate(&self.file, punch, offset, len) {
            Ok(()) => Ok(()),
            // A file system without hole punching: zero the range instead (same contents).
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let zeros = vec![0u8; 1 << 16];
                let mut pos = offset;
                let end = offset + len;
                while pos < end {
                    let n = (end - pos).min(zeros.len() as u64) as usize;
                    self.file
                        .write_all_at(&zeros[..n], pos)
                        .map_err(|e| io_err(&e))?;
                    pos += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(DeviceError::Io {
                errno: e.raw_os_error(),
            }),
        }
    }
}
