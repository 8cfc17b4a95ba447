//! `netback-domain`: the network backend driver domain (a Bulkhead PV domain on dom-rt)
//! running the [`netback_dom`] engine and switch.
//!
//! It serves every vif the toolstack puts under its backend directory
//! (`/local/domain/<me>/backend/vif/<frontend-id>/<devid>`, XEN-ABI.md §5.2) and joins them,
//! and optionally an uplink, on one L2 switch ([`netback_dom::switch`]). The loop:
//!
//! 1. on a xenstore watch event (its backend directory, a frontend's `state`), or every
//!    second as a backstop: probe new vifs once their frontend directory exists (InitWait
//!    with the features offered), and hand every frontend state change to the xenbus logic
//!    ([`netback_dom::xenbus::NetbackXenbus`]);
//! 2. on connect: map each queue's tx and rx ring page (grant_map capability), bind its
//!    event channel(s), give it a pool of local pages for the grant copies, build the
//!    [`Vif`], attach it to the switch as a policed port (the backend's `mac`, `ip` and
//!    `rate` keys), go Connected; on close: detach, unmap, unbind, go Closed, log the port's
//!    counters;
//! 3. on any event: every queue's tx ring into the switch, the uplink's received frames into
//!    the switch, each forwarded frame onto its destination's rx backlog (or out of the
//!    uplink), every rx backlog into the buffers the frontends posted; then block in
//!    `SCHEDOP_poll` on every port (xenstore's and the uplink's interrupt too) with a
//!    timeout.
//!
//! Command line:
//! - `uplink=virtio`: the assigned virtio-net function (device_owner capability, dom-rt's
//!   device layer, `virtio-drivers`' `VirtIONetRaw`) is a trusted switch port. Its receive
//!   and transmit queues are routed to MSI-X entry 0, bound to an event channel (the loop
//!   then still wakes every 20 ms as a backstop); if the interrupt cannot be bound the
//!   uplink is polled every 2 ms. Without `uplink=` the switch joins only the vifs. The
//!   uplink carries no GSO and no frame over 1518 bytes, so GSO is not offered to frontends
//!   when it is present; a TCP/UDP checksum a frontend left blank (`csum_blank`) is filled
//!   in before a frame goes out through it.
//! - `serve=<fe>:<devid>:<mac>[:<ip>][,...]`: the domain writes those vifs' backend
//!   directories itself (systems without a toolstack; the frontend writes its own).
//! - `exit_when_idle`: power off once at least one vif was probed and every vif is closed
//!   again or gone; `exit_after_ms=<n>`: power off after n ms (smoke tests). Either prints
//!   one counter line per port first (`netback: port <name> rx … drop-spoof …`), as does
//!   `stats_every_ms=<n>` periodically.
//!
//! A frontend that corrupts its rings is disconnected alone (the engine's `Disconnect`);
//! the other vifs go on. A restarted instance finds the backend directories written for it
//! (by the control domain re-pointing the devices) exactly as at first boot.
//!
//! On the host this binary is a stub.
#![cfg_attr(all(target_arch = "x86_64", target_os = "none"), no_std, no_main)]

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
dom_rt::entry!(domain::main);

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
extern crate alloc;

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
mod domain {
    use alloc::collections::{BTreeMap, VecDeque};
    use alloc::format;
    use alloc::rc::Rc;
    use alloc::string::{String, ToString};
    use alloc::vec::Vec;
    use core::cell::Cell;
    use core::sync::atomic::{AtomicU64, Ordering};

    use dom_rt::blkfront::domain::XenbusStore;
    use dom_rt::device::dma::DmaBuffer;
    use dom_rt::device::irq::Interrupt;
    use dom_rt::device::virtio::{DomHal, VirtioPci, VirtioTransport};
    use dom_rt::gnttab::{self, MapWindow};
    use dom_rt::xenbus::{DomainBus, Tx, WatchHandle};
    use dom_rt::{StartInfo, XenError, evtchn, hypercall, println, time};
    use netback_dom::backend::{Disconnect, MIN_POOL_PAGES, Notify, Queue, RingKind, Vif};
    use netback_dom::config::{
        UplinkRefusal, counter_line, frontend_of, parse_serve, queue_config, uplink_admits,
        vif_policy,
    };
    use netback_dom::grant::{GrantCopier, Page, PagePool};
    use netback_dom::packet::{Checksum, Packet, complete_checksum};
    use netback_dom::switch::{PortId, PortKind, Switch, SwitchConfig};
    use netback_dom::xenbus::{Action, BackendFeatures, Connection, EventChannels, NetbackXenbus};
    use shared_abi::DomId;
    use shared_abi::event_channel::EvtchnPort;
    use shared_abi::grant_table::{GntStatus, GnttabCopy, GrantHandle};
    use shared_abi::start_info::SHARED_INFO_VA;
    use shared_abi::xenbus::{BackendDir, XenbusError, XenbusState, backend_ready_to_probe, path};
    use virtio_drivers::device::net::VirtIONetRaw;

    type Bus = DomainBus;

