//! `xenstore-domain`: the xenstore service domain (a Bulkhead PV domain on dom-rt).
//!
//! It maps nothing of its own accord: every domain built after it offers it, through the
//! hypervisor's builder, its ring page as grant ref 1 (`GNTTAB_RESERVED_XENSTORE`) and an
//! unbound event-channel port (`StartInfo::xenstore_evtchn`). The loop:
//!
//! 1. list the domains with `domctl XENSTORE_DOMAINS` ([`dom_rt::xs_service`]); for each live
//!    one with a port that is not served yet: grant-map its ref 1 into the grant window,
//!    `bind_interdomain` its port, create its home `/local/domain/<id>` owned by it (as a Xen
//!    toolstack does), and attach the page to the [`RingServer`];
//! 2. block until a port fires; serve the domain behind it, signal every domain the server
//!    says to; on `VIRQ_DOM_EXC` list again and release (in the engine: `@releaseDomain`,
//!    its nodes go) every served domain that is no longer alive, then unbind and unmap;
//! 3. `XS_INTRODUCE` from a privileged client attaches that domain the same way (its port
//!    from the request); `XS_RELEASE` detaches it.
//!
//! A domain that corrupts its ring is dropped by the [`RingServer`] (its `error` field says
//! why) and may reconnect; the others are not affected. With `exit_when_alone` on the
//! command line the domain powers off once no other domain is alive (test systems that
//! must end).
//!
//! On the host this binary is a stub: the host daemon is `xenstore-dom --socket PATH`.
#![cfg_attr(all(target_arch = "x86_64", target_os = "none"), no_std, no_main)]

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
dom_rt::entry!(domain::main);

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
extern crate alloc;

#[cfg(all(target_arch = "x86_64", target_os = "none"))]
mod domain {
    use alloc::collections::{BTreeMap, BTreeSet};
    use alloc::format;
    use alloc::vec::Vec;

    use dom_rt::event::Waiter;
    use dom_rt::gnttab::{self, MapWindow};
    use dom_rt::{StartInfo, XenError, evtchn, println, xs_service};
    use shared_abi::DomId;
    use shared_abi::event_channel::{EvtchnPort, virq};
    use shared_abi::grant_table::{GrantHandle, RESERVED_XENSTORE};
    use shared_abi::hypercall_args::domctl::state;
    use shared_abi::ring::SharedRingMem;
    use shared_abi::xenstore::{Header, Message, MsgType};
    use xenstore_dom::ring::{RingConfig, RingServer, Serviced};
    use xenstore_dom::{Config, ConnId, Effect, Engine};

    /// One served domain: where its page is mapped and our end of its channel.
    struct Client {
        port: EvtchnPort,
        va: u64,
        handle: GrantHandle,
    }

    struct Server {
        me: DomId,
        rs: RingServer<SharedRingMem>,
        clients: BTreeMap<DomId, Client>,
        by_port: BTreeMap<EvtchnPort, DomId>,
        window: MapWindow,
        /// Domains whose requests were cut short by the per-call budget.
        again: BTreeSet<DomId>,
        /// The service domain's own privileged connection (homes of new domains).
        local: ConnId,
    }

    fn alive(s: u32) -> bool {
        matches!(s, state::BUILDING | state::RUNNING | state::PAUSED)
    }

    impl Server {
        /// Serve `domid` over its ref-1 page and `remote_port`.
        fn connect(&mut self, domid: DomId, remote_port: u32) -> Result<(), XenError> {
            if self.clients.contains_key(&domid) || domid == self.me {
                return Ok(());
            }
            let va = self.window.alloc().ok_or(XenError::ENOMEM)?;
            let handle = match gnttab::map(domid, RESERVED_XENSTORE, va, false) {
                Ok(h) => h,
                Err(e) => {
                    self.window.release(va);
                    println!("xenstored: domain {domid}: map of its ring refused: {e:?}");
                    return Err(XenError::EINVAL);
                }
            };
            let port = match evtchn::bind_interdomain(domid, remote_port) {
                Ok(p) => p,
                Err(e) => {
                    let _ = gnttab::unmap(handle, va);
                    self.window.release(va);
                    return Err(e);
                }
            };
            // SAFETY: `va` is a grant-window page we just mapped writable; it stays mapped
            // until `disconnect` unmaps it after detaching (and dropping) this handle.
            let mem = match unsafe { gnttab::ring_mem(va) } {
                Ok(m) => m,
                Err(_) => {
                    let _ = evtchn::close(port);
                    let _ = gnttab::unmap(handle, va);
                    self.window.release(va);
                    return Err(XenError::EINVAL);
                }
            };
            self.make_home(domid);
            self.clients.insert(domid, Client { port, va, handle });
            self.by_port.insert(port, domid);
            match self.rs.attach(domid, mem) {
                Ok((_, sv)) => {
                    println!("xenstored: serving domain {domid} (port {port})");
                    self.act(sv);
                    Ok(())
                }
                Err(_) => {
                    self.disconnect(domid);
                    Err(XenError::EINVAL)
                }
            }
        }

        /// Stop serving `domid`: detach, unbind, unmap.
        fn disconnect(&mut self, domid: DomId) {
            drop(self.rs.detach(domid));
            if let Some(c) = self.clients.remove(&domid) {
                self.by_port.remove(&c.port);
                let _ = evtchn::close(c.port);
                match gnttab::unmap(c.handle, c.va) {
                    Ok(()) => self.window.release(c.va),
                    // Never reuse an address whose mapping may still be there.
                    Err(e) => println!("xenstored: domain {domid}: unmap failed: {e:?}"),
                }
                println!("xenstored: domain {domid} released");
            }
        }

