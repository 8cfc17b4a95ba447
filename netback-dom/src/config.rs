//! The driver domain's pure glue, kept here so it is host-tested: its `serve=` command-line
//! list, the switch policy of a connected vif, the frames the uplink can carry, and the
//! per-port counter line scenarios read.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use shared_abi::DomId;

use crate::backend::QueueConfig;
use crate::packet::{MacAddr, Packet};
use crate::switch::{DropReason, PortCounters, TokenBucket, VifPolicy};
use crate::xenbus::{BackendFeatures, Connection, parse_ipv4};

/// One `serve=` entry: a vif whose backend directory the domain writes itself (systems
/// without a toolstack).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeEntry {
    pub frontend: DomId,
    pub devid: u32,
    pub mac: MacAddr,
    pub ip: Option<[u8; 4]>,
}

/// Parse `serve=<fe>:<devid>:<mac>[:<ip>],...` (the MAC in `xx:xx:xx:xx:xx:xx` form). Every
/// entry is checked; a frontend/devid pair or a MAC may appear once.
pub fn parse_serve(list: &str) -> Result<Vec<ServeEntry>, String> {
    let mut out: Vec<ServeEntry> = Vec::new();
    for item in list.split(',') {
        let bad = || format!("serve entry {item:?}: want <frontend>:<devid>:<mac>[:<ip>]");
        let parts: Vec<&str> = item.split(':').collect();
        if parts.len() != 8 && parts.len() != 9 {
            return Err(bad());
        }
        let frontend: DomId = parts[0].parse().map_err(|_| bad())?;
        let devid: u32 = parts[1].parse().map_err(|_| bad())?;
        let mac = MacAddr::parse(&parts[2..8].join(":"))
            .filter(|m| !m.is_multicast() && !m.is_zero())
            .ok_or_else(bad)?;
        let ip = match parts.get(8) {
            None => None,
            Some(s) => Some(parse_ipv4(s).ok_or_else(bad)?),
        };
        if out
            .iter()
            .any(|e| (e.frontend, e.devid) == (frontend, devid) || e.mac == mac)
        {
            return Err(format!("serve entry {item:?}: vif or MAC listed twice"));
        }
        out.push(ServeEntry {
            frontend,
            devid,
            mac,
            ip,
        });
    }
    Ok(out)
}

/// The frontend domain of a backend directory `.../backend/vif/<frontend>/<devid>`.
pub fn frontend_of(dir: &str) -> Option<DomId> {
    let mut it = dir.rsplit('/');
    it.next()?;
    it.next()?.parse().ok()
}

/// What the switch enforces on a connected vif: its MAC, its IPv4 addresses when the
/// toolstack gave some (IPv6 is then refused except `::` for ICMPv6, as the vif has no IPv6
/// address), its rate.
pub fn vif_policy(conn: &Connection, now_ns: u64) -> VifPolicy {
    VifPolicy {
        mac: conn.mac,
        ipv4: conn.ipv4.clone(),
        ipv6: conn.ipv4.as_ref().map(|_| Vec::new()),
        rate: conn
            .rate
            .and_then(|(bytes, usec)| TokenBucket::from_xen_rate(bytes, usec, now_ns)),
    }
}

/// Queue `index` of a vif connected as `conn` with `features` offered: tx accepts the GSO
/// kinds offered, rx gives the frontend what it asked for, the frontend's MTU (1500 when it
/// wrote none).
pub fn queue_config(conn: &Connection, features: &BackendFeatures, index: u16) -> QueueConfig {
    let mut c = QueueConfig::new(conn.frontend_id, index);
    c.tx_gso_tcpv4 = features.gso_tcpv4;
    c.tx_gso_tcpv6 = features.gso_tcpv6;
    c.multicast_control = conn.multicast_control;
    c.mtu = conn.mtu.map_or(1500, |m| m as usize);
    c.rx_sg = conn.sg;
    c.rx_gso_tcpv4 = conn.gso_tcpv4;
    c.rx_gso_tcpv6 = conn.gso_tcpv6;
    c
}

/// Largest frame the uplink carries: Ethernet header, 1500 bytes, one VLAN tag.
pub const UPLINK_MAX_FRAME: usize = 1518;

/// Why a frame cannot leave through the uplink (it has no segmentation offload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkRefusal {
    /// A GSO frame (the uplink does not segment).
    Gso,
    /// Longer than [`UPLINK_MAX_FRAME`].
    Oversize,
}

/// Whether `pkt` can go out through the uplink as it is.
pub fn uplink_admits(pkt: &Packet) -> Result<(), UplinkRefusal> {
    if pkt.offload.gso.is_some() {
        return Err(UplinkRefusal::Gso);
    }
    if pkt.len() > UPLINK_MAX_FRAME {
        return Err(UplinkRefusal::Oversize);
    }
    Ok(())
}

