//! Frames as the backend and the switch see them: the bytes plus the offload metadata a
//! netif tx request carried (checksum state, GSO), and the few header views both need (MAC
//! addresses, EtherType, the flow hash that picks an rx queue).
//!
//! Every accessor works on untrusted bytes: a frame too short for a header yields `None`,
//! never a panic.

use alloc::vec::Vec;
use core::fmt;

/// Length of an Ethernet header (dst, src, EtherType).
pub const ETH_HLEN: usize = 14;
/// EtherTypes the switch inspects.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const QINQ: u16 = 0x88A8;
    pub const IPV6: u16 = 0x86DD;
}

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xFF; 6]);

    /// Group (multicast or broadcast) address: the I/G bit of the first octet.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// Parse `xx:xx:xx:xx:xx:xx` (the xenstore `mac` format): exactly six two-digit hex
    /// octets.
    pub fn parse(s: &str) -> Option<MacAddr> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next()?;
            // from_str_radix alone would accept a sign ("+0").
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            *o = u8::from_str_radix(p, 16).ok()?;
        }
        if parts.next().is_some() {
            return None;
        }
        Some(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Checksum state carried with a frame (Linux's `ip_summed`, as netif flags encode it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Checksum {
    /// Nothing known: the receiver verifies.
    #[default]
    None,
    /// Already verified (`data_validated`).
    Validated,
    /// Protocol checksum left blank for offload (`csum_blank`).
    Partial,
}

/// TCP segmentation offload kinds netif knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoKind {
    TcpV4,
    TcpV6,
}

/// A large packet the receiver (or a NIC) must segment into `mss`-sized TCP segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gso {
    pub kind: GsoKind,
    pub mss: u16,
}

/// Offload metadata travelling with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Offload {
    pub checksum: Checksum,
    pub gso: Option<Gso>,
}

/// One Ethernet frame with its offload metadata.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Packet {
    pub data: Vec<u8>,
    pub offload: Offload,
}