        /// `/local/domain/<id>`, owned by the domain (what a Xen toolstack writes).
        fn make_home(&mut self, domid: DomId) {
            let home = format!("/local/domain/{domid}");
            let mut mkdir = Vec::from(home.as_bytes());
            mkdir.push(0);
            let mut perms = mkdir.clone();
            perms.extend_from_slice(format!("n{domid}").as_bytes());
            perms.push(0);
            for (ty, payload) in [(MsgType::Mkdir, mkdir), (MsgType::SetPerms, perms)] {
                let msg = Message {
                    header: Header {
                        msg_type: ty.as_u32(),
                        req_id: 0,
                        tx_id: 0,
                        len: payload.len() as u32,
                    },
                    payload,
                };
                let out = self.rs.engine_mut().handle(self.local, &msg);
                let mut sv = Serviced::default();
                // Replies to our own connection have no ring; watch events go out.
                self.rs.route(out, &mut sv);
                self.act(sv);
            }
        }

        /// Carry out what a server call asks for.
        fn act(&mut self, sv: Serviced) {
            for d in &sv.notify {
                if let Some(c) = self.clients.get(d) {
                    let _ = evtchn::send(c.port);
                }
            }
            for e in sv.effects {
                match e {
                    Effect::Introduce { domid, port, .. } => {
                        if let Err(e) = self.connect(domid, port) {
                            println!("xenstored: introduce of domain {domid} failed: {e:?}");
                        }
                    }
                    Effect::Release { domid } => self.disconnect(domid),
                    Effect::Log(line) => println!("xenstored: {line}"),
                    Effect::Close(_) => {}
                }
            }
        }

        fn service(&mut self, domid: DomId) {
            let sv = self.rs.service(domid);
            if sv.again {
                self.again.insert(domid);
            }
            self.act(sv);
        }

        /// List the domains: serve new ones, release the dead. Whether any other is alive.
        fn rescan(&mut self) -> bool {
            let list = match xs_service::xenstore_domains() {
                Ok(l) => l,
                Err(e) => {
                    println!("xenstored: cannot list domains: {e:?}");
                    return true;
                }
            };
            let mut any_alive = false;
            let mut live = BTreeSet::new();
            for r in &list {
                if alive(r.state) {
                    any_alive = true;
                    live.insert(r.domid);
                    if r.port != 0
                        && !self.clients.contains_key(&r.domid)
                        && let Err(e) = self.connect(r.domid, r.port)
                    {
                        println!("xenstored: domain {}: cannot serve: {e:?}", r.domid);
                    }
                }
            }
            let dead: Vec<DomId> = self
                .clients
                .keys()
                .copied()
                .filter(|d| !live.contains(d))
                .collect();
            for d in dead {
                let out = self.rs.engine_mut().release_domain(d);
                let mut sv = Serviced::default();
                self.rs.route(out, &mut sv);
                self.act(sv);
                // Not introduced through the engine (e.g. never connected): still unmap.
                self.disconnect(d);
            }
            any_alive
        }
    }

    pub fn main(si: &'static StartInfo) {
        let exit_when_alone = si
            .cmdline()
            .split_whitespace()
            .any(|w| w == "exit_when_alone");
        // `priv_domid=<id>`: that domain is privileged too (Xen's `--priv-domid`), e.g. the
        // control domain writing boot domains' device entries.
        let priv_domid = si.cmdline().split_whitespace().find_map(|w| {
            w.strip_prefix("priv_domid=")
                .and_then(|v| v.parse::<DomId>().ok())
        });
        let mut engine = Engine::new(Config {
            priv_domid,
            ..Config::default()
        });
        let local = engine.connect_socket();
        let mut s = Server {
            me: si.domid,
            rs: RingServer::new(engine, RingConfig::default()),
            clients: BTreeMap::new(),
            by_port: BTreeMap::new(),
            window: MapWindow::new(),
            again: BTreeSet::new(),
            local,
        };
        let dom_exc = match evtchn::bind_virq(virq::DOM_EXC, 0) {
            Ok(p) => Some(p),
            Err(e) => {
                println!("xenstored: no VIRQ_DOM_EXC ({e:?}): dead domains stay until released");
                None
            }
        };
        // VIRQ_DOM_EXC is bound first, so a death after this listing still wakes us.
        let others = s.rescan();
        println!("xenstored: ready, serving {} domain(s)", s.clients.len());
        if !others && exit_when_alone {
            println!("xenstored: no other domain is alive; powering off");
            return;
        }
        let mut waiter = Waiter::new();
        loop {
            waiter.collect();
            if let Some(p) = dom_exc
                && waiter.take(p)
                && !s.rescan()
                && exit_when_alone
            {
                println!("xenstored: no other domain is alive; powering off");
                return;
            }
            let fired: Vec<(EvtchnPort, DomId)> = s
                .by_port
                .iter()
                .map(|(&p, &d)| (p, d))
                .filter(|&(p, _)| waiter.take(p))
                .collect();
            let again = core::mem::take(&mut s.again);
            let mut todo: BTreeSet<DomId> = fired.into_iter().map(|(_, d)| d).collect();
            todo.extend(again);
            for d in todo {
                s.service(d);
            }
            if s.again.is_empty() && dom_rt::hypercall::sched_block().is_err() {
                // Blocking refused: yield instead of spinning hard.
                let _ = dom_rt::hypercall::sched_yield();
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "none")))]
fn main() {
    eprintln!(
        "xenstore-domain is a Bulkhead domain: build it with --target x86_64-unknown-none; \
         on the host run `xenstore-dom --socket PATH`"
    );
    std::process::exit(2);
}
