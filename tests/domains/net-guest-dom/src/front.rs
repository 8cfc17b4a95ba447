//! The interface the roles drive ([`Nic`]) and its one implementation: dom-rt's netfront on
//! this domain's grants, event channels and xenstore connection.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use dom_rt::front::{DomainEvents, DomainGrants, XenbusStore};
use dom_rt::netfront::{NetConfig, NetError, Netfront};

use crate::guest::Bus;

/// A received frame.
pub struct Frame {
    pub data: Vec<u8>,
    /// The sender left the TCP/UDP checksum blank (offload): complete it before use.
    pub csum_blank: bool,
}

/// Why a send failed.
#[derive(Debug)]
pub enum SendError {
    /// The tx ring is full: poll and retry.
    Busy,
    Other(String),
}

/// What the roles need of a network interface.
pub trait Nic {
    fn mac_addr(&self) -> [u8; 6];
    fn send(&mut self, frame: &[u8]) -> Result<(), SendError>;
    fn recv(&mut self) -> Option<Frame>;
    /// Reap the rings (tx completions, rx frames, buffer refills).
    fn poll(&mut self) -> Result<(), String>;
    /// Block until an event or `deadline_ns` (hypervisor time).
    fn wait(&mut self, deadline_ns: Option<u64>);
    /// One line of counters for the console.
    fn stats_line(&self) -> String;
    /// Reconnect if the toolstack re-pointed the device at another backend: true if so.
    fn follow(&mut self, xb: &mut Bus) -> Result<bool, String>;
    /// Queues negotiated with the backend (1 without multi-queue).
    fn queues(&self) -> u32;
}

pub type Front = Netfront<DomainGrants, DomainEvents>;

/// Connect the vif whose frontend directory is `dir`, asking for `queues` queues (the
/// backend's `multi-queue-max-queues` may grant fewer).
pub fn connect(xb: &mut Bus, dir: &str, queues: u32) -> Result<Front, String> {
    let mut s = XenbusStore { xb };
    Netfront::connect(
        DomainGrants::all(),
        DomainEvents::default(),
        &mut s,
        dir,
        NetConfig {
            queues,
            ..NetConfig::default()
        },
    )
    .map_err(|e| format!("{e}"))
}

/// Close the vif (Closing/Closed with the backend).
pub fn close(f: Front, xb: &mut Bus) -> Result<(), String> {
    let mut s = XenbusStore { xb };
    f.close(&mut s).map_err(|e| format!("{e}"))
}

impl Nic for Front {
    fn mac_addr(&self) -> [u8; 6] {
        self.mac()
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), SendError> {
        Netfront::send(self, frame).map_err(|e| match e {
            NetError::Busy => SendError::Busy,
            e => SendError::Other(format!("{e}")),
        })
    }

    fn recv(&mut self) -> Option<Frame> {
        Netfront::recv(self).map(|f| Frame {
            data: f.data,
            csum_blank: f.csum_blank,
        })
    }

    fn poll(&mut self) -> Result<(), String> {
        Netfront::poll(self).map_err(|e| format!("{e}"))
    }

    fn wait(&mut self, deadline_ns: Option<u64>) {
        self.wait_event(deadline_ns);
    }

    fn stats_line(&self) -> String {
        format!("{:?}", self.stats())
    }

    fn follow(&mut self, xb: &mut Bus) -> Result<bool, String> {
        let mut s = XenbusStore { xb };
        self.follow_backend(&mut s).map_err(|e| format!("{e}"))
    }

    fn queues(&self) -> u32 {
        self.info().queues
    }
}
