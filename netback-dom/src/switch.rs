//! The layer-2 switch joining a domain's virtual interfaces (vifs) and its uplink.
//!
//! Owns: the port set, the MAC table, per-vif anti-spoofing policy and rate limit, per-port
//! counters. It decides where a frame goes; moving the bytes is the caller's job.
//!
//! Invariants:
//! - A vif's own MAC is a *pinned* table entry, added with the port and removed with it: no
//!   frame from another port can move it (a frame from the uplink claiming a vif's MAC is
//!   dropped as spoofed), and it never ages out.
//! - Learned entries are bounded twice: by a table capacity and by a per-port quota. When
//!   either is reached the switch stops learning (frames still flow, flooded if their
//!   destination is unknown) until ageing frees room, so a MAC flood cannot grow memory.
//! - A frame never goes back out of the port it came in on.
//! - Time is passed in (`now_ns`, monotonic); nothing here reads a clock.
//!
//! Single-threaded (`&mut self`); no locks.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::packet::{ETH_HLEN, MacAddr, dst_mac, ethertype, ethertype_of, src_mac};

/// Index of a port in the switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId(pub usize);

/// Why the switch dropped a frame (one counter each per port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Too short for its headers, or a header that contradicts itself.
    Malformed,
    /// Source MAC is multicast/broadcast or all-zero.
    BadSourceMac,
    /// A vif sent from a MAC that is not its own, or the uplink from a vif's MAC.
    SpoofedMac,
    /// A vif sent IPv4/IPv6 from an address its config does not give it.
    SpoofedIp,
    /// A vif's ARP named a sender MAC or IPv4 address that is not its own.
    SpoofedArp,
    /// A vif sent an 802.1Q / 802.1ad tagged frame (vifs are untagged access ports).
    VlanRefused,
    /// Over the vif's rate limit.
    RateLimited,
    /// The destination is learned on the ingress port itself.
    Reflection,
    /// The egress port's queue was full (reported by the caller).
    EgressFull,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::Malformed,
        DropReason::BadSourceMac,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::SpoofedArp,
        DropReason::VlanRefused,
        DropReason::RateLimited,
        DropReason::Reflection,
        DropReason::EgressFull,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Per-port traffic counters. `rx` is what the port sent into the switch (accepted or not),
/// `tx` what the switch forwarded out of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl PortCounters {
    /// Frames dropped for `reason` (ingress reasons on the ingress port, `EgressFull` on the
    /// egress port).
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// A token bucket: `rate` bytes per second, holding at most `burst` bytes of credit. Starts
/// full. Fractions of a byte carry over between refills, so frequent small refills do not
/// lose credit to rounding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    /// Nanosecond-bytes not yet worth a whole token.
    frac: u128,
    last_ns: u64,
}

impl TokenBucket {
    pub fn new(bytes_per_sec: u64, burst: u64, now_ns: u64) -> Self {
        TokenBucket {
            rate: bytes_per_sec,
            burst,
            tokens: burst,
            frac: 0,
            last_ns: now_ns,
        }
    }

    /// From the xenstore/xl form `rate = "bytes,usec"`: `bytes` of credit every `usec`
    /// microseconds. Like Linux netback, the burst is at least one maximal frame (64 KiB) so
    /// a large frame is never refused forever. `None` if `usec` is 0.
    pub fn from_xen_rate(bytes: u64, usec: u64, now_ns: u64) -> Option<Self> {
        if usec == 0 {
            return None;
        }
        let rate = (u128::from(bytes) * 1_000_000 / u128::from(usec)).min(u128::from(u64::MAX));
        Some(TokenBucket::new(rate as u64, bytes.max(65_536), now_ns))
    }

    fn refill(&mut self, now_ns: u64) {
        // A clock that went backwards refills nothing.
        if now_ns <= self.last_ns {
            return;
        }
        let total = u128::from(now_ns - self.last_ns) * u128::from(self.rate) + self.frac;
        self.last_ns = now_ns;
        let add = total / 1_000_000_000;
        self.frac = total % 1_000_000_000;
        let room = u128::from(self.burst - self.tokens);
        if add >= room {
            self.tokens = self.burst;
            self.frac = 0;
        } else {
            self.tokens += add as u64;
        }
    }

    /// Take `bytes` of credit if available.
    pub fn try_take(&mut self, bytes: u64, now_ns: u64) -> bool {
        self.refill(now_ns);
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }

    /// Credit currently available (after a refill at `now_ns`).
    pub fn available(&mut self, now_ns: u64) -> u64 {
        self.refill(now_ns);
        self.tokens
    }
}

