//! smoltcp over a [`Nic`]: the `Device` adapter (frames copied in and out, blank checksums
//! completed on receive, a full tx ring waited out) and the interface with its sockets.

use alloc::vec;
use alloc::vec::Vec;

use dom_rt::{println, time};
use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::front::{Nic, SendError};
use crate::guest::Bus;
use crate::wire::fix_l4_csum;

/// Longest a frame waits for room on a full tx ring before it is dropped.
const TX_WAIT_NS: u64 = 50_000_000;

pub fn now() -> Instant {
    Instant::from_micros((time::now_ns() / 1000) as i64)
}

#[derive(Clone, Copy, Debug, Default)]
pub struct DevStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub tx_busy: u64,
    pub tx_dropped: u64,
    pub csum_completed: u64,
}

pub struct Dev<N: Nic> {
    pub nic: N,
    pub stats: DevStats,
    /// Frames the adapter took off the NIC without giving them to smoltcp (counted by a role).
    pub tap: Option<fn(&[u8]) -> bool>,
    pub tapped: u64,
}

impl<N: Nic> Dev<N> {
    /// Send `frame`, polling (and waiting) while the tx ring is full; false if dropped.
    pub fn send_frame(&mut self, frame: &[u8]) -> bool {
        let mut end = None;
        loop {
            match self.nic.send(frame) {
                Ok(()) => {
                    self.stats.tx_frames += 1;
                    return true;
                }
                Err(SendError::Busy) => {
                    self.stats.tx_busy += 1;
                    let now = time::now_ns();
                    let end = *end.get_or_insert(now + TX_WAIT_NS);
                    if now > end {
                        break;
                    }
                    let _ = self.nic.poll();
                    if self.nic.send(frame).is_ok() {
                        self.stats.tx_frames += 1;
                        return true;
                    }
                    self.nic.wait(Some(now + 200_000));
                }
                Err(SendError::Other(_)) => break,
            }
        }
        self.stats.tx_dropped += 1;
        false
    }

    fn next_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            let f = match self.nic.recv() {
                Some(f) => f,
                None => {
                    let _ = self.nic.poll();
                    self.nic.recv()?
                }
            };
            self.stats.rx_frames += 1;
            let mut data = f.data;
            if f.csum_blank && fix_l4_csum(&mut data) {
                self.stats.csum_completed += 1;
            }
            if let Some(tap) = self.tap
                && tap(&data)
            {
                self.tapped += 1;
                continue;
            }
            return Some(data);
        }
    }
}

pub struct Rx(Vec<u8>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub struct Tx<'a, N: Nic>(&'a mut Dev<N>);

impl<N: Nic> TxToken for Tx<'_, N> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.send_frame(&buf);
        r
    }
}

impl<N: Nic> Device for Dev<N> {
    type RxToken<'a>
        = Rx
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<'a, N>
    where
        Self: 'a;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_, N>)> {
        let data = self.next_frame()?;
        Some((Rx(data), Tx(self)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_, N>> {
        Some(Tx(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

/// Receive silence after which the store is asked whether the backend changed.
const FOLLOW_AFTER_NS: u64 = 50_000_000;

/// The interface, its device and sockets, and the store connection (to follow a backend
/// restart).
pub struct Net<'a, N: Nic> {
    pub dev: Dev<N>,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub xb: &'a mut Bus,
    /// Frames received at the last look, and when that count last changed.
    seen: (u64, u64),
}

impl<'a, N: Nic> Net<'a, N> {
    pub fn new(xb: &'a mut Bus, nic: N, ip: ([u8; 4], u8), gw: Option<[u8; 4]>, seed: u64) -> Self {
        let mac = EthernetAddress(nic.mac_addr());
        let mut cfg = Config::new(HardwareAddress::Ethernet(mac));
        cfg.random_seed = seed ^ time::now_ns();
        let mut dev = Dev {
            nic,
            stats: DevStats::default(),
            tap: None,
            tapped: 0,
        };
        let mut iface = Interface::new(cfg, &mut dev, now());
        let addr = Ipv4Address::from(ip.0);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::Ipv4(Ipv4Cidr::new(addr, ip.1)));
        });
        if let Some(g) = gw {
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::from(g));
        }
        Net {
            dev,
            iface,
            sockets: SocketSet::new(Vec::new()),
            xb,
            seen: (0, time::now_ns()),
        }
    }

    /// After FOLLOW_AFTER_NS without a received frame, follow the toolstack if it re-pointed
    /// the vif at a restarted backend (netfront reconnects; in-flight tx frames are lost and
    /// TCP retransmits them).
    fn follow(&mut self) {
        let now = time::now_ns();
        if self.dev.stats.rx_frames != self.seen.0 {
            self.seen = (self.dev.stats.rx_frames, now);
            return;
        }
        if now - self.seen.1 < FOLLOW_AFTER_NS {
            return;
        }
        self.seen.1 = now;
        match self.dev.nic.follow(self.xb) {
            Ok(true) => println!(
                "net-restart: reconnected to the restarted backend at {} ns",
                time::now_ns()
            ),
            Ok(false) => {}
            Err(e) => println!("net-restart: following the backend: {e}"),
        }
    }

    /// One pass of the stack: true if a socket's state may have changed.
    pub fn poll(&mut self) -> bool {
        self.follow();
        let _ = self.dev.nic.poll();
        self.iface.poll(now(), &mut self.dev, &mut self.sockets) != PollResult::None
    }

    /// Wait for the NIC until smoltcp's next timer, at most `max_ns`.
    pub fn idle(&mut self, max_ns: u64) {
        let d = self
            .iface
            .poll_delay(now(), &self.sockets)
            .map_or(max_ns, |d| d.total_micros().saturating_mul(1000))
            .min(max_ns);
        if d > 0 {
            self.dev.nic.wait(Some(time::now_ns() + d));
        }
    }
}
