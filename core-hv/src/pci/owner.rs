//! What the hypercall layer sees of PCI: a driver domain's configuration-space reads and
//! writes, answered through the config filter. The portable hypervisor holds one
//! [`OwnerConfig`] (the arch layer's, or [`Filtered`] over a fake in tests); it is reached only
//! with a [`DeviceToken`], which the policy module mints for domains holding `device_owner`.
//!
//! Invariant: every access goes through [`ConfigFilter`]; nothing here touches config space
//! on its own.

use shared_abi::DomId;
use shared_abi::errno::XenError;

use super::filter::ConfigFilter;
use super::{ConfigAccess, PciAddress};
use crate::policy::DeviceToken;

/// A driver domain's way to its functions' configuration space.
pub trait OwnerConfig: Send {
    /// Read `size` bytes at `offset` of `address` for the token's domain.
    fn read(
        &self,
        who: &DeviceToken,
        address: PciAddress,
        offset: u16,
        size: u8,
    ) -> Result<u32, XenError>;
    /// Write `value` (`size` bytes) at `offset` of `address` for the token's domain.
    fn write(
        &mut self,
        who: &DeviceToken,
        address: PciAddress,
        offset: u16,
        size: u8,
        value: u32,
    ) -> Result<(), XenError>;
    /// `dom` is dying: take back every function it owns (quiesced, DMA blocked, its DMA
    /// space gone). Called before any of its frames returns to the pool.
    fn release(&mut self, dom: DomId);
    /// `dom` gained pages (domain address, host physical address, writable): let its
    /// devices reach them too. Best effort: a page left out is only unreachable by DMA.
    fn dma_map(&mut self, _dom: DomId, _pages: &[(u64, u64, bool)]) {}
    /// `dom` gives pages back: remove them from its devices' view and wait until the IOMMU
    /// forgot them. `false` if that could not be ensured (the pages must then stay).
    fn dma_unmap(&mut self, _dom: DomId, _vas: &[u64]) -> bool {
        true
    }
}

/// The filter over a configuration space it owns.
pub struct Filtered<C> {
    pub filter: ConfigFilter,
    pub cfg: C,
}

impl<C: ConfigAccess + Send> OwnerConfig for Filtered<C> {
    fn read(
        &self,
        who: &DeviceToken,
        address: PciAddress,
        offset: u16,
        size: u8,
    ) -> Result<u32, XenError> {
        self.filter
            .read(&self.cfg, who.caller(), address, offset, size)
    }

    fn write(
        &mut self,
        who: &DeviceToken,
        address: PciAddress,
        offset: u16,
        size: u8,
        value: u32,
    ) -> Result<(), XenError> {
        self.filter
            .write(&mut self.cfg, who.caller(), address, offset, size, value)
    }

    fn release(&mut self, dom: DomId) {
        for a in self.filter.release(dom) {
            // Bus mastering off: the function can no longer touch memory on its own.
            let cmd = self.cfg.read16(a, super::reg::COMMAND);
            self.cfg.write(
                a,
                super::reg::COMMAND,
                2,
                u32::from(cmd & !super::command::BUS_MASTER),
            );
        }
    }
}
