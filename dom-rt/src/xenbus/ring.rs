//! The domain's side of the xenstore ring page: write requests, read responses.
//!
//! The domain owns `req_prod` and `rsp_cons` (kept as private copies, so the server cannot
//! make us skip or repeat bytes by writing them); the server owns `req_cons` and `rsp_prod`,
//! each read once per call and checked: `req_prod − req_cons` and `rsp_prod − rsp_cons` must
//! each be at most [`RING_SIZE`], or the ring is [`RingFault::BadIndex`]. A non-zero `error`
//! field (the server gave up on us) is [`RingFault::Server`]. Either way the stream is out of
//! sync; the way back is [`ClientRing::request_reconnect`] when the server offers it.
//!
//! Ordering (XEN-ABI.md §7.4): writer copies bytes, then stores `req_prod` with release;
//! reader loads `rsp_prod` with acquire, copies, then stores `rsp_cons` with release.

use shared_abi::xenstore::{CONNECTED, RECONNECT, RING_SIZE, features, ring_error, ring_mask};

pub use shared_abi::xenstore::page::{RingPage, offsets};

/// Why the ring cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingFault {
    /// The page is shorter than the interface.
    PageTooSmall(usize),
    /// `connection` is not `CONNECTED` (a reconnection is under way).
    NotConnected,
    /// The server published an index outside the ring.
    BadIndex,
    /// The server set the `error` field to this value.
    Server(u32),
}

/// The domain's half of a xenstore ring page.
#[derive(Debug)]
pub struct ClientRing<P> {
    page: P,
    req_prod: u32,
    rsp_cons: u32,
    fault: Option<RingFault>,
}

impl<P: RingPage> ClientRing<P> {
    /// Take over the page as it is: indices need not start at 0 (the ring may have been
    /// used by an earlier kernel or boot stage), but they must describe a possible state.
    pub fn new(page: P) -> Result<Self, RingFault> {
        if page.size() < offsets::END {
            return Err(RingFault::PageTooSmall(page.size()));
        }
        if page.load_u32(offsets::CONNECTION) != CONNECTED {
            return Err(RingFault::NotConnected);
        }
        let req_cons = page.load_u32(offsets::REQ_CONS);
        let req_prod = page.load_u32(offsets::REQ_PROD);
        let rsp_cons = page.load_u32(offsets::RSP_CONS);
        let rsp_prod = page.load_u32(offsets::RSP_PROD);
        if req_prod.wrapping_sub(req_cons) as usize > RING_SIZE
            || rsp_prod.wrapping_sub(rsp_cons) as usize > RING_SIZE
        {
            return Err(RingFault::BadIndex);
        }
        Ok(ClientRing {
            page,
            req_prod,
            rsp_cons,
            fault: None,
        })
    }

    /// The page (e.g. to unmap it).
    pub fn page(&self) -> &P {
        &self.page
    }

    /// `server_features` as the server advertised them.
    pub fn server_features(&self) -> u32 {
        self.page.load_u32(offsets::SERVER_FEATURES)
    }

    /// The fault that stopped this ring, if any.
    pub fn fault(&self) -> Option<RingFault> {
        self.fault
    }

    fn check(&mut self) -> Result<(), RingFault> {
        if let Some(f) = self.fault {
            return Err(f);
        }
        let e = self.page.load_u32(offsets::ERROR);
        if e != ring_error::NONE {
            return self.fail(RingFault::Server(e));
        }
        Ok(())
    }

    fn fail(&mut self, f: RingFault) -> Result<(), RingFault> {
        self.fault = Some(f);
        Err(f)
    }

    /// Copy as much of `data` as fits into the request ring; how much was taken (0: full).
    pub fn write(&mut self, data: &[u8]) -> Result<usize, RingFault> {
        self.check()?;
        let cons = self.page.load_u32(offsets::REQ_CONS);
        let used = self.req_prod.wrapping_sub(cons) as usize;
        if used > RING_SIZE {
            self.fail(RingFault::BadIndex)?;
        }
        let n = (RING_SIZE - used).min(data.len());
        if n == 0 {
            return Ok(0);
        }
        let at = ring_mask(self.req_prod);
        let first = n.min(RING_SIZE - at);
        self.page.write_bytes(offsets::REQ + at, &data[..first]);
        self.page.write_bytes(offsets::REQ, &data[first..n]);
        self.req_prod = self.req_prod.wrapping_add(n as u32);
        self.page.store_u32(offsets::REQ_PROD, self.req_prod);
        Ok(n)
    }

