//! The smoltcp roles: `http`, `tcp-send`, `tcp-recv`, and the `killer` of the restart
//! scenario.

use alloc::format;
use alloc::string::String;
use alloc::vec;

use dom_rt::xenbus::Tx;
use dom_rt::{StartInfo, hypercall, println, time};
use shared_abi::DomId;
use smoltcp::socket::{icmp, tcp, udp};
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress, IpEndpoint, Ipv4Address};

use crate::front::Nic;
use crate::guest::{Bus, MS, num, param, result};
use crate::stack::Net;
use crate::wire::{Fnv, parse_cidr, parse_ip, stream_fill};

pub const STREAM_PORT: u16 = 5001;
pub const FRAMES_PORT: u16 = 5002;
/// Payload of a 64-byte UDP frame (14 Ethernet + 20 IPv4 + 8 UDP + 22).
const SMALL_PAYLOAD: usize = 22;
const BLAST_NS: u64 = 1_000_000_000;
/// Most UDP source ports (`flows=`) the 64-byte frames come from.
const MAX_FLOWS: u16 = 16;
const TCP_BUF: usize = 256 * 1024;
/// Datagrams a spoofing guest aims at the receiver start with this.
pub const SPOOF_MARK: &[u8] = b"SPOOF";

fn tcp_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUF]),
        tcp::SocketBuffer::new(vec![0; TCP_BUF]),
    );
    s.set_nagle_enabled(false);
    // Without congestion control smoltcp sends the peer's whole window at once, which a
    // slow path (QEMU's user network behind the uplink's queue) drops in bursts.
    s.set_congestion_control(tcp::CongestionControl::Reno);
    s
}

fn udp_socket(packets: usize, bytes: usize) -> udp::Socket<'static> {
    udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]),
    )
}

fn mbps(bytes: u64, ns: u64) -> f64 {
    bytes as f64 * 8.0 / 1e6 / (ns.max(1) as f64 / 1e9)
}

/// The suffix of this guest's benchmark metrics: `metric_suffix=` (letters, digits and `_`),
/// else `_mq` with more than one queue negotiated, else none.
fn metric_suffix(cmdline: &str, queues: u32) -> Result<&str, String> {
    match param(cmdline, "metric_suffix") {
        Some(s) if s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => Ok(s),
        Some(s) => Err(format!(
            "metric_suffix={s}: only letters, digits and '_' may follow a metric name"
        )),
        None if queues > 1 => Ok("_mq"),
        None => Ok(""),
    }
}

pub fn run<N: Nic>(si: &'static StartInfo, xb: &mut Bus, nic: N, role: &str, cmdline: &str) -> N {
    let Some(ip) = param(cmdline, "ip").and_then(parse_cidr) else {
        result("net_config", false, "needs ip=a.b.c.d/nn");
        return nic;
    };
    let sfx = match metric_suffix(cmdline, nic.queues()) {
        Ok(s) => s,
        Err(e) => {
            result("net_config", false, e);
            return nic;
        }
    };
    let gw = param(cmdline, "gw").and_then(parse_ip);
    let seed: u64 = num(cmdline, "seed").unwrap_or(0x5EED);
    let mut net = Net::new(xb, nic, ip, gw, seed);
    match role {
        "http" => http(si, &mut net, ip.0, cmdline, sfx),
        "tcp-send" => sender(&mut net, cmdline, seed),
        "tcp-recv" => receiver(si.domid, &mut net, cmdline, seed, sfx),
        other => result("net_config", false, format!("unknown role {other}")),
    }
    let s = net.dev.stats;
    println!(
        "net-guest: device rx {} tx {} tx-busy {} tx-dropped {} csum-completed {}; netfront {}",
        s.rx_frames,
        s.tx_frames,
        s.tx_busy,
        s.tx_dropped,
        s.csum_completed,
        net.dev.nic.stats_line()
    );
    net.dev.nic
}