/// What a vif may send: its MAC, and (when given) the only IP addresses it may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VifPolicy {
    pub mac: MacAddr,
    /// `None`: any IPv4 source (only the MAC is checked). `Some(list)`: only these, plus
    /// 0.0.0.0 for a DHCP client's UDP 68→67 and ARP probes.
    pub ipv4: Option<Vec<[u8; 4]>>,
    /// `None`: any IPv6 source. `Some(list)`: only these, plus `::` for ICMPv6 (duplicate
    /// address detection, MLD).
    pub ipv6: Option<Vec<[u8; 16]>>,
    /// Token bucket on what the vif sends (xl `rate=`).
    pub rate: Option<TokenBucket>,
}

/// The two kinds of port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// A guest's virtual interface: policed.
    Vif(VifPolicy),
    /// The physical uplink: trusted to carry any MAC except a local vif's.
    Uplink,
}

/// Limits of the switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// Most ports.
    pub max_ports: usize,
    /// Most MAC table entries (pinned and learned).
    pub mac_capacity: usize,
    /// Most learned entries one port may hold.
    pub per_port_quota: usize,
    /// A learned entry unused for this long is forgotten.
    pub ageing_ns: u64,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            max_ports: 256,
            mac_capacity: 8192,
            per_port_quota: 4096,
            ageing_ns: 300_000_000_000,
        }
    }
}

/// Errors of port management (not of forwarding, which only drops and counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    #[error("switch already has its maximum of {max} ports")]
    TooManyPorts { max: usize },
    #[error("vif MAC {mac} must be a non-zero unicast address")]
    BadVifMac { mac: MacAddr },
    #[error("MAC {mac} already belongs to vif port {owner:?}")]
    DuplicateMac { mac: MacAddr, owner: PortId },
    #[error("no port {0:?}")]
    NoSuchPort(PortId),
    #[error("MAC table full ({capacity} entries)")]
    TableFull { capacity: usize },
}

#[derive(Clone, Copy, Debug)]
struct MacEntry {
    port: PortId,
    last_seen: u64,
    pinned: bool,
}

struct Port {
    kind: PortKind,
    counters: PortCounters,
    learned: usize,
}

/// The switch.
pub struct Switch {
    cfg: SwitchConfig,
    ports: Vec<Option<Port>>,
    table: BTreeMap<MacAddr, MacEntry>,
    /// Learning refused because the table or a port's quota was full.
    pub learn_refused: u64,
    last_sweep_ns: u64,
}

impl core::fmt::Debug for Switch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Switch")
            .field("ports", &self.ports.iter().filter(|p| p.is_some()).count())
            .field("macs", &self.table.len())
            .finish()
    }
}

impl Switch {
    pub fn new(cfg: SwitchConfig) -> Self {
        Switch {
            cfg,
            ports: Vec::new(),
            table: BTreeMap::new(),
            learn_refused: 0,
            last_sweep_ns: 0,
        }
    }