    /// Copy available response bytes into `buf`; how many (0: none yet).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, RingFault> {
        self.check()?;
        let prod = self.page.load_u32(offsets::RSP_PROD);
        let avail = prod.wrapping_sub(self.rsp_cons) as usize;
        if avail > RING_SIZE {
            self.fail(RingFault::BadIndex)?;
        }
        let n = avail.min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let at = ring_mask(self.rsp_cons);
        let first = n.min(RING_SIZE - at);
        let (a, b) = buf[..n].split_at_mut(first);
        self.page.read_bytes(offsets::RSP + at, a);
        self.page.read_bytes(offsets::RSP, b);
        self.rsp_cons = self.rsp_cons.wrapping_add(n as u32);
        self.page.store_u32(offsets::RSP_CONS, self.rsp_cons);
        Ok(n)
    }

    /// Ask the server to reset the ring (it must advertise `RECONNECTION`); notify it next,
    /// then poll [`ClientRing::reconnected`]. `false` if the server does not offer it.
    pub fn request_reconnect(&mut self) -> bool {
        if self.server_features() & features::RECONNECTION == 0 {
            return false;
        }
        self.page.store_u32(offsets::CONNECTION, RECONNECT);
        true
    }

    /// After [`ClientRing::request_reconnect`]: `true` once the server has reset the ring,
    /// and the ring is usable again from index 0.
    pub fn reconnected(&mut self) -> bool {
        if self.page.load_u32(offsets::CONNECTION) != CONNECTED {
            return false;
        }
        self.req_prod = 0;
        self.rsp_cons = 0;
        self.fault = None;
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use shared_abi::ring::SharedRingMem;

    fn page() -> SharedRingMem {
        SharedRingMem::new_owned(4096).unwrap()
    }

    #[test]
    fn bytes_written_across_the_wrap_land_at_the_masked_offsets() {
        let p = page();
        p.store_u32(offsets::REQ_PROD, 1020);
        p.store_u32(offsets::REQ_CONS, 1020);
        let mut r = ClientRing::new(p.clone()).unwrap();
        assert_eq!(r.write(b"abcdefgh").unwrap(), 8);
        let mut tail = [0u8; 4];
        p.read_bytes(offsets::REQ + 1020, &mut tail);
        let mut head = [0u8; 4];
        p.read_bytes(offsets::REQ, &mut head);
        assert_eq!((&tail, &head), (b"abcd", b"efgh"));
        assert_eq!(p.load_u32(offsets::REQ_PROD), 1028);
    }

    #[test]
    fn write_takes_only_what_fits_and_zero_when_full() {
        let p = page();
        let mut r = ClientRing::new(p.clone()).unwrap();
        assert_eq!(r.write(&[7; 1000]).unwrap(), 1000);
        assert_eq!(r.write(&[7; 100]).unwrap(), 24);
        assert_eq!(r.write(&[7; 1]).unwrap(), 0);
        p.store_u32(offsets::REQ_CONS, 10);
        assert_eq!(r.write(&[7; 100]).unwrap(), 10);
    }

    #[test]
    fn read_takes_what_the_server_published() {
        let p = page();
        let mut r = ClientRing::new(p.clone()).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(r.read(&mut buf).unwrap(), 0);
        p.write_bytes(offsets::RSP, b"hello");
        p.store_u32(offsets::RSP_PROD, 5);
        assert_eq!(r.read(&mut buf[..3]).unwrap(), 3);
        assert_eq!(r.read(&mut buf[3..]).unwrap(), 2);
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(p.load_u32(offsets::RSP_CONS), 5);
    }

    #[test]
    fn server_indices_outside_the_ring_are_a_fault_that_sticks() {
        let p = page();
        let mut r = ClientRing::new(p.clone()).unwrap();
        p.store_u32(offsets::RSP_PROD, 1025);
        assert_eq!(r.read(&mut [0; 8]), Err(RingFault::BadIndex));
        p.store_u32(offsets::RSP_PROD, 0);
        assert_eq!(r.read(&mut [0; 8]), Err(RingFault::BadIndex));
        assert_eq!(r.write(b"x"), Err(RingFault::BadIndex));

        let p = page();
        let mut r = ClientRing::new(p.clone()).unwrap();
        p.store_u32(offsets::REQ_CONS, 3); // consumer ahead of our producer
        assert_eq!(r.write(b"x"), Err(RingFault::BadIndex));
    }

    #[test]
    fn server_error_field_stops_the_ring() {
        let p = page();
        let mut r = ClientRing::new(p.clone()).unwrap();
        p.store_u32(offsets::ERROR, ring_error::PROTO);
        assert_eq!(r.write(b"x"), Err(RingFault::Server(ring_error::PROTO)));
        assert_eq!(r.fault(), Some(RingFault::Server(ring_error::PROTO)));
    }

    #[test]
    fn new_refuses_short_pages_impossible_indices_and_reconnecting_rings() {
        assert_eq!(
            ClientRing::new(SharedRingMem::new_owned(1024).unwrap()).err(),
            Some(RingFault::PageTooSmall(1024))
        );
        let p = page();
        p.store_u32(offsets::RSP_PROD, 2000);
        assert_eq!(ClientRing::new(p).err(), Some(RingFault::BadIndex));
        let p = page();
        p.store_u32(offsets::CONNECTION, RECONNECT);
        assert_eq!(ClientRing::new(p).err(), Some(RingFault::NotConnected));
    }

    #[test]
    fn reconnect_needs_the_feature_and_waits_for_the_server() {
        let p = page();
        let mut r = ClientRing::new(p.clone()).unwrap();
        assert!(!r.request_reconnect());
        p.store_u32(offsets::SERVER_FEATURES, features::RECONNECTION);
        assert!(r.request_reconnect());
        assert!(!r.reconnected());
        p.store_u32(offsets::CONNECTION, CONNECTED);
        assert!(r.reconnected());
    }
}
