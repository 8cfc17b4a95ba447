//! Frames by hand (for the spoofing and hostile roles), checksums, the seeded byte stream and
//! its FNV-1a checksum, address parsing. Pure code.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// IEEE 802 local experimental ethertype: raw test frames no stack takes for its own.
pub const ETHERTYPE_TEST: u16 = 0x88B5;
pub const BROADCAST: [u8; 6] = [0xff; 6];

pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

pub fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let a: core::net::Ipv4Addr = s.parse().ok()?;
    Some(a.octets())
}

/// `a.b.c.d/nn`.
pub fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (a, n) = s.split_once('/')?;
    let n: u8 = n.parse().ok()?;
    (n <= 32).then_some((parse_ip(a)?, n))
}

/// FNV-1a, 64-bit, fed byte by byte.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seeded stream: byte `i` is byte `i % 8` of `splitmix(seed + i / 8)`. Fills `buf`
/// with the bytes from offset `off`.
pub fn stream_fill(seed: u64, off: u64, buf: &mut [u8]) {
    let mut word = u64::MAX;
    let mut w = [0u8; 8];
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = off + i as u64;
        if pos / 8 != word {
            word = pos / 8;
            w = splitmix(seed.wrapping_add(word)).to_le_bytes();
        }
        *b = w[(pos % 8) as usize];
    }
}

/// The Internet checksum of `data` added to `sum` (not folded).
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut c = data.chunks_exact(2);
    for p in &mut c {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([p[0], p[1]])));
    }
    if let [b] = c.remainder() {
        sum = sum.wrapping_add(u32::from(*b) << 8);
    }
    sum
}

pub fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Complete the TCP or UDP checksum of an IPv4 frame whose sender left it blank (checksum
/// offload); true if one was written.
pub fn fix_l4_csum(frame: &mut [u8]) -> bool {
    if frame.len() < ETH_HLEN + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4 {
        return false;
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let proto = ip[9];
    if ihl < 20 || total < ihl || ETH_HLEN + total > frame.len() {
        return false;
    }
    let csum_at = match proto {
        6 => 16,
        17 => 6,
        _ => return false,
    };
    let l4_len = total - ihl;
    if l4_len < csum_at + 2 {
        return false;
    }
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&ip[12..20]);
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&(l4_len as u16).to_be_bytes());
    let start = ETH_HLEN + ihl;
    frame[start + csum_at] = 0;
    frame[start + csum_at + 1] = 0;
    let sum = csum_add(csum_add(0, &pseudo), &frame[start..start + l4_len]);
    let mut c = csum_fold(sum);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    frame[start + csum_at..start + csum_at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum computed), padded to 60 bytes.
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src_ip: [u8; 4],
    dst_ip: [u8; 4],
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth(dst_mac, src_mac, ETHERTYPE_IPV4);
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src_ip);
    ip[16..20].copy_from_slice(&dst_ip);
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&ports.0.to_be_bytes());
    f.extend_from_slice(&ports.1.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    fix_l4_csum(&mut f);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// An ARP reply (`op` 2) saying `sender_ip` is at `sender_mac`, to `target`.
pub fn arp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    sender_mac: [u8; 6],
    sender_ip: [u8; 4],
    target_ip: [u8; 4],
) -> Vec<u8> {
    let mut f = eth(dst_mac, src_mac, ETHERTYPE_ARP);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&target_ip);
    f.resize(60, 0);
    f
}

/// A raw test frame of `len` bytes (ethertype [`ETHERTYPE_TEST`]).
pub fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = eth(dst, src, ETHERTYPE_TEST);
    f.resize(len.max(ETH_HLEN), 0x5a);
    f
}