    /// Add a port. A vif's MAC is pinned to it.
    pub fn add_port(&mut self, kind: PortKind) -> Result<PortId, SwitchError> {
        let slot = match self.ports.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.ports.len() < self.cfg.max_ports => self.ports.len(),
            None => {
                return Err(SwitchError::TooManyPorts {
                    max: self.cfg.max_ports,
                });
            }
        };
        let id = PortId(slot);
        if let PortKind::Vif(p) = &kind {
            let mac = p.mac;
            if mac.is_multicast() || mac.is_zero() {
                return Err(SwitchError::BadVifMac { mac });
            }
            match self.table.get(&mac) {
                Some(e) if e.pinned => {
                    return Err(SwitchError::DuplicateMac { mac, owner: e.port });
                }
                Some(e) => {
                    // Learned elsewhere (e.g. a stale uplink entry): the vif owns it now.
                    let old = e.port;
                    self.forget_learned(old);
                    self.table.remove(&mac);
                }
                None if self.table.len() >= self.cfg.mac_capacity => {
                    return Err(SwitchError::TableFull {
                        capacity: self.cfg.mac_capacity,
                    });
                }
                None => {}
            }
            self.table.insert(
                mac,
                MacEntry {
                    port: id,
                    last_seen: 0,
                    pinned: true,
                },
            );
        }
        let port = Port {
            kind,
            counters: PortCounters::default(),
            learned: 0,
        };
        if slot == self.ports.len() {
            self.ports.push(Some(port));
        } else {
            self.ports[slot] = Some(port);
        }
        Ok(id)
    }

    /// Remove a port and every MAC entry pointing at it.
    pub fn remove_port(&mut self, id: PortId) -> Result<(), SwitchError> {
        match self.ports.get_mut(id.0) {
            Some(p @ Some(_)) => *p = None,
            _ => return Err(SwitchError::NoSuchPort(id)),
        }
        self.table.retain(|_, e| e.port != id);
        Ok(())
    }

    fn forget_learned(&mut self, port: PortId) {
        if let Some(Some(p)) = self.ports.get_mut(port.0) {
            p.learned = p.learned.saturating_sub(1);
        }
    }

    /// Counters of a port.
    pub fn counters(&self, id: PortId) -> Option<&PortCounters> {
        Some(&self.ports.get(id.0)?.as_ref()?.counters)
    }

    /// Entries in the MAC table (pinned and learned).
    pub fn mac_table_len(&self) -> usize {
        self.table.len()
    }

    /// Where `mac` is known to be, if its entry is pinned or fresh at `now_ns`.
    pub fn lookup(&self, mac: MacAddr, now_ns: u64) -> Option<PortId> {
        let e = self.table.get(&mac)?;
        (e.pinned || now_ns.saturating_sub(e.last_seen) <= self.cfg.ageing_ns).then_some(e.port)
    }

    /// Forget learned entries unused for longer than the ageing time; returns how many.
    pub fn age(&mut self, now_ns: u64) -> usize {
        self.last_sweep_ns = now_ns;
        let ageing = self.cfg.ageing_ns;
        let mut freed = Vec::new();
        self.table.retain(|_, e| {
            let keep = e.pinned || now_ns.saturating_sub(e.last_seen) <= ageing;
            if !keep {
                freed.push(e.port);
            }
            keep
        });
        for p in &freed {
            self.forget_learned(*p);
        }
        freed.len()
    }

    /// The caller could not queue a forwarded frame on `port` (its backlog was full).
    pub fn note_egress_drop(&mut self, port: PortId) {
        if let Some(Some(p)) = self.ports.get_mut(port.0) {
            p.counters.drops[DropReason::EgressFull.index()] += 1;
        }
    }

    /// Decide where a frame that entered on `ingress` goes: on success `out` holds the egress
    /// ports (one for a known unicast destination, every other port for a flood); on a drop
    /// the reason is returned and counted on the ingress port. `out` is cleared first.
    pub fn forward(
        &mut self,
        ingress: PortId,
        frame: &[u8],
        now_ns: u64,
        out: &mut Vec<PortId>,
    ) -> Result<(), DropReason> {
        out.clear();
        let len = frame.len() as u64;
        let Some(Some(port)) = self.ports.get_mut(ingress.0) else {
            // Not a frame's fault; nothing to count it on.
            return Err(DropReason::Malformed);
        };
        port.counters.rx_packets += 1;
        port.counters.rx_bytes += len;
        let verdict = Self::admit(port, frame, now_ns);
        if let Err(r) = verdict {
            port.counters.drops[r.index()] += 1;
            return Err(r);
        }
        let (Some(src), Some(dst)) = (src_mac(frame), dst_mac(frame)) else {
            return Err(self.drop_on(ingress, DropReason::Malformed));
        };
        if let Err(r) = self.learn(ingress, src, now_ns) {
            return Err(self.drop_on(ingress, r));
        }
        if !dst.is_multicast()
            && let Some(to) = self.lookup(dst, now_ns)
        {
            if to == ingress {
                return Err(self.drop_on(ingress, DropReason::Reflection));
            }
            out.push(to);
        } else {
            out.extend(
                self.ports
                    .iter()
                    .enumerate()
                    .filter(|(i, p)| p.is_some() && *i != ingress.0)
                    .map(|(i, _)| PortId(i)),
            );
        }
        for to in out.iter() {
            if let Some(Some(p)) = self.ports.get_mut(to.0) {
                p.counters.tx_packets += 1;
                p.counters.tx_bytes += len;
            }
        }
        Ok(())
    }

    fn drop_on(&mut self, port: PortId, r: DropReason) -> DropReason {
        if let Some(Some(p)) = self.ports.get_mut(port.0) {
            p.counters.drops[r.index()] += 1;
        }
        r
    }

    /// Header sanity, anti-spoofing and rate limit for a frame entering on `port`.
    fn admit(port: &mut Port, frame: &[u8], now_ns: u64) -> Result<(), DropReason> {
        if frame.len() < ETH_HLEN {
            return Err(DropReason::Malformed);
        }
        let src = src_mac(frame).ok_or(DropReason::Malformed)?;
        if src.is_multicast() || src.is_zero() {
            return Err(DropReason::BadSourceMac);
        }
        let PortKind::Vif(policy) = &mut port.kind else {
            return Ok(());
        };
        if src != policy.mac {
            return Err(DropReason::SpoofedMac);
        }
        let l3 = &frame[ETH_HLEN..];
        match ethertype_of(frame).ok_or(DropReason::Malformed)? {
            ethertype::VLAN | ethertype::QINQ => return Err(DropReason::VlanRefused),
            ethertype::IPV4 => check_ipv4(policy, l3)?,
            ethertype::IPV6 => check_ipv6(policy, l3)?,
            ethertype::ARP => check_arp(policy, l3)?,
            _ => {}
        }
        if let Some(bucket) = &mut policy.rate
            && !bucket.try_take(frame.len() as u64, now_ns)
        {
            return Err(DropReason::RateLimited);
        }
        Ok(())
    }

    /// Record that `src` lives behind `port`.
    fn learn(&mut self, port: PortId, src: MacAddr, now_ns: u64) -> Result<(), DropReason> {
        if let Some(e) = self.table.get_mut(&src) {
            if e.pinned {
                // A vif's MAC (admit() already checked the vif's own frames): only its own
                // port may use it.
                return if e.port == port {
                    Ok(())
                } else {
                    Err(DropReason::SpoofedMac)
                };
            }
            if e.port == port {
                e.last_seen = now_ns;
                return Ok(());
            }
            // The station moved: forget the old entry, then learn afresh below (subject to
            // the new port's quota).
            let old = e.port;
            self.table.remove(&src);
            self.forget_learned(old);
        }
        let quota_hit = |s: &Self| {
            s.table.len() >= s.cfg.mac_capacity
                || s.ports
                    .get(port.0)
                    .and_then(Option::as_ref)
                    .is_none_or(|p| p.learned >= s.cfg.per_port_quota)
        };
        // Under pressure, try ageing (at most once per second of switch time, so a flood
        // cannot make every frame pay for a full sweep).
        if quota_hit(self) && now_ns.saturating_sub(self.last_sweep_ns) >= 1_000_000_000 {
            self.age(now_ns);
        }
        if quota_hit(self) {
            self.learn_refused += 1;
            return Ok(());
        }
        self.table.insert(
            src,
            MacEntry {
                port,
                last_seen: now_ns,
                pinned: false,
            },
        );
        if let Some(Some(p)) = self.ports.get_mut(port.0) {
            p.learned += 1;
        }
        Ok(())
    }
}