impl Packet {
    /// A frame with no offload metadata.
    pub fn new(data: Vec<u8>) -> Self {
        Packet {
            data,
            offload: Offload::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Destination MAC of a frame, if it has an Ethernet header.
pub fn dst_mac(frame: &[u8]) -> Option<MacAddr> {
    Some(MacAddr(frame.get(0..6)?.try_into().ok()?))
}

/// Source MAC of a frame, if it has an Ethernet header.
pub fn src_mac(frame: &[u8]) -> Option<MacAddr> {
    Some(MacAddr(frame.get(6..12)?.try_into().ok()?))
}

/// EtherType of a frame, if it has an Ethernet header.
pub fn ethertype_of(frame: &[u8]) -> Option<u16> {
    let b = frame.get(12..14)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// A 32-bit hash of the frame's flow (IP addresses, protocol and TCP/UDP ports when present,
/// else the MAC pair), used to spread frames over a vif's queues so that one flow stays in
/// order on one queue. Not a security boundary: a sender choosing flows can only skew which
/// of the receiver's queues it lands on.
pub fn flow_hash(frame: &[u8]) -> u32 {
    let mut h = FlowHasher::new();
    let l3 = frame.get(ETH_HLEN..).unwrap_or(&[]);
    match ethertype_of(frame) {
        Some(ethertype::IPV4) if l3.len() >= 20 && l3[0] >> 4 == 4 => {
            let ihl = usize::from(l3[0] & 0xF) * 4;
            let proto = l3[9];
            h.add(&l3[12..20]);
            h.add(&[proto]);
            // Only the first fragment carries ports.
            let frag_off = u16::from_be_bytes([l3[6], l3[7]]) & 0x1FFF;
            if frag_off == 0
                && (proto == 6 || proto == 17)
                && let Some(ports) = l3.get(ihl..ihl + 4)
            {
                h.add(ports);
            }
        }
        Some(ethertype::IPV6) if l3.len() >= 40 => {
            let next = l3[6];
            h.add(&l3[8..40]);
            h.add(&[next]);
            if (next == 6 || next == 17)
                && let Some(ports) = l3.get(40..44)
            {
                h.add(ports);
            }
        }
        _ => h.add(frame.get(0..12).unwrap_or(frame)),
    }
    h.finish()
}

/// Ones-complement sum of `data` (16-bit big-endian words, an odd last byte padded) added to
/// `acc`, not yet folded.
fn ones_sum(mut acc: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = words.remainder() {
        acc += u64::from(u16::from_be_bytes([*b, 0]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    acc as u16
}

/// Fill in the TCP or UDP checksum of an untagged IPv4 (unfragmented) or IPv6 (no extension
/// headers) frame whose checksum was left blank for offload (`csum_blank`), as a NIC would
/// before it leaves through a device that does not offload. False, frame untouched, for
/// anything else or a header that contradicts the frame's length.
pub fn complete_checksum(frame: &mut [u8]) -> bool {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    let Some(et) = ethertype_of(frame) else {
        return false;
    };
    let l3 = ETH_HLEN;
    let (proto, l4, l4_len, pseudo) = match et {
        ethertype::IPV4 => {
            let Some(h) = frame.get(l3..l3 + 20) else {
                return false;
            };
            let ihl = usize::from(h[0] & 0xF) * 4;
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let frag = u16::from_be_bytes([h[6], h[7]]);
            // MF set or a fragment offset: the L4 header is not (all) here.
            if h[0] >> 4 != 4 || ihl < 20 || total < ihl || frag & 0x3FFF != 0 {
                return false;
            }
            if l3 + total > frame.len() {
                return false;
            }
            let proto = h[9];
            let len = total - ihl;
            let mut acc = ones_sum(0, &h[12..20]);
            acc += u64::from(proto) + len as u64;
            (proto, l3 + ihl, len, acc)
        }
        ethertype::IPV6 => {
            let Some(h) = frame.get(l3..l3 + 40) else {
                return false;
            };
            let len = usize::from(u16::from_be_bytes([h[4], h[5]]));
            if h[0] >> 4 != 6 || l3 + 40 + len > frame.len() {
                return false;
            }
            let proto = h[6];
            let mut acc = ones_sum(0, &h[8..40]);
            acc += u64::from(proto) + len as u64;
            (proto, l3 + 40, len, acc)
        }
        _ => return false,
    };
    let at = match proto {
        TCP if l4_len >= 20 => 16,
        UDP if l4_len >= 8 => 6,
        _ => return false,
    };
    let seg = &mut frame[l4..l4 + l4_len];
    seg[at..at + 2].copy_from_slice(&[0, 0]);
    let mut c = !fold(ones_sum(pseudo, seg));
    if proto == UDP && c == 0 {
        c = 0xFFFF;
    }
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// FNV-1a with a final avalanche; small, deterministic, no allocation.
struct FlowHasher(u64);

impl FlowHasher {
    fn new() -> Self {
        FlowHasher(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    fn finish(&self) -> u32 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x as u32
    }
}

#[cfg(test)]
mod tests {
    /// A frame's L4 checksum verifies: the sum over pseudo-header and segment folds to 0xFFFF.
    fn verifies(f: &[u8]) -> bool {
        let (pseudo, seg) = if ethertype_of(f) == Some(ethertype::IPV4) {
            let ihl = usize::from(f[14] & 0xF) * 4;
            let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
            let seg = &f[14 + ihl..14 + total];
            (
                ones_sum(0, &f[26..34]) + u64::from(f[23]) + seg.len() as u64,
                seg,
            )
        } else {
            let len = usize::from(u16::from_be_bytes([f[18], f[19]]));
            let seg = &f[54..54 + len];
            (ones_sum(0, &f[22..54]) + u64::from(f[20]) + len as u64, seg)
        };
        fold(ones_sum(pseudo, seg)) == 0xFFFF
    }

    fn ipv4(proto: u8, l4: &[u8], frag: u16) -> alloc::vec::Vec<u8> {
        let mut f = alloc::vec![0u8; 14];
        f[12..14].copy_from_slice(&ethertype::IPV4.to_be_bytes());
        let total = (20 + l4.len()) as u16;
        f.extend_from_slice(&[0x45, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0, 10, 0, 0, 3, 10, 0, 2, 2]);
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(l4);
        f.extend_from_slice(&[0xAA; 6]); // Ethernet padding past the IP datagram
        f
    }

    #[test]
    fn blank_checksums_are_completed_for_tcp_and_udp_over_ipv4_and_ipv6() {
        // RFC 1071's example words inside a UDP payload; odd length on purpose.
        let mut udp = alloc::vec![0x30, 0x39, 0x00, 0x35, 0, 13, 0, 0];
        udp.extend_from_slice(&[0x00, 0x01, 0xf2, 0x03, 0xf4]);
        let mut f = ipv4(17, &udp, 0x4000);
        assert!(complete_checksum(&mut f));
        assert!(verifies(&f));
        let good = f.clone();
        f[40] ^= 0xFF; // garbage in the blank field is ignored
        assert!(complete_checksum(&mut f));
        assert_eq!(f, good);
        let mut tcp = alloc::vec![0u8; 20];
        tcp[12] = 0x50;
        tcp.extend_from_slice(b"hello, world");
        let mut f = ipv4(6, &tcp, 0);
        assert!(complete_checksum(&mut f));
        assert!(verifies(&f));
        // IPv6 + TCP.
        let mut f = alloc::vec![0u8; 14];
        f[12..14].copy_from_slice(&ethertype::IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]);
        f.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f.extend_from_slice(&tcp);
        assert!(complete_checksum(&mut f));
        assert!(verifies(&f));
    }

    #[test]
    fn checksum_completion_refuses_what_it_cannot_parse() {
        let udp = [0u8; 8];
        for mut f in [
            ipv4(17, &udp, 0x2000), // MF: a fragment
            ipv4(17, &udp, 0x0001), // a later fragment
            ipv4(1, &udp, 0),       // ICMP
            ipv4(17, &udp[..4], 0), // UDP header cut short
            alloc::vec![0u8; 13],   // no Ethernet header
        ] {
            let before = f.clone();
            assert!(!complete_checksum(&mut f));
            assert_eq!(f, before);
        }
        let mut f = ipv4(17, &udp, 0);
        f[16..18].copy_from_slice(&100u16.to_be_bytes()); // longer than the frame
        assert!(!complete_checksum(&mut f));
        let mut f = ipv4(17, &udp, 0);
        f[14] = 0x44; // IHL 16 bytes
        assert!(!complete_checksum(&mut f));
    }

    use super::*;
    use alloc::string::ToString;

    #[test]
    fn mac_parse_accepts_xenstore_format_and_rejects_everything_else() {
        let m = MacAddr::parse("00:16:3e:0a:Bc:ff").unwrap();
        assert_eq!(m.0, [0, 0x16, 0x3e, 0x0a, 0xbc, 0xff]);
        assert_eq!(m.to_string(), "00:16:3e:0a:bc:ff");
        for bad in [
            "",
            "00:16:3e:0a:bc",
            "00:16:3e:0a:bc:ff:00",
            "0:16:3e:0a:bc:ff",
            "00-16-3e-0a-bc-ff",
            "zz:16:3e:0a:bc:ff",
            "+0:16:3e:0a:bc:ff",
        ] {
            assert_eq!(MacAddr::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn header_accessors_refuse_short_frames() {
        assert_eq!(dst_mac(&[0; 5]), None);
        assert_eq!(src_mac(&[0; 11]), None);
        assert_eq!(ethertype_of(&[0; 13]), None);
        assert_eq!(ethertype_of(&[0; 14]), Some(0));
        // A hash of anything, even nothing, is defined.
        let _ = flow_hash(&[]);
        let _ = flow_hash(&[0x45; 20]);
    }

    #[test]
    fn flow_hash_separates_flows_and_keeps_a_flow_stable() {
        let mut a = alloc::vec![0u8; 54];
        a[12..14].copy_from_slice(&ethertype::IPV4.to_be_bytes());
        a[14] = 0x45;
        a[23] = 6;
        a[26..30].copy_from_slice(&[10, 0, 0, 1]);
        a[30..34].copy_from_slice(&[10, 0, 0, 2]);
        a[34..36].copy_from_slice(&1000u16.to_be_bytes());
        let mut b = a.clone();
        b[34..36].copy_from_slice(&1001u16.to_be_bytes());
        assert_eq!(flow_hash(&a), flow_hash(&a.clone()));
        assert_ne!(flow_hash(&a), flow_hash(&b));
    }
}