    const MS: u64 = 1_000_000;
    /// Longest block in `SCHEDOP_poll` when every source has an event channel.
    const POLL_NS: u64 = 20 * MS;
    /// Block when the uplink has to be polled.
    const UPLINK_POLL_NS: u64 = 2 * MS;
    /// Backstop rescan of the store without a watch event.
    const RESCAN_NS: u64 = 1000 * MS;
    /// Descriptors per virtio-net queue (a power of two, at most the device's 256).
    const VQ: usize = 64;
    /// Frames taken from the uplink per pass (fairness with the vifs).
    const UPLINK_BUDGET: usize = 64;
    /// Frames waiting for a free uplink transmit buffer (the device is slower than a burst).
    const UPLINK_BACKLOG: usize = 256;
    /// Pages in each queue's grant-copy pool.
    const POOL_PAGES: usize = MIN_POOL_PAGES;

    /// Grant copies by hypercall; the pool's frames are this domain's heap pages, named to
    /// the hypervisor by their auto-translated frame numbers with `DOMID_SELF`.
    struct DomCopier;

    impl GrantCopier for DomCopier {
        fn copy(&mut self, ops: &mut [GnttabCopy], _pool: &mut PagePool) -> Result<(), GntStatus> {
            gnttab::copy(ops).map_err(|e| {
                println!("netback: grant copy of {} element(s): {e:?}", ops.len());
                GntStatus::GeneralError
            })
        }
    }

    /// A page's frame number: Bulkhead's frames are `va >> 12`.
    fn frame_of(p: &Page) -> u64 {
        p as *const Page as u64 >> 12
    }

