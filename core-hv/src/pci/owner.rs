//! What the hypercall layer sees of PCI: a driver domain's configuration-space reads and
//! writes, answered through the config filter. The portable hypervisor holds one
//! [`OwnerConfig`] (the arch layer's, or [`Filtered`] over a fake in tests); it is reached only
//! with a [`DeviceToken`], which the policy module mints for domains holding `device_owner`.
//!
//! Invariant: every access goes through [`ConfigFilter`]; nothing here touches config space
//! on its own.

use shared_abi::DomId;
use shared_abi::errno::XenError;

use super::filter::{ConfigFilter, MsixTable};
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
    /// May the token's domain map host-physical `[phys, phys + len)`
    /// ([`ConfigFilter::bar_window`])? Returns the function.
    fn bar_window(&self, who: &DeviceToken, phys: u64, len: u64) -> Result<PciAddress, XenError> {
        let _ = (who, phys, len);
        Err(XenError::ENODEV)
    }
    /// The MSI-X table of the token's function `address` ([`ConfigFilter::msix_table`]).
    fn msix_table(&self, who: &DeviceToken, address: PciAddress) -> Result<MsixTable, XenError> {
        let _ = (who, address);
        Err(XenError::ENODEV)
    }
    /// Write MSI-X `entry` of `owner`'s function `address`: aimed at CPU `vector` and
    /// unmasked, or masked (`None`). `ENODEV` if `owner` no longer owns it.
    fn msix_program(
        &mut self,
        owner: DomId,
        address: PciAddress,
        entry: u16,
        vector: Option<u8>,
    ) -> Result<(), XenError> {
        let _ = (owner, address, entry, vector);
        Err(XenError::ENODEV)
    }
    /// Set or clear only the mask bit of an entry (the storm limiter); ignored if `owner` no
    /// longer owns it.
    fn msix_mask(&mut self, owner: DomId, address: PciAddress, entry: u16, masked: bool) {
        let _ = (owner, address, entry, masked);
    }
    /// For host tests to reach the fake behind the trait object.
    #[cfg(test)]
    fn as_any(&mut self) -> &mut dyn core::any::Any;
}

/// The filter over a configuration space it owns (host tests: MSI-X table writes are
/// recorded in `msix`, newest last, instead of reaching MMIO).
pub struct Filtered<C> {
    pub filter: ConfigFilter,
    pub cfg: C,
    /// (function, entry, vector or `None` for masked).
    pub msix: alloc::vec::Vec<(PciAddress, u16, Option<u8>)>,
}

impl<C: ConfigAccess + Send + 'static> OwnerConfig for Filtered<C> {
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

    fn bar_window(&self, who: &DeviceToken, phys: u64, len: u64) -> Result<PciAddress, XenError> {
        self.filter.bar_window(who.caller(), phys, len)
    }

    #[cfg(test)]
    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }

    fn msix_table(&self, who: &DeviceToken, address: PciAddress) -> Result<MsixTable, XenError> {
        self.filter.msix_table(who.caller(), address)
    }

    fn msix_program(
        &mut self,
        owner: DomId,
        address: PciAddress,
        entry: u16,
        vector: Option<u8>,
    ) -> Result<(), XenError> {
        let t = self.filter.msix_table(owner, address)?;
        if entry >= t.entries {
            return Err(XenError::EINVAL);
        }
        self.msix.push((address, entry, vector));
        Ok(())
    }

    fn msix_mask(&mut self, owner: DomId, address: PciAddress, entry: u16, masked: bool) {
        if self.filter.owner(address) == Some(owner) {
            let last = self
                .msix
                .iter()
                .rev()
                .find(|(a, e, v)| *a == address && *e == entry && v.is_some())
                .and_then(|(_, _, v)| *v);
            self.msix
                .push((address, entry, if masked { None } else { last }));
        }
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
