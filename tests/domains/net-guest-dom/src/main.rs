//! net-guest-dom: a guest with a network interface behind the network backend domain,
//! through dom-rt's [`Netfront`](dom_rt::netfront::Netfront), running `smoltcp` (IPv4, TCP,
//! UDP, ICMP) over it. Prints `RESULT <name> pass|fail <details>` per check and `METRIC`
//! lines for the benchmarks; powers off when its role is done.
//!
//! Roles (`role=`, with `ip=a.b.c.d/nn`, `gw=`, `peer=`, `seed=`, `bytes=`):
//! - `http`: serves HTTP/1.0 on port 80 (`GET /` answers a short body naming Bulkhead and
//!   the domain id), printing `READY http <ip>:80` once the interface is up; with
//!   `requests=<n>` it stops after `n` answers, then with `sink=<port>` it streams `bytes=`
//!   to `<gw>:<port>` (a host-side sink through QEMU's user networking) and prints
//!   `METRIC net_g2uplink_tcp_mbps`.
//! - `tcp-send`: pings `peer` (`RESULT net_ping`), sends a seeded stream of `bytes=` over
//!   TCP to `peer:5001` (`RESULT net_tcp_send`), then 64-byte UDP frames to `peer:5002` for a
//!   second.
//! - `tcp-recv`: answers pings, receives the stream and checks every byte and its FNV-1a
//!   checksum (`RESULT net_tcp_stream`, `METRIC net_g2g_tcp_mbps`), counts the 64-byte
//!   frames (`METRIC net_g2g_64b_pps`) and any spoofed datagram (`RESULT net_no_spoof_seen`
//!   with `expect_no_spoof=1`).
//! - `spoof`: sends frames with another guest's MAC (`victim_mac=`), with its IP
//!   (`victim_ip=`) and ARP claims for its IP (`RESULT net_spoof_* pass` says what was
//!   sent); see `spoof.rs`.
//! - `hostile`: malformed tx requests straight on the ring (`hostile.rs`).
//! - `killer`: crashes a domain once another wrote a node (the restart scenario).
//! - `hotplug`: starts without a vif and takes the vifs attached and detached while it
//!   runs, pinging `peer` over each (`hotplug.rs`).
//!
//! Common words: `queues=<n>` asks netback for n queues (1..=16, default 1; the backend's
//! `multi-queue-max-queues` may grant fewer; `RESULT net_connect` says how many). The
//! benchmark metrics get the suffix `metric_suffix=<s>`, or `_mq` when more than one queue
//! was negotiated (`net_g2g_tcp_mbps_mq`, ...). The 64-byte frames of `tcp-send` come from
//! `flows=<n>` UDP source ports in turn (default 1), so that several queues can carry them.
//! `http` streams to `sink_ip=` instead of `gw` when given (a QEMU `guestfwd` sink).
//!
//! The vif is the first under `device/vif` (written by the toolstack), or, with
//! `backend=<domid>` on the command line, vif 0 whose frontend directory this guest writes
//! itself (`mac=` then gives its MAC; systems without a toolstack).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
dom_rt::entry!(guest::main);

extern crate alloc;

#[cfg(target_os = "none")]
mod front;
#[cfg(target_os = "none")]
mod hostile;
#[cfg(target_os = "none")]
mod hotplug;
#[cfg(target_os = "none")]
mod roles;
#[cfg(target_os = "none")]
mod spoof;
#[cfg(target_os = "none")]
mod stack;
#[cfg_attr(not(target_os = "none"), allow(dead_code))]
mod wire;

#[cfg(target_os = "none")]
mod guest {
    use alloc::format;
    use alloc::string::String;
    use core::fmt::Display;

    use dom_rt::xenbus::Tx;
    use dom_rt::{StartInfo, XenError, println, time};
    use shared_abi::DomId;

    pub type Bus = dom_rt::xenbus::DomainBus;

    pub const DEVID: u32 = 0;
    pub const MS: u64 = 1_000_000;

    pub fn result(name: &str, ok: bool, details: impl Display) {
        let v = if ok { "pass" } else { "fail" };
        println!("RESULT {name} {v} {details}");
    }