/// `role=http`: see the crate doc.
fn http<N: Nic>(si: &StartInfo, net: &mut Net<'_, N>, ip: [u8; 4], cmdline: &str, sfx: &str) {
    let limit: Option<u64> = num(cmdline, "requests");
    let h = net.sockets.add(tcp_socket());
    let a = Ipv4Address::from(ip);
    println!("READY http {a}:80");
    let body = format!(
        "Hello from Bulkhead: domain {} (net-guest-dom) over netfront and smoltcp\n",
        si.domid
    );
    let mut served = 0u64;
    let mut req = String::new();
    let mut answered = false;
    loop {
        net.poll();
        let s = net.sockets.get_mut::<tcp::Socket>(h);
        if !s.is_open() {
            if limit.is_some_and(|l| served >= l) {
                break;
            }
            req.clear();
            answered = false;
            if let Err(e) = s.listen(80) {
                result("net_http", false, format!("listen: {e}"));
                return;
            }
        }
        if s.can_recv() {
            let _ = s.recv(|b| {
                req.push_str(&String::from_utf8_lossy(b));
                (b.len(), ())
            });
        }
        if !answered && s.can_send() && req.contains("\r\n\r\n") {
            let (status, text) = if req.starts_with("GET / ") {
                ("200 OK", body.as_str())
            } else {
                ("404 Not Found", "not found\n")
            };
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = s.send_slice(resp.as_bytes());
            s.close();
            answered = true;
            served += 1;
            let first = req.lines().next().unwrap_or("");
            println!("net-guest: http request {served}: {first} -> {status}");
        }
        net.idle(20 * MS);
    }
    result("net_http", true, format!("{served} request(s) answered"));
    let sink_ip = param(cmdline, "sink_ip").or_else(|| param(cmdline, "gw"));
    if let (Some(port), Some(gw)) = (num::<u16>(cmdline, "sink"), sink_ip.and_then(parse_ip)) {
        let bytes: u64 = num(cmdline, "bytes").unwrap_or(4 << 20);
        let seed: u64 = num(cmdline, "seed").unwrap_or(0x5EED);
        match stream_out(net, Ipv4Address::from(gw), port, bytes, seed) {
            Ok((sum, ns)) => {
                result(
                    "net_uplink_stream",
                    true,
                    format!("bytes {bytes} checksum {sum:016x}"),
                );
                println!(
                    "METRIC net_g2uplink_tcp_mbps{sfx} {:.1} Mbit/s",
                    mbps(bytes, ns)
                );
            }
            Err(e) => result("net_uplink_stream", false, e),
        }
    }
}

/// Ping `peer` `n` times: replies and the mean round trip (µs).
pub(crate) fn ping<N: Nic>(net: &mut Net<'_, N>, peer: Ipv4Address, n: u16) -> (u16, u64) {
    let h = net.sockets.add(icmp::Socket::new(
        icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 1024]),
        icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 1024]),
    ));
    let ident = 0x4e47;
    let _ = net
        .sockets
        .get_mut::<icmp::Socket>(h)
        .bind(icmp::Endpoint::Ident(ident));
    let caps = smoltcp::phy::ChecksumCapabilities::default();
    let (mut got, mut total_us) = (0u16, 0u64);
    for seq in 0..n {
        let sent_at = time::now_ns();
        let end = sent_at + 3000 * MS;
        let mut sent = false;
        while time::now_ns() < end {
            net.poll();
            let s = net.sockets.get_mut::<icmp::Socket>(h);
            if !sent && s.can_send() {
                let data = sent_at.to_le_bytes();
                let repr = Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no: seq,
                    data: &data,
                };
                if let Ok(buf) = s.send(repr.buffer_len(), IpAddress::Ipv4(peer)) {
                    let mut p = Icmpv4Packet::new_unchecked(buf);
                    repr.emit(&mut p, &caps);
                    sent = true;
                }
            }
            let mut done = false;
            while let Ok((payload, _)) = s.recv() {
                if let Ok(p) = Icmpv4Packet::new_checked(payload)
                    && let Ok(Icmpv4Repr::EchoReply { seq_no, .. }) = Icmpv4Repr::parse(&p, &caps)
                    && seq_no == seq
                {
                    done = true;
                }
            }
            if done {
                got += 1;
                total_us += (time::now_ns() - sent_at) / 1000;
                break;
            }
            net.idle(5 * MS);
        }
    }
    net.sockets.remove(h);
    (got, total_us / u64::from(got.max(1)))
}

