//! Polled 16550 UART driver for COM1 (I/O port 0x3f8): 115200 8N1, FIFOs on, no interrupts.
//!
//! The port is a single hardware resource: [`Serial`] values are only handed out by the console
//! module, under its lock (or by the fatal path once it has stopped everything else).

const COM1: u16 = 0x3f8;
const DATA: u16 = 0;
const IER: u16 = 1;
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Handle on COM1.
pub struct Serial(());

impl Serial {
    /// # Safety
    /// The caller must serialise use of the port (the console lock does).
    pub const unsafe fn new() -> Serial {
        Serial(())
    }

    /// Program the UART. Called once, before any output.
    pub fn init(&mut self) {
        // SAFETY: COM1 belongs to this driver; these writes only configure the UART.
        unsafe {
            super::cpu::outb(COM1 + IER, 0x00); // no interrupts: polled
            super::cpu::outb(COM1 + LCR, 0x80); // DLAB on
            super::cpu::outb(COM1, 0x01); // divisor 1 = 115200 baud
            super::cpu::outb(COM1 + 1, 0x00);
            super::cpu::outb(COM1 + LCR, 0x03); // 8N1, DLAB off
            super::cpu::outb(COM1 + FCR, 0xc7); // FIFO on, cleared, 14-byte threshold
            super::cpu::outb(COM1 + MCR, 0x03); // DTR | RTS; OUT2 off keeps the IRQ line quiet
        }
    }

    pub fn write_byte(&mut self, b: u8) {
        // SAFETY: COM1 belongs to this driver; polling LSR and writing THR have no memory
        // effects. A bounded wait: a missing UART must not hang the hypervisor.
        unsafe {
            for _ in 0..100_000 {
                if super::cpu::inb(COM1 + LSR) & LSR_THR_EMPTY != 0 {
                    break;
                }
            }
            super::cpu::outb(COM1 + DATA, b);
        }
    }
}

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            self.write_byte(b);
        }
        Ok(())
    }
}

/// The management line: COM2 (I/O port 0x2f8), polled like COM1, present only when the
/// machine has a second UART (`cargo hv run` gives QEMU one on a unix socket for `hvctl`).
pub mod com2 {
    use core::sync::atomic::{AtomicBool, Ordering};

    use super::{DATA, FCR, IER, LCR, LSR, LSR_THR_EMPTY, MCR};

    const COM2: u16 = 0x2f8;
    const SCRATCH: u16 = 7;
    const LSR_DATA_READY: u8 = 1;

    static PRESENT: AtomicBool = AtomicBool::new(false);

    /// Look for the UART (its scratch register keeps what is written; an absent port reads
    /// 0xff) and program it: 115200 8N1, FIFOs on, no interrupts. Called once at boot.
    pub fn probe() -> bool {
        // SAFETY: COM2 is not used by anything else in the hypervisor; these accesses only
        // configure the UART or read back its scratch register.
        let found = unsafe {
            super::super::cpu::outb(COM2 + SCRATCH, 0x5a);
            let a = super::super::cpu::inb(COM2 + SCRATCH);
            super::super::cpu::outb(COM2 + SCRATCH, 0xa5);
            let b = super::super::cpu::inb(COM2 + SCRATCH);
            (a, b) == (0x5a, 0xa5)
        };
        if found {
            // SAFETY: as above; the port exists.
            unsafe {
                super::super::cpu::outb(COM2 + IER, 0x00);
                super::super::cpu::outb(COM2 + LCR, 0x80);
                super::super::cpu::outb(COM2, 0x01);
                super::super::cpu::outb(COM2 + 1, 0x00);
                super::super::cpu::outb(COM2 + LCR, 0x03);
                super::super::cpu::outb(COM2 + FCR, 0xc7);
                super::super::cpu::outb(COM2 + MCR, 0x03);
            }
        }
        PRESENT.store(found, Ordering::Release);
        found
    }

    /// The hypervisor's view of COM2 as the management line. Accesses are serialised by the
    /// hypervisor lock every hypercall holds.
    pub struct Line;

    impl crate::domain::console::MgmtLine for Line {
        fn present(&self) -> bool {
            PRESENT.load(Ordering::Acquire)
        }

        fn read(&mut self, buf: &mut [u8]) -> usize {
            if !self.present() {
                return 0;
            }
            let mut n = 0;
            for b in buf.iter_mut() {
                // SAFETY: COM2 is present and only this module touches it; reading LSR and
                // RBR has no memory effects.
                let byte = unsafe {
                    if super::super::cpu::inb(COM2 + LSR) & LSR_DATA_READY == 0 {
                        break;
                    }
                    super::super::cpu::inb(COM2 + DATA)
                };
                *b = byte;
                n += 1;
            }
            n
        }

        fn write(&mut self, data: &[u8]) -> usize {
            if !self.present() {
                return 0;
            }
            let mut n = 0;
            for &b in data {
                // SAFETY: as in `read`; a bounded wait, a stalled line stops the write.
                let sent = unsafe {
                    let mut ready = false;
                    for _ in 0..100_000 {
                        if super::super::cpu::inb(COM2 + LSR) & LSR_THR_EMPTY != 0 {
                            ready = true;
                            break;
                        }
                    }
                    if ready {
                        super::super::cpu::outb(COM2 + DATA, b);
                    }
                    ready
                };
                if !sent {
                    break;
                }
                n += 1;
            }
            n
        }
    }
}