    pub fn param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
        dom_rt::cmdline_param(cmdline, key)
    }

    pub fn num<T: core::str::FromStr>(cmdline: &str, key: &str) -> Option<T> {
        param(cmdline, key).and_then(|v| v.parse().ok())
    }

    /// Self-layout: the frontend directory a toolstack would write, readable by `backend`.
    pub fn write_frontend_dir(
        xb: &mut Bus,
        me: DomId,
        backend: DomId,
        mac: &str,
    ) -> Result<String, XenError> {
        let dir = format!("/local/domain/{me}/device/vif/{DEVID}");
        let be = format!("/local/domain/{backend}/backend/vif/{me}/{DEVID}");
        let (be_id, devid) = (format!("{backend}"), format!("{DEVID}"));
        xb.transaction(dom_rt::xenbus::TRANSACTION_TRIES, |xb, tx| {
            xb.mkdir(tx, &dir)?;
            xb.set_perms(tx, &dir, &[&format!("n{me}"), &format!("r{backend}")])?;
            for (k, v) in [
                ("backend", be.as_str()),
                ("backend-id", &be_id),
                ("handle", &devid),
                ("mac", mac),
                ("state", "1"),
            ] {
                xb.write(tx, &format!("{dir}/{k}"), v.as_bytes())?;
            }
            Ok(())
        })?;
        Ok(dir)
    }

    /// The first device under `device/vif` once its state reads Initialising (waits up to
    /// 60 s: the toolstack may still be writing it).
    pub fn find_device(xb: &mut Bus, me: DomId) -> Result<String, String> {
        let base = format!("/local/domain/{me}/device/vif");
        let end = time::now_ns() + 60_000 * MS;
        let mut last = Err(XenError::ENOENT);
        while time::now_ns() < end {
            last = xb.directory(Tx::NONE, &base);
            if let Ok(v) = &last
                && let Some(d) = v.first()
                && xb.read(Tx::NONE, &format!("{base}/{d}/state")).as_deref() == Ok(b"1")
            {
                return Ok(format!("{base}/{d}"));
            }
            let _ = time::sleep(5 * MS);
        }
        Err(format!("no device under {base}: {last:?}"))
    }

    /// The frontend directory of this guest's vif (see the crate doc).
    pub fn vif_dir(xb: &mut Bus, me: DomId, cmdline: &str) -> Result<String, String> {
        match num::<DomId>(cmdline, "backend") {
            Some(b) => {
                let mac = param(cmdline, "mac").unwrap_or("00:16:3e:00:00:01");
                write_frontend_dir(xb, me, b, mac)
                    .map_err(|e| format!("writing the frontend dir: {e:?}"))
            }
            None => find_device(xb, me),
        }
    }

    pub fn main(si: &'static StartInfo) {
        let cmdline = si.cmdline();
        let role = param(cmdline, "role").unwrap_or("http");
        let Some(mut xb) = dom_rt::xenbus::connect_own_store(si) else {
            result("net_connect", false, "no xenstore connection");
            return;
        };
        match role {
            "hostile" => return crate::hostile::main(si, &mut xb),
            "killer" => return crate::roles::killer(&mut xb, cmdline),
            "hotplug" => return crate::hotplug::run(si, &mut xb, cmdline),
            _ => {}
        }
        let dir = match vif_dir(&mut xb, si.domid, cmdline) {
            Ok(d) => d,
            Err(e) => {
                result("net_connect", false, e);
                return;
            }
        };
        let queues = match param(cmdline, "queues") {
            None => 1,
            Some(q) => match q.parse::<u32>() {
                Ok(n) if (1..=dom_rt::netfront::MAX_QUEUES).contains(&n) => n,
                _ => {
                    result(
                        "net_config",
                        false,
                        format!("queues={q}: want 1..={}", dom_rt::netfront::MAX_QUEUES),
                    );
                    return;
                }
            },
        };
        let nic = match crate::front::connect(&mut xb, &dir, queues) {
            Ok(n) => n,
            Err(e) => {
                result("net_connect", false, format!("{dir}: {e}"));
                return;
            }
        };
        result(
            "net_connect",
            true,
            format!(
                "{dir}: mac {}, {} queue(s) ({queues} asked)",
                crate::wire::fmt_mac(&crate::front::Nic::mac_addr(&nic)),
                crate::front::Nic::queues(&nic)
            ),
        );
        let nic = match role {
            "spoof" => crate::spoof::run(nic, cmdline),
            _ => crate::roles::run(si, &mut xb, nic, role, cmdline),
        };
        // Closing/Closed with the backend, so it can let the vif go.
        match crate::front::close(nic, &mut xb) {
            Ok(()) => result("net_close", true, "Closed"),
            Err(e) => result("net_close", false, e),
        }
    }
}

#[cfg(not(target_os = "none"))]
fn main() {}