/// Stream `bytes` of the seeded stream to `peer:port`: its checksum and the time from the
/// connection's establishment to the last byte acknowledged.
fn stream_out<N: Nic>(
    net: &mut Net<'_, N>,
    peer: Ipv4Address,
    port: u16,
    bytes: u64,
    seed: u64,
) -> Result<(u64, u64), String> {
    let h = net.sockets.add(tcp_socket());
    let give_up = time::now_ns() + 60_000 * MS;
    let mut local = 49152 + (seed % 1000) as u16;
    let mut sent = 0u64;
    let mut fnv = Fnv::default();
    let mut t0 = None;
    let mut t1 = None;
    loop {
        if time::now_ns() > give_up {
            net.sockets.remove(h);
            return Err(format!(
                "timed out: {sent} of {bytes} bytes sent, state {}",
                net.sockets.get::<tcp::Socket>(h).state()
            ));
        }
        net.poll();
        let cx = net.iface.context();
        let s = net.sockets.get_mut::<tcp::Socket>(h);
        if !s.is_open() {
            if t0.is_some() {
                if sent == bytes {
                    break;
                }
                return Err(format!("connection lost after {sent} bytes"));
            }
            // Not listening yet (or refused): try again shortly.
            local += 1;
            if let Err(e) = s.connect(cx, (IpAddress::Ipv4(peer), port), local) {
                return Err(format!("connect: {e}"));
            }
            net.idle(100 * MS);
            continue;
        }
        if t0.is_none() && s.state() == tcp::State::Established {
            t0 = Some(time::now_ns());
        }
        while s.can_send() && sent < bytes {
            let n = s
                .send(|buf| {
                    let n = buf.len().min((bytes - sent) as usize);
                    stream_fill(seed, sent, &mut buf[..n]);
                    fnv.update(&buf[..n]);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            sent += n as u64;
        }
        if sent == bytes && s.send_queue() == 0 && t1.is_none() {
            t1 = Some(time::now_ns());
            s.close();
        }
        if t1.is_some() && matches!(s.state(), tcp::State::TimeWait | tcp::State::Closed) {
            break;
        }
        if !(s.can_send() && sent < bytes) {
            net.idle(2 * MS);
        }
    }
    net.sockets.remove(h);
    let ns = t1.unwrap_or_else(time::now_ns) - t0.unwrap_or(0);
    Ok((fnv.0, ns))
}

/// `role=tcp-send`: ping, stream, small frames.
fn sender<N: Nic>(net: &mut Net<'_, N>, cmdline: &str, seed: u64) {
    let Some(peer) = param(cmdline, "peer").and_then(parse_ip) else {
        result("net_config", false, "tcp-send needs peer=a.b.c.d");
        return;
    };
    let peer = Ipv4Address::from(peer);
    let (got, rtt) = ping(net, peer, 5);
    result(
        "net_ping",
        got == 5,
        format!("{got}/5 echo replies from {peer}, mean rtt {rtt} us"),
    );
    let bytes: u64 = num(cmdline, "bytes").unwrap_or(4 << 20);
    match stream_out(net, peer, STREAM_PORT, bytes, seed) {
        Ok((sum, ns)) => {
            result(
                "net_tcp_send",
                true,
                format!(
                    "bytes {bytes} checksum {sum:016x} in {:.1} ms ({:.1} Mbit/s)",
                    ns as f64 / 1e6,
                    mbps(bytes, ns)
                ),
            );
        }
        Err(e) => {
            result("net_tcp_send", false, e);
            return;
        }
    }
    // 64-byte UDP frames for BLAST_NS from `flows` source ports in turn, then END markers.
    let flows = num::<u16>(cmdline, "flows")
        .unwrap_or(1)
        .clamp(1, MAX_FLOWS);
    let per_flow = 512 / usize::from(flows);
    let hs: alloc::vec::Vec<_> = (0..flows)
        .map(|i| {
            let h = net.sockets.add(udp_socket(per_flow, per_flow * 64));
            let _ = net
                .sockets
                .get_mut::<udp::Socket>(h)
                .bind(FRAMES_PORT + 1 + i);
            h
        })
        .collect();
    let to = IpEndpoint::new(IpAddress::Ipv4(peer), FRAMES_PORT);
    let mut seq = 0u64;
    let t0 = time::now_ns();
    let mut payload = [0x42u8; SMALL_PAYLOAD];
    while time::now_ns() - t0 < BLAST_NS {
        // Round robin over the flows while any has room.
        let mut room = true;
        while room {
            room = false;
            for &h in &hs {
                let s = net.sockets.get_mut::<udp::Socket>(h);
                if !s.can_send() {
                    continue;
                }
                payload[..8].copy_from_slice(&seq.to_le_bytes());
                if s.send_slice(&payload, to).is_ok() {
                    seq += 1;
                    room = true;
                }
            }
        }
        net.poll();
    }
    let blast_ns = time::now_ns() - t0;
    let h = hs[0];
    for _ in 0..5 {
        let _ = net.sockets.get_mut::<udp::Socket>(h).send_slice(b"END", to);
        let end = time::now_ns() + 20 * MS;
        while time::now_ns() < end {
            net.poll();
            net.idle(5 * MS);
        }
    }
    println!(
        "net-guest: sent {seq} 64-byte UDP frames from {flows} flow(s) in {:.1} ms ({:.0} frames/s offered)",
        blast_ns as f64 / 1e6,
        seq as f64 / (blast_ns as f64 / 1e9)
    );
}

/// `role=tcp-recv`: see the crate doc.
fn receiver<N: Nic>(me: DomId, net: &mut Net<'_, N>, cmdline: &str, seed: u64, sfx: &str) {
    let bytes: u64 = num(cmdline, "bytes").unwrap_or(4 << 20);
    let th = net.sockets.add(tcp_socket());
    let uh = net.sockets.add(udp_socket(2048, 2048 * 64));
    let _ = net.sockets.get_mut::<tcp::Socket>(th).listen(STREAM_PORT);
    let _ = net.sockets.get_mut::<udp::Socket>(uh).bind(FRAMES_PORT);
    // The restart scenario's killer waits for this node.
    let mark = format!("/local/domain/{me}/data/net-receiving");
    let mut marked = false;
    let give_up = time::now_ns() + num::<u64>(cmdline, "max_s").unwrap_or(180) * 1000 * MS;
    let mut got = 0u64;
    let mut fnv = Fnv::default();
    let mut bad_at: Option<u64> = None;
    let mut expect = vec![0u8; 0];
    let (mut t0, mut t1) = (0u64, 0u64);
    let mut max_gap = 0u64;
    let mut tcp_done = false;
    let (mut frames, mut f0, mut f1) = (0u64, 0u64, 0u64);
    let mut spoofed = 0u64;
    let mut udp_done = false;
    while !(tcp_done && udp_done) {
        if time::now_ns() > give_up {
            break;
        }
        net.poll();
        let s = net.sockets.get_mut::<tcp::Socket>(th);
        while s.can_recv() {
            let r = s.recv(|buf| {
                if expect.len() < buf.len() {
                    expect.resize(buf.len(), 0);
                }
                stream_fill(seed, got, &mut expect[..buf.len()]);
                if bad_at.is_none()
                    && let Some(i) = (0..buf.len()).find(|&i| buf[i] != expect[i])
                {
                    bad_at = Some(got + i as u64);
                }
                fnv.update(buf);
                (buf.len(), buf.len())
            });
            let now = time::now_ns();
            match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if got == 0 {
                        t0 = now;
                    } else {
                        max_gap = max_gap.max(now - t1);
                    }
                    t1 = now;
                    got += n as u64;
                }
            }
        }
        if got > 0 && !marked {
            // Readable by everyone (the killer is another domain).
            marked = net.xb.write(Tx::NONE, &mark, b"1").is_ok()
                && net
                    .xb
                    .set_perms(Tx::NONE, &mark, &[&format!("r{me}")])
                    .is_ok();
        }
        if !tcp_done && got > 0 && !s.may_recv() {
            tcp_done = true;
            s.close();
        }
        let u = net.sockets.get_mut::<udp::Socket>(uh);
        while let Ok((data, _)) = u.recv() {
            if data.starts_with(b"END") {
                udp_done = true;
            } else if data.starts_with(SPOOF_MARK) {
                spoofed += 1;
            } else {
                let now = time::now_ns();
                if frames == 0 {
                    f0 = now;
                }
                f1 = now;
                frames += 1;
            }
        }
        net.idle(2 * MS);
    }
    let ok = got == bytes && bad_at.is_none();
    let mut want = Fnv::default();
    {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0;
        while off < bytes {
            let n = buf.len().min((bytes - off) as usize);
            stream_fill(seed, off, &mut buf[..n]);
            want.update(&buf[..n]);
            off += n as u64;
        }
    }
    result(
        "net_tcp_stream",
        ok && want.0 == fnv.0,
        format!(
            "bytes {got} checksum {:016x} (expected {bytes} bytes, checksum {:016x}){}",
            fnv.0,
            want.0,
            bad_at.map_or(String::new(), |b| format!(", first wrong byte at {b}"))
        ),
    );
    println!(
        "net-guest: stream first byte at {t0} ns, last at {t1} ns, longest gap {:.1} ms",
        max_gap as f64 / 1e6
    );
    println!(
        "METRIC net_tcp_max_gap_ms{sfx} {:.1} ms",
        max_gap as f64 / 1e6
    );
    if ok {
        println!(
            "METRIC net_g2g_tcp_mbps{sfx} {:.1} Mbit/s",
            mbps(got, t1 - t0)
        );
    }
    if frames > 1 {
        println!(
            "METRIC net_g2g_64b_pps{sfx} {:.0} frames/s",
            (frames - 1) as f64 / ((f1 - f0).max(1) as f64 / 1e9)
        );
    }
    println!("net-guest: {frames} 64-byte frames, {spoofed} spoofed datagrams received");
    if param(cmdline, "expect_no_spoof") == Some("1") {
        result(
            "net_no_spoof_seen",
            spoofed == 0,
            format!("{spoofed} datagram(s) from a spoofed source reached this guest"),
        );
    }
}

