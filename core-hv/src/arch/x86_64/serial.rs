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