const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

fn check_ipv4(policy: &VifPolicy, l3: &[u8]) -> Result<(), DropReason> {
    let Some(allowed) = &policy.ipv4 else {
        return Ok(());
    };
    if l3.len() < 20 || l3[0] >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let ihl = usize::from(l3[0] & 0xF) * 4;
    if ihl < 20 || l3.len() < ihl {
        return Err(DropReason::Malformed);
    }
    let src: [u8; 4] = [l3[12], l3[13], l3[14], l3[15]];
    if allowed.contains(&src) {
        return Ok(());
    }
    // A DHCP client has no address yet: 0.0.0.0, UDP from port 68 to port 67.
    if src == [0; 4]
        && l3[9] == IPPROTO_UDP
        && let Some(udp) = l3.get(ihl..ihl + 4)
        && udp[0..2] == 68u16.to_be_bytes()
        && udp[2..4] == 67u16.to_be_bytes()
    {
        return Ok(());
    }
    Err(DropReason::SpoofedIp)
}

fn check_ipv6(policy: &VifPolicy, l3: &[u8]) -> Result<(), DropReason> {
    let Some(allowed) = &policy.ipv6 else {
        return Ok(());
    };
    if l3.len() < 40 || l3[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&l3[8..24]);
    if allowed.contains(&src) || (src == [0; 16] && l3[6] == IPPROTO_ICMPV6) {
        Ok(())
    } else {
        Err(DropReason::SpoofedIp)
    }
}

fn check_arp(policy: &VifPolicy, l3: &[u8]) -> Result<(), DropReason> {
    // Ethernet/IPv4 ARP: htype 1, ptype 0x0800, hlen 6, plen 4, then op and the addresses.
    if l3.len() < 28 || l3[0..6] != [0, 1, 8, 0, 6, 4] {
        return Err(DropReason::Malformed);
    }
    if l3[8..14] != policy.mac.0 {
        return Err(DropReason::SpoofedArp);
    }
    let Some(allowed) = &policy.ipv4 else {
        return Ok(());
    };
    let spa: [u8; 4] = [l3[14], l3[15], l3[16], l3[17]];
    if allowed.contains(&spa) || spa == [0; 4] {
        Ok(())
    } else {
        Err(DropReason::SpoofedArp)
    }
}
