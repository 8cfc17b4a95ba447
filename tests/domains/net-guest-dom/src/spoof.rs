//! `role=spoof victim_mac=<mac> victim_ip=<ip> ip=<own/nn> peer=<ip>`: for `secs=` seconds
//! (default 8) sends, every 5 ms, three forged frames, all broadcast so that any that got
//! through the switch would reach every guest:
//! - a UDP datagram to `peer:5002` from the victim's MAC and IP (MAC spoofing);
//! - the same from this guest's own MAC but the victim's IP (IP spoofing);
//! - an ARP reply claiming the victim's IP is at this guest's MAC (ARP spoofing: were it
//!   believed, the peer would send the victim's traffic here).
//!
//! The datagrams start with `SPOOF`, which the receiving guest counts. `RESULT net_spoof_mac`,
//! `net_spoof_ip` and `net_spoof_arp` say how many of each were handed to the backend (pass
//! means sent: whether they were dropped is the backend's counters' and the receiver's to
//! say).

use alloc::format;

use dom_rt::{println, time};

use crate::front::{Nic, SendError};
use crate::guest::{MS, num, param, result};
use crate::roles::FRAMES_PORT;
use crate::wire::{BROADCAST, arp_frame, fmt_mac, parse_cidr, parse_ip, parse_mac, udp_frame};

pub fn run<N: Nic>(mut nic: N, cmdline: &str) -> N {
    let (Some(vmac), Some(vip), Some(own), Some(peer)) = (
        param(cmdline, "victim_mac").and_then(parse_mac),
        param(cmdline, "victim_ip").and_then(parse_ip),
        param(cmdline, "ip").and_then(parse_cidr),
        param(cmdline, "peer").and_then(parse_ip),
    ) else {
        result("net_spoof", false, "needs victim_mac= victim_ip= ip= peer=");
        return nic;
    };
    let me = nic.mac_addr();
    let secs: u64 = num(cmdline, "secs").unwrap_or(8);
    let ports = (FRAMES_PORT + 7, FRAMES_PORT);
    let frames = [
        udp_frame(BROADCAST, vmac, vip, peer, ports, b"SPOOF-MAC"),
        udp_frame(BROADCAST, me, vip, peer, ports, b"SPOOF-IP"),
        arp_frame(BROADCAST, me, me, vip, peer),
    ];
    let mut sent = [0u64; 3];
    let mut failed = 0u64;
    let mut last_error = None;
    let end = time::now_ns() + secs * 1000 * MS;
    while time::now_ns() < end {
        for (f, n) in frames.iter().zip(sent.iter_mut()) {
            match nic.send(f) {
                Ok(()) => *n += 1,
                Err(SendError::Busy) => {}
                Err(SendError::Other(e)) => {
                    failed += 1;
                    last_error = Some(e);
                }
            }
        }
        let _ = nic.poll();
        while nic.recv().is_some() {}
        nic.wait(Some(time::now_ns() + 5 * MS));
    }
    let (v, m) = (fmt_mac(&vmac), fmt_mac(&me));
    let ip = |a: [u8; 4]| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]);
    result(
        "net_spoof_mac",
        sent[0] > 0,
        format!(
            "sent {} UDP frames from MAC {v} and IP {} (the victim's) to {}:{FRAMES_PORT}",
            sent[0],
            ip(vip),
            ip(peer)
        ),
    );
    result(
        "net_spoof_ip",
        sent[1] > 0,
        format!(
            "sent {} UDP frames from own MAC {m} with IP {} (the victim's; own {})",
            sent[1],
            ip(vip),
            ip(own.0)
        ),
    );
    result(
        "net_spoof_arp",
        sent[2] > 0,
        format!("sent {} ARP replies saying {} is at {m}", sent[2], ip(vip)),
    );
    println!(
        "net-guest: spoofing done, {failed} send error(s) (last {last_error:?}); netfront {}",
        nic.stats_line()
    );
    nic
}