/// `role=killer target=<domid> watch=<domid>`: wait (up to 10 minutes) until domain `watch`
/// wrote `data/net-receiving`, then crash domain `target`.
pub fn killer(xb: &mut Bus, cmdline: &str) {
    let (Some(target), Some(watch)) = (
        num::<DomId>(cmdline, "target"),
        num::<DomId>(cmdline, "watch"),
    ) else {
        result("killer", false, "expected target=<domid> watch=<domid>");
        return;
    };
    let delay: u64 = num(cmdline, "delay_ms").unwrap_or(300);
    let node = format!("/local/domain/{watch}/data/net-receiving");
    let end = time::now_ns() + 600_000 * MS;
    while xb.read(Tx::NONE, &node).is_err() {
        if time::now_ns() > end {
            result("killer", false, format!("{node} never appeared"));
            return;
        }
        let _ = time::sleep(5 * MS);
    }
    let _ = time::sleep(delay * MS);
    let at = time::now_ns();
    match hypercall::remote_shutdown(target, shared_abi::hypercall::sched_op::SHUTDOWN_CRASH) {
        Ok(()) => {
            println!("net-restart: killed domain {target} at {at} ns");
            result("killer", true, format!("crashed domain {target}"));
        }
        Err(e) => result("killer", false, format!("remote_shutdown({target}): {e:?}")),
    }
}