    /// The event channels of a vif's queues: (tx port, rx port), the same port twice without
    /// split channels.
    struct Ports<'a>(&'a [(EvtchnPort, EvtchnPort)]);

    impl Notify for Ports<'_> {
        fn notify(&mut self, queue: u16, ring: RingKind) {
            if let Some(&(tx, rx)) = self.0.get(usize::from(queue)) {
                let _ = evtchn::send(if ring == RingKind::Tx { tx } else { rx });
            }
        }
    }

    /// The assigned virtio-net function as a switch port.
    struct Uplink {
        net: VirtIONetRaw<DomHal, VirtioTransport, VQ>,
        irq: Option<Interrupt>,
        _pci: VirtioPci,
        /// Posted receive buffers by token.
        rx: Vec<Option<DmaBuffer>>,
        /// Transmit buffers in flight by token, with the length handed to the device.
        tx_busy: Vec<Option<(DmaBuffer, usize)>>,
        tx_free: Vec<DmaBuffer>,
        /// Frames waiting for a transmit buffer, oldest first.
        tx_backlog: VecDeque<Vec<u8>>,
        rx_frames: u64,
        tx_frames: u64,
        /// Frames the device could not take (queue full) or that cannot go out (GSO,
        /// oversize).
        tx_dropped: u64,
        refused_gso: u64,
        refused_oversize: u64,
        /// Frames whose blank checksum was filled in before they went out.
        csum_completed: u64,
        broken: bool,
    }

    impl Uplink {
        fn open() -> Result<Uplink, String> {
            let dev = dom_rt::device::find(0x1af4, &[0x1000, 0x1041])
                .ok_or("no virtio-net function assigned")?;
            let pci = VirtioPci::open(dev).map_err(|e| format!("virtio-pci setup: {e}"))?;
            let irq = match pci.device().bind_msix(0) {
                Ok(i) => Some(i),
                Err(e) => {
                    println!("netback: uplink: MSI-X entry 0: {e}; polling instead");
                    None
                }
            };
            let mut t = pci.transport().map_err(|e| format!("transport: {e}"))?;
            if let Some(i) = &irq {
                t = t
                    .with_queue_vector(0, i.entry())
                    .with_queue_vector(1, i.entry());
            }
            let mut net = VirtIONetRaw::<DomHal, VirtioTransport, VQ>::new(t)
                .map_err(|e| format!("virtio-net init: {e:?}"))?;
            let mut rx: Vec<Option<DmaBuffer>> = (0..VQ).map(|_| None).collect();
            for _ in 0..VQ {
                let mut b = DmaBuffer::new(1).map_err(|e| format!("rx buffer: {e:?}"))?;
                // SAFETY: the buffer is kept in `rx` under its token, untouched until the
                // device returned it (`receive`), and outlives the queue (dropped with it).
                let tok = unsafe { net.receive_begin(b.as_mut_slice()) }
                    .map_err(|e| format!("posting rx buffers: {e:?}"))?;
                let slot = rx
                    .get_mut(usize::from(tok))
                    .ok_or("virtio-net gave a token past its queue")?;
                *slot = Some(b);
            }
            let mut tx_free = Vec::new();
            for _ in 0..VQ {
                tx_free.push(DmaBuffer::new(1).map_err(|e| format!("tx buffer: {e:?}"))?);
            }
            if irq.is_some() {
                net.enable_interrupts();
            }
            Ok(Uplink {
                net,
                irq,
                _pci: pci,
                rx,
                tx_busy: (0..VQ).map(|_| None).collect(),
                tx_free,
                tx_backlog: VecDeque::new(),
                rx_frames: 0,
                tx_frames: 0,
                tx_dropped: 0,
                refused_gso: 0,
                refused_oversize: 0,
                csum_completed: 0,
                broken: false,
            })
        }

        fn mac(&self) -> String {
            let m = self.net.mac_address();
            format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            )
        }

        /// Take back the transmit buffers the device is done with.
        fn reap_tx(&mut self) {
            while let Some(tok) = self.net.poll_transmit() {
                let Some((b, len)) = self
                    .tx_busy
                    .get_mut(usize::from(tok))
                    .and_then(Option::take)
                else {
                    println!("netback: uplink: transmit token {tok} unknown; uplink stopped");
                    self.broken = true;
                    return;
                };
                // SAFETY: `b[..len]` is the buffer handed to transmit_begin for `tok`.
                if let Err(e) = unsafe { self.net.transmit_complete(tok, &b.as_slice()[..len]) } {
                    println!("netback: uplink: transmit completion: {e:?}");
                }
                self.tx_free.push(b);
            }
        }

        /// Queue one frame for the device (on the backlog while no transmit buffer is free);
        /// false if it was dropped.
        fn send(&mut self, frame: Vec<u8>) -> bool {
            if self.broken {
                return false;
            }
            self.flush();
            if self.tx_backlog.is_empty() && self.transmit(&frame) {
                return true;
            }
            if self.tx_backlog.len() >= UPLINK_BACKLOG {
                return false;
            }
            self.tx_backlog.push_back(frame);
            true
        }

        /// Move backlog frames onto the device as transmit buffers come back.
        fn flush(&mut self) {
            self.reap_tx();
            while !self.broken && !self.tx_free.is_empty() {
                let Some(f) = self.tx_backlog.pop_front() else {
                    break;
                };
                if !self.transmit(&f) {
                    self.tx_dropped += 1;
                }
            }
        }

        /// Hand one frame to the device now; false if it could not be taken.
        fn transmit(&mut self, frame: &[u8]) -> bool {
            let Some(mut b) = self.tx_free.pop() else {
                return false;
            };
            let Ok(hdr) = self.net.fill_buffer_header(b.as_mut_slice()) else {
                self.tx_free.push(b);
                return false;
            };
            let len = hdr + frame.len();
            if len > b.len() {
                self.tx_free.push(b);
                return false;
            }
            b.as_mut_slice()[hdr..len].copy_from_slice(frame);
            // SAFETY: the buffer is kept in `tx_busy` under its token, untouched until the
            // device completed it (`reap_tx`).
            match unsafe { self.net.transmit_begin(&b.as_slice()[..len]) } {
                Ok(tok) => match self.tx_busy.get_mut(usize::from(tok)) {
                    Some(slot) if slot.is_none() => {
                        *slot = Some((b, len));
                        self.tx_frames += 1;
                        true
                    }
                    _ => {
                        // Cannot happen with a sane device; keep the buffer out of reuse.
                        println!("netback: uplink: transmit token {tok} reused; uplink stopped");
                        core::mem::forget(b);
                        self.broken = true;
                        false
                    }
                },
                Err(_) => {
                    self.tx_free.push(b);
                    false
                }
            }
        }

        /// The next received frame, its buffer posted again.
        fn receive(&mut self) -> Option<Vec<u8>> {
            if self.broken {
                return None;
            }
            let tok = self.net.poll_receive()?;
            let Some(mut b) = self.rx.get_mut(usize::from(tok)).and_then(Option::take) else {
                println!("netback: uplink: receive token {tok} unknown; uplink stopped");
                self.broken = true;
                return None;
            };
            // SAFETY: `b` is the buffer posted for `tok`.
            let frame = match unsafe { self.net.receive_complete(tok, b.as_mut_slice()) } {
                Ok((hdr, len)) => b.as_slice().get(hdr..hdr + len).map(<[u8]>::to_vec),
                Err(e) => {
                    println!("netback: uplink: receive completion: {e:?}");
                    None
                }
            };
            // SAFETY: as at open: kept in `rx` under its new token until returned.
            match unsafe { self.net.receive_begin(b.as_mut_slice()) } {
                Ok(t) => match self.rx.get_mut(usize::from(t)) {
                    Some(slot) if slot.is_none() => *slot = Some(b),
                    _ => {
                        println!("netback: uplink: receive token {t} reused; uplink stopped");
                        core::mem::forget(b);
                        self.broken = true;
                    }
                },
                Err(e) => println!("netback: uplink: re-posting an rx buffer: {e:?}"),
            }
            self.rx_frames += 1;
            Some(frame.unwrap_or_default())
        }
    }

    /// A connected vif: the engine, its switch port, what to unbind and unmap.
    struct Connected {
        vif: Vif,
        port: PortId,
        ports: Vec<(EvtchnPort, EvtchnPort)>,
        /// Mapped ring pages (handle, address).
        rings: Vec<(GrantHandle, u64)>,
    }

    struct Device {
        name: String,
        fe_state: String,
        last_fe: Option<Option<String>>,
        xb: NetbackXenbus,
        conn: Option<Connected>,
        /// The watch on the frontend's `state` (dropped when the vif is forgotten).
        watch: Option<WatchHandle>,
    }

    struct Backend {
        me: DomId,
        features: BackendFeatures,
        window: MapWindow,
        devices: BTreeMap<String, Device>,
        waiting: BTreeMap<String, ()>,
        dirty: Rc<Cell<bool>>,
        probed: u64,
        switch: Switch,
        uplink: Option<(Uplink, PortId)>,
        /// Switch port → the backend directory of the vif on it.
        port_dirs: BTreeMap<PortId, String>,
        copier: DomCopier,
        /// Scratch: a forward's egress ports; frames forwarded but not yet queued.
        fwd: Vec<PortId>,
        pending: Vec<(PortId, Packet)>,
    }

    fn clear_pending(port: EvtchnPort) {
        let word = port as usize / 64;
        if word >= 64 {
            return;
        }
        // SAFETY: shared_info is mapped RW at SHARED_INFO_VA for the domain's life; the
        // 64-word pending array at 0x800 is 8-byte aligned and accessed only atomically.
        let w = unsafe { &*((SHARED_INFO_VA + 0x800 + word as u64 * 8) as *const AtomicU64) };
        w.fetch_and(!(1u64 << (port % 64)), Ordering::AcqRel);
    }

    fn ip_text(ip: &Option<Vec<[u8; 4]>>) -> String {
        match ip {
            None => "any".to_string(),
            Some(l) => l
                .iter()
                .map(|a| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    impl Backend {
        fn base(&self) -> String {
            format!("/local/domain/{}/backend/vif", self.me)
        }

        fn scan(&mut self, xb: &mut Bus) {
            for dir in xb.backend_devices(&self.base()) {
                if self.devices.contains_key(&dir) {
                    continue;
                }
                // Only a directory the toolstack left Initialising (as Linux's
                // xenbus_probe_node): one a detached vif left Closed waits for the toolstack
                // to remove it, and is never probed again.
                if !backend_ready_to_probe(&mut XenbusStore { xb: &mut *xb }, &dir) {
                    continue;
                }
                // Probe once the frontend directory exists (its state is readable).
                let Some(fe_state) = xb.frontend_state_path(&dir) else {
                    if self.waiting.insert(dir.clone(), ()).is_none() {
                        println!("netback: {dir}: waiting for its frontend");
                    }
                    continue;
                };
                self.waiting.remove(&dir);
                let probed = {
                    let mut s = XenbusStore { xb: &mut *xb };
                    NetbackXenbus::probe(&mut s, &dir, self.features)
                };
                match probed {
                    Ok(dev) => {
                        let dirty = self.dirty.clone();
                        let watch = match xb.watch(&fe_state, move |_| dirty.set(true)) {
                            Ok(w) => Some(w),
                            Err(e) => {
                                println!("netback: {dir}: watch {fe_state}: {e:?}");
                                None
                            }
                        };
                        println!(
                            "netback: {dir}: probed (frontend {}), InitWait",
                            dev.frontend_path()
                        );
                        self.probed += 1;
                        let devid = dir.rsplit('/').next().unwrap_or("?");
                        let name = match frontend_of(&dir) {
                            Some(fe) => format!("vif{fe}.{devid}"),
                            None => dir.clone(),
                        };
                        self.devices.insert(
                            dir,
                            Device {
                                name,
                                fe_state,
                                last_fe: None,
                                xb: dev,
                                conn: None,
                                watch,
                            },
                        );
                    }
                    Err(e) => println!("netback: {dir}: probe failed: {e}"),
                }
            }
        }

        fn unmap_rings(&mut self, rings: &[(GrantHandle, u64)]) {
            for &(h, va) in rings {
                match gnttab::unmap(h, va) {
                    Ok(()) => self.window.release(va),
                    // Leave the address out of use rather than map over a live mapping.
                    Err(e) => println!("netback: unmap of a ring page failed: {e:?}"),
                }
            }
        }

        fn map_page(
            &mut self,
            fe: DomId,
            gref: u32,
            rings: &mut Vec<(GrantHandle, u64)>,
        ) -> Result<shared_abi::ring::SharedRingMem, String> {
            let va = self.window.alloc().ok_or("no grant mapping space")?;
            match gnttab::map(fe, gref, va, false) {
                Ok(h) => rings.push((h, va)),
                Err(e) => {
                    self.window.release(va);
                    return Err(format!("ring-ref {gref}: {e:?}"));
                }
            }
            // SAFETY: the page was just mapped RW from the frontend's grant and stays mapped
            // until `unmap_rings`, which runs only after the engine holding this region is
            // dropped; this domain touches it only through SharedRingMem.
            unsafe { gnttab::ring_mem(va) }.map_err(|e| format!("ring page: {e}"))
        }

        fn bind(
            fe: DomId,
            port: EvtchnPort,
            bound: &mut Vec<EvtchnPort>,
        ) -> Result<EvtchnPort, String> {
            let p = evtchn::bind_interdomain(fe, port)
                .map_err(|e| format!("event channel {port}: {e:?}"))?;
            let _ = evtchn::unmask(p);
            bound.push(p);
            Ok(p)
        }

        fn connect(&mut self, conn: &Connection) -> Result<Connected, String> {
            let fe = conn.frontend_id;
            let mut rings = Vec::new();
            let mut bound = Vec::new();
            let mut ports = Vec::new();
            let mut queues = Vec::new();
            let r: Result<(), String> = (|| {
                for (i, q) in conn.queues.iter().enumerate() {
                    let tx = self.map_page(fe, q.tx_ring_ref, &mut rings)?;
                    let rx = self.map_page(fe, q.rx_ring_ref, &mut rings)?;
                    let p = match q.event {
                        EventChannels::Single(p) => {
                            let l = Self::bind(fe, p, &mut bound)?;
                            (l, l)
                        }
                        EventChannels::Split { tx, rx } => (
                            Self::bind(fe, tx, &mut bound)?,
                            Self::bind(fe, rx, &mut bound)?,
                        ),
                    };
                    ports.push(p);
                    let pool = PagePool::allocate(POOL_PAGES, frame_of)
                        .map_err(|e| format!("pool: {e}"))?;
                    let cfg = queue_config(conn, &self.features, i as u16);
                    queues.push(
                        Queue::new(cfg, tx, rx, pool).map_err(|e| format!("queue {i}: {e}"))?,
                    );
                }
                Ok(())
            })();
            let vif = r.and_then(|()| Vif::new(queues).map_err(|e| format!("vif: {e}")));
            let port = vif.as_ref().map_err(Clone::clone).and_then(|_| {
                self.switch
                    .add_port(PortKind::Vif(vif_policy(conn, time::now_ns())))
                    .map_err(|e| format!("switch: {e}"))
            });
            match (vif, port) {
                (Ok(vif), Ok(port)) => Ok(Connected {
                    vif,
                    port,
                    ports,
                    rings,
                }),
                (Err(e), _) | (_, Err(e)) => {
                    self.unmap_rings(&rings);
                    for p in bound {
                        let _ = evtchn::close(p);
                    }
                    Err(e)
                }
            }
        }

        /// Stop serving `dir`: detach from the switch (printing the port's counters), unmap
        /// every ring page, unbind.
        fn teardown(&mut self, dir: &str) -> bool {
            let Some(dev) = self.devices.get_mut(dir) else {
                return false;
            };
            let Some(c) = dev.conn.take() else {
                return false;
            };
            let name = dev.name.clone();
            let Connected {
                mut vif,
                port,
                ports,
                rings,
            } = c;
            if let Some(cnt) = self.switch.counters(port) {
                println!("{}", counter_line(&name, cnt));
            }
            // With several queues, how the flows spread over them.
            if vif.num_queues() > 1 {
                for q in 0..vif.num_queues() {
                    if let Some(st) = vif.queue(q).map(|q| q.stats()) {
                        println!(
                            "netback: {name} queue {q} tx-packets {} rx-packets {} tx-bytes {} rx-bytes {} rx-drops {} notifies {}",
                            st.tx_packets,
                            st.rx_packets,
                            st.tx_bytes,
                            st.rx_bytes,
                            st.rx_drops_total(),
                            st.notifies
                        );
                    }
                }
            }
            let _ = self.switch.remove_port(port);
            self.port_dirs.remove(&port);
            vif.disconnect(Disconnect::Closed);
            drop(vif);
            self.unmap_rings(&rings);
            let mut closed: Vec<EvtchnPort> = Vec::new();
            for (t, r) in ports {
                for p in [t, r] {
                    if !closed.contains(&p) {
                        let _ = evtchn::close(p);
                        closed.push(p);
                    }
                }
            }
            true
        }

        /// Tear `dir` down and forget it (its frontend watch too); other vifs are not
        /// touched.
        fn forget(&mut self, xb: &mut Bus, dir: &str) {
            self.teardown(dir);
            if let Some(dev) = self.devices.remove(dir)
                && let Some(w) = dev.watch
            {
                let _ = xb.unwatch(w);
            }
        }

        /// Hand frontend state changes to the xenbus logic.
        fn frontends(&mut self, xb: &mut Bus) {
            let dirs: Vec<String> = self.devices.keys().cloned().collect();
            for dir in dirs {
                let Some(dev) = self.devices.get_mut(&dir) else {
                    continue;
                };
                // The toolstack removed the vif (a detach, forced or after a timeout), or
                // wrote it again for a re-attach of the same id: forget the old one (the
                // next scan probes a new one).
                let seen = dev.xb.backend_dir(&mut XenbusStore { xb: &mut *xb });
                if seen != BackendDir::Unchanged {
                    self.forget(xb, &dir);
                    self.dirty.set(true);
                    println!("netback: {dir}: backend directory {seen:?}, vif removed");
                    continue;
                }
                let now = match xb.read_string(Tx::NONE, &dev.fe_state) {
                    Ok(v) => Some(v),
                    // The frontend's home is gone (its domain was released): so is the vif.
                    Err(XenError::EACCES) => {
                        self.forget(xb, &dir);
                        println!("netback: {dir}: frontend domain gone, vif removed");
                        continue;
                    }
                    Err(_) => None,
                };
                if dev.last_fe.as_ref() == Some(&now) {
                    continue;
                }
                dev.last_fe = Some(now);
                let action = {
                    let mut s = XenbusStore { xb: &mut *xb };
                    dev.xb.frontend_changed(&mut s)
                };
                match action {
                    Ok(Action::None) => {}
                    Ok(Action::Connect(conn)) => self.on_connect(xb, &dir, &conn),
                    Ok(Action::Disconnect) => {
                        if self.teardown(&dir) {
                            println!("netback: {dir}: frontend closing, disconnected");
                        }
                    }
                    Ok(a @ (Action::Close | Action::Remove)) => {
                        // Unmapped first, then Closed: the frontend ends its grants on it.
                        self.teardown(&dir);
                        if let Some(dev) = self.devices.get_mut(&dir) {
                            let mut s = XenbusStore { xb: &mut *xb };
                            if let Err(e) = dev.xb.disconnected(&mut s) {
                                println!("netback: {dir}: {e}");
                            }
                        }
                        if a == Action::Remove {
                            self.forget(xb, &dir);
                            println!("netback: {dir}: frontend closed or gone, vif removed");
                        } else {
                            println!("netback: {dir}: frontend closed");
                        }
                    }
                    Err(e) => println!("netback: {dir}: {e}"),
                }
            }
        }

        fn on_connect(&mut self, xb: &mut Bus, dir: &str, conn: &Connection) {
            match self.connect(conn) {
                Ok(c) => {
                    let nq = c.vif.num_queues();
                    let port = c.port;
                    let Some(dev) = self.devices.get_mut(dir) else {
                        return;
                    };
                    dev.conn = Some(c);
                    self.port_dirs.insert(port, dir.to_string());
                    let mut s = XenbusStore { xb: &mut *xb };
                    match dev.xb.connected(&mut s) {
                        Ok(()) => println!(
                            "netback: {dir}: {} connected: mac {} ip {} rate {} {} queue(s){}",
                            dev.name,
                            conn.mac,
                            ip_text(&conn.ipv4),
                            conn.rate
                                .map_or("none".to_string(), |(b, u)| format!("{b},{u}")),
                            nq,
                            if conn.sg { ", sg" } else { "" }
                        ),
                        Err(e) => {
                            println!("netback: {dir}: connect: {e}");
                            self.teardown(dir);
                        }
                    }
                }
                Err(why) => {
                    println!("netback: {dir}: cannot connect: {why}");
                    let e = XenbusError::invalid(
                        path(dir, "frontend"),
                        &why,
                        "rings and event channels this backend can map and bind",
                    );
                    if let Some(dev) = self.devices.get_mut(dir) {
                        let mut s = XenbusStore { xb: &mut *xb };
                        let _ = dev.xb.fail(&mut s, &e);
                    }
                }
            }
        }

        /// Frames forwarded from `ingress` (accepted by the switch) go to `pending`.
        fn forward(
            switch: &mut Switch,
            fwd: &mut Vec<PortId>,
            pending: &mut Vec<(PortId, Packet)>,
            ingress: PortId,
            pkt: Packet,
            now: u64,
        ) -> bool {
            if switch.forward(ingress, &pkt.data, now, fwd).is_err() {
                return false;
            }
            if let Some((&last, rest)) = fwd.split_last() {
                for &to in rest {
                    pending.push((to, pkt.clone()));
                }
                pending.push((last, pkt));
            }
            true
        }

        /// One pass over everything: tx rings and the uplink into the switch, the switch's
        /// output onto the rx backlogs and the uplink, the backlogs into the frontends'
        /// buffers. Whether work was left over (call again before blocking).
        fn serve(&mut self, xb: &mut Bus) -> bool {
            let now = time::now_ns();
            let mut more = false;
            let mut broken: Vec<(String, Disconnect)> = Vec::new();
            for (dir, dev) in &mut self.devices {
                let Some(c) = &mut dev.conn else {
                    continue;
                };
                for q in 0..c.vif.num_queues() {
                    let (sw, fwd, pending, port) =
                        (&mut self.switch, &mut self.fwd, &mut self.pending, c.port);
                    match c
                        .vif
                        .process_tx(q, &mut self.copier, &mut Ports(&c.ports), |pkt| {
                            Self::forward(sw, fwd, pending, port, pkt, now)
                        }) {
                        Ok(s) => more |= s.more,
                        Err(d) => {
                            broken.push((dir.clone(), d));
                            break;
                        }
                    }
                }
            }
            if let Some((u, port)) = &mut self.uplink {
                u.flush();
                for _ in 0..UPLINK_BUDGET {
                    let Some(frame) = u.receive() else {
                        break;
                    };
                    Self::forward(
                        &mut self.switch,
                        &mut self.fwd,
                        &mut self.pending,
                        *port,
                        Packet::new(frame),
                        now,
                    );
                }
                more |= u.net.poll_receive().is_some();
            }
            for (to, pkt) in core::mem::take(&mut self.pending) {
                let queued = match &mut self.uplink {
                    Some((u, port)) if *port == to => match uplink_admits(&pkt) {
                        Ok(()) => {
                            let mut data = pkt.data;
                            // No checksum offload on the uplink: finish what the sender
                            // left blank.
                            if pkt.offload.checksum == Checksum::Partial
                                && complete_checksum(&mut data)
                            {
                                u.csum_completed += 1;
                            }
                            u.send(data)
                        }
                        Err(r) => {
                            match r {
                                UplinkRefusal::Gso => u.refused_gso += 1,
                                UplinkRefusal::Oversize => u.refused_oversize += 1,
                            }
                            false
                        }
                    },
                    _ => self
                        .port_dirs
                        .get(&to)
                        .and_then(|d| self.devices.get_mut(d))
                        .and_then(|d| d.conn.as_mut())
                        .is_some_and(|c| c.vif.enqueue_rx(pkt)),
                };
                if !queued {
                    if let Some((u, port)) = &mut self.uplink
                        && *port == to
                    {
                        u.tx_dropped += 1;
                    }
                    self.switch.note_egress_drop(to);
                }
            }
            for (dir, dev) in &mut self.devices {
                let Some(c) = &mut dev.conn else {
                    continue;
                };
                if broken.iter().any(|(d, _)| d == dir) {
                    continue;
                }
                for q in 0..c.vif.num_queues() {
                    match c.vif.deliver_rx(q, &mut self.copier, &mut Ports(&c.ports)) {
                        Ok(s) => more |= s.more,
                        Err(d) => {
                            broken.push((dir.clone(), d));
                            break;
                        }
                    }
                }
            }
            for (dir, d) in broken {
                println!("netback: {dir}: {d}; disconnecting this vif");
                self.teardown(&dir);
                if let Some(dev) = self.devices.get_mut(&dir) {
                    let mut s = XenbusStore { xb: &mut *xb };
                    let _ = dev.xb.close(&mut s);
                }
            }
            more
        }

        fn ports(&self) -> Vec<EvtchnPort> {
            let mut out: Vec<EvtchnPort> = Vec::new();
            for c in self.devices.values().filter_map(|d| d.conn.as_ref()) {
                for &(t, r) in &c.ports {
                    out.push(t);
                    if r != t {
                        out.push(r);
                    }
                }
            }
            if let Some(i) = self.uplink.as_ref().and_then(|(u, _)| u.irq.as_ref()) {
                out.push(i.port());
            }
            out
        }

        /// Some vif was probed, and every vif is closed or gone.
        fn idle(&self) -> bool {
            self.probed > 0
                && self
                    .devices
                    .values()
                    .all(|d| d.conn.is_none() && d.xb.state() == XenbusState::Closed)
        }

        fn print_counters(&self) {
            if let Some((u, port)) = &self.uplink {
                if let Some(c) = self.switch.counters(*port) {
                    println!("{}", counter_line("uplink", c));
                }
                println!(
                    "netback: uplink device rx {} tx {} tx-dropped {} tx-backlog {} refused-gso {} refused-oversize {} csum-completed {}",
                    u.rx_frames,
                    u.tx_frames,
                    u.tx_dropped,
                    u.tx_backlog.len(),
                    u.refused_gso,
                    u.refused_oversize,
                    u.csum_completed
                );
            }
            for d in self.devices.values() {
                if let Some(c) = d.conn.as_ref()
                    && let Some(cnt) = self.switch.counters(c.port)
                {
                    println!("{}", counter_line(&d.name, cnt));
                }
            }
        }
    }

    /// Self-layout mode: write the backend directory of a vif (as a toolstack would).
    fn write_backend_dir(
        xb: &mut Bus,
        me: DomId,
        e: &netback_dom::config::ServeEntry,
    ) -> Result<(), XenError> {
        let (fe, devid) = (e.frontend, e.devid);
        let dir = format!("/local/domain/{me}/backend/vif/{fe}/{devid}");
        let fe_dir = format!("/local/domain/{fe}/device/vif/{devid}");
        let fe_id = fe.to_string();
        let handle = devid.to_string();
        let mac = e.mac.to_string();
        let ip = e.ip.map(|a| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]));
        // One transaction: the frontend sees the whole directory or none of it.
        xb.transaction(dom_rt::xenbus::TRANSACTION_TRIES, |xb, tx| {
            xb.mkdir(tx, &dir)?;
            xb.set_perms(tx, &dir, &[&format!("n{me}"), &format!("r{fe}")])?;
            for (k, v) in [
                ("frontend", fe_dir.as_str()),
                ("frontend-id", &fe_id),
                ("online", "1"),
                ("state", "1"),
                ("handle", &handle),
                ("mac", &mac),
                ("type", "vif"),
            ] {
                xb.write(tx, &path(&dir, k), v.as_bytes())?;
            }
            if let Some(ip) = &ip {
                xb.write(tx, &path(&dir, "ip"), ip.as_bytes())?;
            }
            Ok(())
        })
    }

    fn param_ms(cmdline: &str, key: &str) -> Option<u64> {
        dom_rt::cmdline_param(cmdline, key)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| ms.saturating_mul(MS))
    }

    pub fn main(si: &'static StartInfo) {
        let cmdline = si.cmdline();
        let exit_when_idle = cmdline.split_whitespace().any(|w| w == "exit_when_idle");
        let exit_after = param_ms(cmdline, "exit_after_ms");
        let stats_every = param_ms(cmdline, "stats_every_ms").filter(|&n| n > 0);
        let Some(mut xb) = dom_rt::xenbus::connect_own_store(si) else {
            println!("netback: no usable xenstore connection in the start info");
            return;
        };
        let xs_port = si.xenstore_evtchn;
        let me = si.domid;
        let start = time::now_ns();
        if let Some(list) = dom_rt::cmdline_param(cmdline, "serve") {
            match parse_serve(list) {
                Ok(entries) => {
                    for e in &entries {
                        if let Err(err) = write_backend_dir(&mut xb, me, e) {
                            println!(
                                "netback: writing the backend dir of vif {}/{}: {err:?}",
                                e.frontend, e.devid
                            );
                        }
                    }
                }
                Err(e) => println!("netback: {e}; serving only toolstack-written vifs"),
            }
        }
        let mut switch = Switch::new(SwitchConfig::default());
        let uplink = match dom_rt::cmdline_param(cmdline, "uplink") {
            Some("virtio") => match Uplink::open() {
                Ok(u) => match switch.add_port(PortKind::Uplink) {
                    Ok(p) => {
                        println!(
                            "netback: uplink virtio-net mac {} ({})",
                            u.mac(),
                            if u.irq.is_some() {
                                "MSI-X interrupts"
                            } else {
                                "polled"
                            }
                        );
                        Some((u, p))
                    }
                    Err(e) => {
                        println!("netback: uplink: switch: {e}");
                        None
                    }
                },
                Err(e) => {
                    println!("netback: uplink=virtio: {e}; switching the vifs only");
                    None
                }
            },
            Some(other) => {
                println!("netback: uplink={other}: unknown (only virtio); switching the vifs only");
                None
            }
            None => None,
        };
        let features = if uplink.is_some() {
            // The uplink cannot segment: have frontends send MTU-sized frames.
            BackendFeatures {
                gso_tcpv4: false,
                gso_tcpv6: false,
                ..BackendFeatures::default()
            }
        } else {
            BackendFeatures::default()
        };
        let polled = uplink.as_ref().is_some_and(|(u, _)| u.irq.is_none());
        let mut b = Backend {
            me,
            features,
            window: MapWindow::new(),
            devices: BTreeMap::new(),
            waiting: BTreeMap::new(),
            dirty: Rc::new(Cell::new(true)),
            probed: 0,
            switch,
            uplink,
            port_dirs: BTreeMap::new(),
            copier: DomCopier,
            fwd: Vec::new(),
            pending: Vec::new(),
        };
        let dirty = b.dirty.clone();
        if let Err(e) = xb.watch(&b.base(), move |_| dirty.set(true)) {
            println!("netback: watch {}: {e:?}", b.base());
        }
        println!(
            "netback: domain {me} switch up: vifs under {}, uplink {}",
            b.base(),
            if b.uplink.is_some() { "virtio" } else { "none" }
        );
        let mut next_rescan = 0;
        let mut next_stats = stats_every.map(|n| start + n);
        let mut woken: Vec<EvtchnPort> = Vec::new();
        loop {
            // Clear what woke us before looking, so an event during the pass is not lost.
            for p in woken.drain(..) {
                clear_pending(p);
            }
            let _ = xb.poll();
            xb.dispatch();
            let now = time::now_ns();
            if b.dirty.replace(false) || now >= next_rescan {
                next_rescan = now + RESCAN_NS;
                b.scan(&mut xb);
                b.frontends(&mut xb);
            }
            let more = b.serve(&mut xb);
            if exit_when_idle && b.idle() {
                b.print_counters();
                println!("netback: every vif closed; exiting");
                return;
            }
            if exit_after.is_some_and(|n| now >= start + n) {
                b.print_counters();
                println!("netback: exit_after_ms reached; exiting");
                return;
            }
            if let Some(at) = next_stats
                && now >= at
            {
                b.print_counters();
                next_stats = stats_every.map(|n| now + n);
            }
            let mut ports = b.ports();
            ports.push(xs_port);
            let wait = if more {
                0
            } else if polled {
                UPLINK_POLL_NS
            } else {
                POLL_NS
            };
            if wait > 0 {
                let _ = hypercall::sched_poll(&ports, time::now_ns() + wait);
            }
            woken = ports;
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
fn main() {
    eprintln!("netback-domain is a Bulkhead domain: build it with --target x86_64-unknown-none");
    std::process::exit(2);
}
