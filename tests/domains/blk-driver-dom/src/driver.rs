//! The virtio-blk driver the roles share: device setup on dom-rt's layer and requests waited
//! for on the interrupt's event channel.

use alloc::format;
use alloc::string::String;

use dom_rt::device::dma::DmaBuffer;
use dom_rt::device::irq::Interrupt;
use dom_rt::device::virtio::{VirtioPci, VirtioTransport};
use dom_rt::device::{self, Device};
use dom_rt::event::Waiter;
use dom_rt::time;
use virtio_drivers::Hal;
use virtio_drivers::device::blk::{BlkReq, BlkResp, SECTOR_SIZE, VirtIOBlk};

/// virtio-blk: transitional and modern device ids.
const VIRTIO_VENDOR: u16 = 0x1af4;
const BLK_IDS: [u16; 2] = [0x1001, 0x1042];
/// The MSI-X entry the request queue uses.
pub const QUEUE_ENTRY: u16 = 0;
/// How long a request may take before it counts as lost.
pub const REQUEST_TIMEOUT_NS: u64 = 3_000_000_000;

pub type Blk<H> = VirtIOBlk<H, VirtioTransport>;

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter (CR4.TSD is clear for domains).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The device, its interrupt and the events taken so far.
pub struct Driver {
    pub pci: VirtioPci,
    pub irq: Interrupt,
    pub w: Waiter,
}

/// How a request ended when it did not succeed.
#[derive(Debug)]
pub enum RequestError {
    /// No completion within the time limit; `status` is the device status then.
    Timeout { status: u8, event: bool },
    /// The device completed it but no event came within the time limit.
    NoInterrupt,
    /// The device completed it with an error.
    Device(virtio_drivers::Error),
    /// Queueing or completing it failed.
    Queue(virtio_drivers::Error),
}

impl core::fmt::Display for RequestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RequestError::Timeout { status, event } => write!(
                f,
                "no completion (device status {status:#x}, event {})",
                if *event { "seen" } else { "not seen" }
            ),
            RequestError::NoInterrupt => write!(f, "completed, but no interrupt event came"),
            RequestError::Device(e) => write!(f, "device error {e:?}"),
            RequestError::Queue(e) => write!(f, "queue error {e:?}"),
        }
    }
}

/// One finished request.
pub struct Done {
    /// TSC when the waiting code saw the event.
    pub event_tsc: u64,
}

impl Driver {
    /// Find the virtio-blk function, prepare it and bind MSI-X entry 0.
    pub fn open() -> Result<Driver, String> {
        let dev: Device = device::find(VIRTIO_VENDOR, &BLK_IDS)
            .ok_or_else(|| format!("no virtio-blk among {} device(s)", device::assigned().len()))?;
        let pci = VirtioPci::open(dev).map_err(|e| format!("virtio-pci setup: {e}"))?;
        let irq = pci
            .device()
            .bind_msix(QUEUE_ENTRY)
            .map_err(|e| format!("MSI-X entry {QUEUE_ENTRY}: {e}"))?;
        Ok(Driver {
            pci,
            irq,
            w: Waiter::new(),
        })
    }

    /// Initialise the device with `virtio-drivers` (a reset, feature negotiation, queue 0 routed
    /// to the bound MSI-X entry) and check it is running.
    pub fn disk<H: Hal>(&self) -> Result<Blk<H>, String> {
        let t = self
            .pci
            .transport()
            .map_err(|e| format!("transport: {e}"))?
            .with_queue_vector(0, self.irq.entry());
        let blk = Blk::<H>::new(t).map_err(|e| format!("virtio-blk init: {e:?}"))?;
        let status = self.pci.device_status().map_err(|e| format!("{e:?}"))?;
        if status & 0x0c != 0x0c {
            return Err(format!(
                "device not running after init (status {status:#x}; features refused?)"
            ));
        }
        let v = self.pci.queue_vector(0).map_err(|e| format!("{e:?}"))?;
        if v != self.irq.entry() {
            return Err(format!("queue 0 MSI-X vector reads {v:#x}"));
        }
        Ok(blk)
    }

    /// Read `buf.len()` bytes (whole sectors) at `sector` into `buf`, waiting for the
    /// interrupt's event.
    pub fn read<H: Hal>(
        &mut self,
        blk: &mut Blk<H>,
        sector: usize,
        buf: &mut [u8],
    ) -> Result<Done, RequestError> {
        let mut req = BlkReq::default();
        let mut resp = BlkResp::default();
        // SAFETY: req, buf and resp stay borrowed here until the request completed or the
        // device was found not to complete it (the caller then resets it before reuse).
        let token = unsafe { blk.read_blocks_nb(sector, &mut req, buf, &mut resp) }
            .map_err(RequestError::Queue)?;
        let done = self.wait_used(blk, token)?;
        // SAFETY: the same buffers as passed to read_blocks_nb for `token`.
        unsafe { blk.complete_read_blocks(token, &req, buf, &mut resp) }
            .map_err(RequestError::Device)?;
        Ok(done)
    }

    /// Write `buf` (whole sectors) at `sector`, waiting for the interrupt's event.
    pub fn write<H: Hal>(
        &mut self,
        blk: &mut Blk<H>,
        sector: usize,
        buf: &[u8],
    ) -> Result<Done, RequestError> {
        let mut req = BlkReq::default();
        let mut resp = BlkResp::default();
        // SAFETY: as in `read`.
        let token = unsafe { blk.write_blocks_nb(sector, &mut req, buf, &mut resp) }
            .map_err(RequestError::Queue)?;
        let done = self.wait_used(blk, token)?;
        // SAFETY: the same buffers as passed to write_blocks_nb for `token`.
        unsafe { blk.complete_write_blocks(token, &req, buf, &mut resp) }
            .map_err(RequestError::Device)?;
        Ok(done)
    }

    /// Block on the interrupt's event channel until `token` is used or the time limit passes.
    fn wait_used<H: Hal>(&mut self, blk: &mut Blk<H>, token: u16) -> Result<Done, RequestError> {
        let deadline = time::now_ns() + REQUEST_TIMEOUT_NS;
        let mut event = false;
        loop {
            let fired = self.irq.wait_until(&mut self.w, deadline).unwrap_or(false);
            let event_tsc = rdtsc();
            event |= fired;
            if blk.peek_used() == Some(token) {
                if !fired {
                    // Used, but the time limit passed without an event: no interrupts.
                    return Err(RequestError::NoInterrupt);
                }
                return Ok(Done { event_tsc });
            }
            if !fired || time::now_ns() >= deadline {
                return Err(RequestError::Timeout {
                    status: self.pci.device_status().unwrap_or(0xff),
                    event,
                });
            }
        }
    }
}

/// One sector-sized DMA buffer.
pub fn sector_buffer() -> Result<DmaBuffer, String> {
    DmaBuffer::new(1).map_err(|e| format!("DMA buffer: {e:?}"))
}

pub const SECTOR: usize = SECTOR_SIZE;

/// FNV-1a of `b` (what the scenario compares a sector with).
pub fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}