/// `netback: port <name> rx <n> tx <n> drop-spoof <n> drop-rate <n> drop-egress <n>
/// drop-other <n> rx-bytes <n> tx-bytes <n>`: `rx` is what the port sent into the switch,
/// `tx` what the switch forwarded out of it; `drop-spoof` counts MAC, IP and ARP spoofing.
pub fn counter_line(name: &str, c: &PortCounters) -> String {
    let spoof = c.drops(DropReason::SpoofedMac)
        + c.drops(DropReason::SpoofedIp)
        + c.drops(DropReason::SpoofedArp);
    let rate = c.drops(DropReason::RateLimited);
    let egress = c.drops(DropReason::EgressFull);
    let other = c.total_drops() - spoof - rate - egress;
    format!(
        "netback: port {name} rx {} tx {} drop-spoof {spoof} drop-rate {rate} drop-egress {egress} drop-other {other} rx-bytes {} tx-bytes {}",
        c.rx_packets, c.tx_packets, c.rx_bytes, c.tx_bytes
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Gso, GsoKind, Offload};
    use crate::switch::{PortKind, Switch, SwitchConfig};

    #[test]
    fn serve_lists_are_parsed_strictly() {
        let l = parse_serve("3:0:00:16:3e:00:00:03:10.0.2.15,4:1:00:16:3e:00:00:04").unwrap();
        assert_eq!(
            l,
            [
                ServeEntry {
                    frontend: 3,
                    devid: 0,
                    mac: MacAddr([0, 0x16, 0x3e, 0, 0, 3]),
                    ip: Some([10, 0, 2, 15]),
                },
                ServeEntry {
                    frontend: 4,
                    devid: 1,
                    mac: MacAddr([0, 0x16, 0x3e, 0, 0, 4]),
                    ip: None,
                }
            ]
        );
        for bad in [
            "",
            "3:0",
            "3:0:00:16:3e:00:00",
            "x:0:00:16:3e:00:00:03",
            "3:-1:00:16:3e:00:00:03",
            "3:0:01:16:3e:00:00:03",
            "3:0:00:00:00:00:00:00",
            "3:0:00:16:3e:00:00:3",
            "3:0:00:16:3e:00:00:03:10.0.2",
            "3:0:00:16:3e:00:00:03:10.0.2.15:x",
            "3:0:00:16:3e:00:00:03,3:0:00:16:3e:00:00:04",
            "3:0:00:16:3e:00:00:03,4:0:00:16:3e:00:00:03",
        ] {
            assert!(parse_serve(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frontend_is_the_second_last_component() {
        assert_eq!(frontend_of("/local/domain/2/backend/vif/5/0"), Some(5));
        assert_eq!(frontend_of("/local/domain/2/backend/vif/x/0"), None);
        assert_eq!(frontend_of("0"), None);
    }

    fn conn(ipv4: Option<Vec<[u8; 4]>>, rate: Option<(u64, u64)>) -> Connection {
        Connection {
            frontend_id: 3,
            queues: Vec::new(),
            sg: true,
            gso_tcpv4: false,
            gso_tcpv6: false,
            csum_ipv4: true,
            csum_ipv6: false,
            multicast_control: false,
            mac: MacAddr([0, 0x16, 0x3e, 0, 0, 3]),
            rate,
            ipv4,
            mtu: None,
        }
    }

    #[test]
    fn policy_follows_the_backend_keys() {
        let p = vif_policy(&conn(None, None), 0);
        assert_eq!((p.ipv4, p.ipv6, p.rate), (None, None, None));
        let mut p = vif_policy(
            &conn(Some(alloc::vec![[10, 0, 0, 2]]), Some((1000, 1000))),
            0,
        );
        assert_eq!(p.ipv4, Some(alloc::vec![[10, 0, 0, 2]]));
        assert_eq!(p.ipv6, Some(Vec::new()));
        // 1000 bytes per ms, burst at least a 64 KiB frame.
        let b = p.rate.as_mut().unwrap();
        assert_eq!(b.available(0), 65_536);
    }

    #[test]
    fn queue_config_takes_offers_and_requests() {
        let mut c = conn(None, None);
        c.mtu = Some(9000);
        c.gso_tcpv4 = true;
        let f = BackendFeatures {
            gso_tcpv4: false,
            gso_tcpv6: false,
            ..BackendFeatures::default()
        };
        let q = queue_config(&c, &f, 2);
        assert_eq!((q.frontend, q.index, q.mtu), (3, 2, 9000));
        assert!(!q.tx_gso_tcpv4 && !q.tx_gso_tcpv6);
        assert!(q.rx_sg && q.rx_gso_tcpv4 && !q.rx_gso_tcpv6);
        assert_eq!(queue_config(&conn(None, None), &f, 0).mtu, 1500);
    }

    #[test]
    fn uplink_refuses_gso_and_jumbo_frames() {
        assert_eq!(uplink_admits(&Packet::new(alloc::vec![0; 1514])), Ok(()));
        assert_eq!(
            uplink_admits(&Packet::new(alloc::vec![0; 1519])),
            Err(UplinkRefusal::Oversize)
        );
        let gso = Packet {
            data: alloc::vec![0; 100],
            offload: Offload {
                gso: Some(Gso {
                    kind: GsoKind::TcpV4,
                    mss: 1448,
                }),
                ..Offload::default()
            },
        };
        assert_eq!(uplink_admits(&gso), Err(UplinkRefusal::Gso));
    }

    #[test]
    fn counter_line_sums_the_spoofing_reasons() {
        let mac = MacAddr([0, 0x16, 0x3e, 0, 0, 3]);
        let mut sw = Switch::new(SwitchConfig::default());
        let p = sw
            .add_port(PortKind::Vif(vif_policy(&conn(None, None), 0)))
            .unwrap();
        let _up = sw.add_port(PortKind::Uplink).unwrap();
        let mut f = alloc::vec![0u8; 60];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&mac.0);
        let mut out = Vec::new();
        sw.forward(p, &f, 0, &mut out).unwrap();
        f[11] = 9; // another source MAC
        assert_eq!(sw.forward(p, &f, 0, &mut out), Err(DropReason::SpoofedMac));
        let line = counter_line("vif3.0", sw.counters(p).unwrap());
        assert_eq!(
            line,
            "netback: port vif3.0 rx 2 tx 0 drop-spoof 1 drop-rate 0 drop-egress 0 drop-other 0 rx-bytes 120 tx-bytes 0"
        );
    }
}
