//! The netif backend engine: one [`Queue`] per tx/rx ring pair of a vif, and the [`Vif`] that
//! holds a frontend's queues and spreads received frames over them by flow.
//!
//! **TX** (frontend → backend): each pass reads requests off the tx ring, parses each packet
//! (first slot, extra-info slots, `more_data` fragments), validates every slot, copies the
//! valid packets' fragments into the local [`PagePool`] with one batched grant copy per pool
//! fill, hands each built [`Packet`] to the caller's sink, and answers **every consumed
//! request with exactly one response**: `OKAY`, `DROPPED` (the sink refused it), `ERROR`
//! (invalid, or a copy failed), `NULL` for extra-info slots. Responses are published once per
//! pass, with at most one notification.
//!
//! **RX** (backend → frontend): frames queued on the queue's bounded backlog are copied into
//! buffers the frontend posted (one page per slot, several slots with `feature-sg`), with the
//! GSO extra-info in the slot after the first response. The response for a buffer goes in the
//! slot of the request that posted it (the ring's responses follow consumed requests in
//! order). A frame waits while too few buffers are posted.
//!
//! **Blame.** A bad packet is the frontend's fault but only costs it that packet (answered
//! `ERROR`, counted by reason). A frontend that corrupts its ring indices, or publishes a
//! packet whose slot chain runs past its own producer index, has broken the protocol: the
//! queue enters [`QueueState::Disconnected`] and refuses all further work (Linux netback does
//! the same for both).
//!
//! Invariants: copy elements never cross a 4 KiB boundary on either side; the local side is
//! always a pool frame (`DOMID_SELF`), the remote side a frontend grant ref ≥ 8; nothing read
//! from a ring is used before it is copied out and checked. Single-threaded per queue.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::ops::Range;

use shared_abi::DomId;
use shared_abi::PAGE_SIZE;
use shared_abi::domid::DOMID_SELF;
use shared_abi::grant_table::{
    GntStatus, GnttabCopy, GnttabCopyPtr, GrantRef, NR_RESERVED_ENTRIES, gntcopy,
};
use shared_abi::netif::{
    GsoInfo, NetifExtraInfo, NetifRxRequest, NetifRxResponse, NetifTxRequest, NetifTxResponse,
    XEN_NETIF_EXTRA_FLAG_MORE, XEN_NETIF_MAX_TX_SIZE, XEN_NETIF_NR_SLOTS_MIN, extra_type, gso_type,
    netrxf, nettxf, rsp,
};
use shared_abi::ring::{BackRing, RingError, SharedRingMem};

use crate::grant::{GrantCopier, PagePool, PoolError};
use crate::packet::{Checksum, ETH_HLEN, Gso, GsoKind, MacAddr, Offload, Packet, flow_hash};

/// Pages a queue's pool needs at least: one maximal (64 KiB) packet.
pub const MIN_POOL_PAGES: usize = XEN_NETIF_MAX_TX_SIZE.div_ceil(PAGE_SIZE);
/// Most extra-info slots after one tx request (one per defined type).
pub const MAX_TX_EXTRAS: usize = (extra_type::MAX - 1) as usize;
/// Most multicast addresses a frontend may subscribe (Linux's `XEN_NETBK_MCAST_MAX`).
pub const MAX_MCAST: usize = 64;
/// Most queues a vif may have.
pub const MAX_QUEUES: usize = 16;

/// Which ring of a queue an event concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingKind {
    Tx,
    Rx,
}

/// The event-channel seam: tell the frontend that a queue's ring has new responses. With one
/// event channel per queue both kinds go to the same port.
pub trait Notify {
    fn notify(&mut self, queue: u16, ring: RingKind);
}

/// What one queue accepts and offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// The frontend domain (owner of every grant ref on the rings).
    pub frontend: DomId,
    /// This queue's index within its vif.
    pub index: u16,
    /// GSO kinds the backend advertised and so accepts on tx.
    pub tx_gso_tcpv4: bool,
    pub tx_gso_tcpv6: bool,
    /// The backend offers multicast control (mcast add/del extras).
    pub multicast_control: bool,
    /// Most data slots per tx packet (≥ `XEN_NETIF_NR_SLOTS_MIN`).
    pub max_tx_slots: usize,
    /// The vif's MTU: a non-GSO tx frame may be at most MTU + 18 bytes (Ethernet header and
    /// one VLAN tag).
    pub mtu: usize,
    /// The frontend accepts multi-slot rx packets (`feature-sg`).
    pub rx_sg: bool,
    /// GSO kinds the frontend accepts on rx (`feature-gso-tcpv4/6`).
    pub rx_gso_tcpv4: bool,
    pub rx_gso_tcpv6: bool,
    /// Most tx packets per [`Queue::process_tx`] call (fairness between queues).
    pub tx_budget: usize,
    /// Most rx packets per [`Queue::deliver_rx`] call.
    pub rx_budget: usize,
    /// Most frames waiting for rx buffers.
    pub rx_backlog: usize,
}

impl QueueConfig {
    /// Defaults for queue `index` of a vif of `frontend`: sg, both GSO kinds, MTU 1500.
    pub fn new(frontend: DomId, index: u16) -> Self {
        QueueConfig {
            frontend,
            index,
            tx_gso_tcpv4: true,
            tx_gso_tcpv6: true,
            multicast_control: false,
            max_tx_slots: XEN_NETIF_NR_SLOTS_MIN,
            mtu: 1500,
            rx_sg: true,
            rx_gso_tcpv4: true,
            rx_gso_tcpv6: true,
            tx_budget: 64,
            rx_budget: 64,
            rx_backlog: 256,
        }
    }
}

/// Why a tx packet was refused (answered `ERROR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxFault {
    /// Undefined flag bits, or `extra_info` on a fragment slot.
    BadFlags,
    /// Total size below an Ethernet header.
    TooShort,
    /// More data slots than the limit.
    TooManySlots,
    /// The fragments add up to more than the first slot's total size.
    FragExceedsPacket,
    /// A fragment's offset + size runs past its 4 KiB page.
    CrossesPage,
    /// A grant ref below 8 (reserved for the toolstack's console/xenstore pages).
    ReservedGref,
    /// A non-GSO frame larger than the MTU allows.
    Oversize,
    /// An extra-info slot of unknown type, bad flags, a zero MSS, or a repeated type.
    BadExtra,
    /// More extra-info slots than there are types.
    TooManyExtras,
    /// A GSO kind the backend did not offer.
    GsoUnsupported,
    /// A multicast add/del without multicast control, or the filter is full.
    McastRefused,
    /// A grant copy failed (`GNTST_*` other than okay).
    GrantCopy,
}

impl TxFault {
    pub const ALL: [TxFault; 12] = [
        TxFault::BadFlags,
        TxFault::TooShort,
        TxFault::TooManySlots,
        TxFault::FragExceedsPacket,
        TxFault::CrossesPage,
        TxFault::ReservedGref,
        TxFault::Oversize,
        TxFault::BadExtra,
        TxFault::TooManyExtras,
        TxFault::GsoUnsupported,
        TxFault::McastRefused,
        TxFault::GrantCopy,
    ];
}

/// Why an rx frame was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RxDrop {
    /// Empty frame.
    Empty,
    /// Larger than 64 KiB − 1.
    TooBig,
    /// Larger than a page and the frontend has no `feature-sg`.
    NeedsSg,
    /// A GSO frame of a kind the frontend does not accept.
    GsoUnsupported,
    /// The frontend posted a buffer with a reserved grant ref.
    ReservedGref,
    /// A grant copy into a posted buffer failed.
    GrantCopy,
    /// The backlog was full.
    BacklogFull,
}

impl RxDrop {
    pub const ALL: [RxDrop; 7] = [
        RxDrop::Empty,
        RxDrop::TooBig,
        RxDrop::NeedsSg,
        RxDrop::GsoUnsupported,
        RxDrop::ReservedGref,
        RxDrop::GrantCopy,
        RxDrop::BacklogFull,
    ];
}

/// Why a queue stopped serving its frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Disconnect {
    #[error("frontend corrupted the {ring:?} ring: {err}")]
    RingIndex { ring: RingKind, err: RingError },
    #[error("frontend published a tx packet whose slot chain runs past its request producer")]
    TruncatedChain,
    #[error("backend closed the queue")]
    Closed,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Whether a queue still serves its frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueState {
    Connected,
    Disconnected(Disconnect),
}

/// Errors building a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("ring: {0}")]
    Ring(RingError),
    #[error("pool: {0}")]
    Pool(PoolError),
    #[error("max_tx_slots {got} is below the protocol minimum {min}")]
    SlotLimit { got: usize, min: usize },
    #[error("a vif needs 1..={max} queues, got {got}")]
    QueueCount { got: usize, max: usize },
}

/// Counters of one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Packets built from tx slots and handed to the sink (accepted or not).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Tx requests consumed (all slot kinds).
    pub tx_slots: u64,
    /// Packets the sink refused (answered `DROPPED`).
    pub tx_dropped: u64,
    /// Multicast filter updates applied.
    pub tx_mcast_ops: u64,
    tx_faults: [u64; TxFault::ALL.len()],
    /// Frames delivered into posted buffers.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Rx requests consumed.
    pub rx_slots: u64,
    rx_drops: [u64; RxDrop::ALL.len()],
    /// Grant-copy batches issued.
    pub copy_batches: u64,
    /// Notifications sent.
    pub notifies: u64,
}

impl QueueStats {
    pub fn tx_fault(&self, f: TxFault) -> u64 {
        self.tx_faults[f as usize]
    }
    pub fn tx_faults_total(&self) -> u64 {
        self.tx_faults.iter().sum()
    }
    pub fn rx_drop(&self, d: RxDrop) -> u64 {
        self.rx_drops[d as usize]
    }
    pub fn rx_drops_total(&self) -> u64 {
        self.rx_drops.iter().sum()
    }
}

/// What one call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassSummary {
    /// Packets processed (tx: built or refused; rx: delivered or dropped at delivery).
    pub packets: usize,
    /// The budget ran out with work left: call again.
    pub more: bool,
    /// Rx only: a frame waits for the frontend to post buffers.
    pub stalled: bool,
}

#[derive(Clone, Copy, Debug)]
struct TxSlot {
    id: u16,
    extra: bool,
}

#[derive(Clone, Copy, Debug)]
enum TxOutcome {
    Fault(TxFault),
    Mcast,
    Data,
}

#[derive(Clone, Debug)]
struct TxPending {
    slots: Range<usize>,
    ops: Range<usize>,
    arena: Range<usize>,
    offload: Offload,
    outcome: TxOutcome,
}

#[derive(Clone, Debug)]
struct RxPending {
    slots: Range<usize>,
    ops: Range<usize>,
    len: usize,
    data_slots: usize,
    offload: Offload,
    fault: Option<RxDrop>,
}

/// One queue: a tx ring, an rx ring, a pool of local pages, a backlog of frames for the
/// frontend.
pub struct Queue {
    cfg: QueueConfig,
    tx: BackRing<NetifTxRequest, NetifTxResponse>,
    rx: BackRing<NetifRxRequest, NetifRxResponse>,
    pool: PagePool,
    state: QueueState,
    stats: QueueStats,
    backlog: VecDeque<Packet>,
    mcast: Vec<MacAddr>,
    // Scratch, reused across passes so the hot path does not allocate per packet.
    ops: Vec<GnttabCopy>,
    tx_slots: Vec<TxSlot>,
    tx_batch: Vec<TxPending>,
    frags: Vec<NetifTxRequest>,
    rx_ids: Vec<u16>,
    rx_batch: Vec<RxPending>,
}

impl core::fmt::Debug for Queue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Queue")
            .field("index", &self.cfg.index)
            .field("state", &self.state)
            .field("backlog", &self.backlog.len())
            .finish()
    }
}

fn set_fault(slot: &mut Option<TxFault>, f: TxFault) {
    if slot.is_none() {
        *slot = Some(f);
    }
}

fn reserved(gref: GrantRef) -> bool {
    gref < NR_RESERVED_ENTRIES
}

impl Queue {
    /// A queue over the frontend's tx and rx ring pages (already mapped) and a pool of at
    /// least [`MIN_POOL_PAGES`] local pages.
    pub fn new(
        cfg: QueueConfig,
        tx_mem: SharedRingMem,
        rx_mem: SharedRingMem,
        pool: PagePool,
    ) -> Result<Self, QueueError> {
        if pool.pages() < MIN_POOL_PAGES {
            return Err(QueueError::Pool(PoolError::TooSmall {
                min: MIN_POOL_PAGES,
                got: pool.pages(),
            }));
        }
        if cfg.max_tx_slots < XEN_NETIF_NR_SLOTS_MIN {
            return Err(QueueError::SlotLimit {
                got: cfg.max_tx_slots,
                min: XEN_NETIF_NR_SLOTS_MIN,
            });
        }
        Ok(Queue {
            tx: BackRing::new(tx_mem).map_err(QueueError::Ring)?,
            rx: BackRing::new(rx_mem).map_err(QueueError::Ring)?,
            cfg,
            pool,
            state: QueueState::Connected,
            stats: QueueStats::default(),
            backlog: VecDeque::new(),
            mcast: Vec::new(),
            ops: Vec::new(),
            tx_slots: Vec::new(),
            tx_batch: Vec::new(),
            frags: Vec::new(),
            rx_ids: Vec::new(),
            rx_batch: Vec::new(),
        })
    }

    pub fn state(&self) -> QueueState {
        self.state
    }

    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// Frames waiting for rx buffers.
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Multicast addresses the frontend subscribed (with multicast control).
    pub fn multicast_filter(&self) -> &[MacAddr] {
        &self.mcast
    }

    /// Stop serving the frontend (toolstack close, or a sibling queue's fault).
    pub fn disconnect(&mut self, why: Disconnect) {
        if self.state == QueueState::Connected {
            self.state = QueueState::Disconnected(why);
        }
        self.backlog.clear();
    }

    fn check_connected(&self) -> Result<(), Disconnect> {
        match self.state {
            QueueState::Connected => Ok(()),
            QueueState::Disconnected(d) => Err(d),
        }
    }

    fn fail(&mut self, d: Disconnect) -> Disconnect {
        self.disconnect(d);
        d
    }

    /// Queue a frame for the frontend; false (dropped, counted) if the backlog is full or
    /// the queue is disconnected.
    pub fn enqueue_rx(&mut self, pkt: Packet) -> bool {
        if self.state != QueueState::Connected || self.backlog.len() >= self.cfg.rx_backlog {
            self.stats.rx_drops[RxDrop::BacklogFull as usize] += 1;
            return false;
        }
        self.backlog.push_back(pkt);
        true
    }

    // ----------------------------------------------------------------------------- TX

    /// Serve the tx ring: build packets, give each to `sink` (which returns false to drop
    /// it), answer every request, publish responses and notify at most once.
    pub fn process_tx<C, N, S>(
        &mut self,
        copier: &mut C,
        notify: &mut N,
        mut sink: S,
    ) -> Result<PassSummary, Disconnect>
    where
        C: GrantCopier,
        N: Notify,
        S: FnMut(Packet) -> bool,
    {
        self.check_connected()?;
        match self.tx_pass(copier, &mut sink) {
            Ok(summary) => {
                if self.tx.push_responses_and_check_notify() {
                    self.stats.notifies += 1;
                    notify.notify(self.cfg.index, RingKind::Tx);
                }
                Ok(summary)
            }
            Err(d) => Err(self.fail(d)),
        }
    }

    fn tx_ring_err(err: RingError) -> Disconnect {
        Disconnect::RingIndex {
            ring: RingKind::Tx,
            err,
        }
    }

    fn tx_pass<C: GrantCopier, S: FnMut(Packet) -> bool>(
        &mut self,
        copier: &mut C,
        sink: &mut S,
    ) -> Result<PassSummary, Disconnect> {
        self.ops.clear();
        self.tx_slots.clear();
        self.tx_batch.clear();
        let mut arena_pos = 0usize;
        let mut avail = 0u32;
        let mut summary = PassSummary::default();
        loop {
            if summary.packets >= self.cfg.tx_budget {
                summary.more = true;
                break;
            }
            if avail == 0 {
                avail = self.tx.unconsumed_requests().map_err(Self::tx_ring_err)?;
                if avail == 0 {
                    if self
                        .tx
                        .final_check_for_requests()
                        .map_err(Self::tx_ring_err)?
                    {
                        continue;
                    }
                    break;
                }
            }
            self.read_tx_packet(&mut avail, &mut arena_pos, copier, sink)?;
            summary.packets += 1;
        }
        self.flush_tx(copier, sink)?;
        Ok(summary)
    }

    /// Consume the next request, which the frontend must already have published.
    fn take_tx(&mut self, avail: &mut u32) -> Result<NetifTxRequest, Disconnect> {
        if *avail == 0 {
            *avail = self.tx.unconsumed_requests().map_err(Self::tx_ring_err)?;
            if *avail == 0 {
                return Err(Disconnect::TruncatedChain);
            }
        }
        match self.tx.get_request() {
            Ok(Some(r)) => {
                *avail -= 1;
                self.stats.tx_slots += 1;
                Ok(r)
            }
            Ok(None) => Err(Disconnect::TruncatedChain),
            Err(e) => Err(Self::tx_ring_err(e)),
        }
    }

    fn read_tx_packet<C: GrantCopier, S: FnMut(Packet) -> bool>(
        &mut self,
        avail: &mut u32,
        arena_pos: &mut usize,
        copier: &mut C,
        sink: &mut S,
    ) -> Result<(), Disconnect> {
        let first = self.take_tx(avail)?;
        let total = usize::from(first.size);
        // Make room for the whole packet before recording any of its slots, so a flush here
        // answers only earlier packets (responses stay in request order).
        if *arena_pos + total > self.pool.capacity() {
            self.flush_tx(copier, sink)?;
            *arena_pos = 0;
        }
        let slot_start = self.tx_slots.len();
        self.tx_slots.push(TxSlot {
            id: first.id,
            extra: false,
        });
        let mut fault = None;
        if first.flags & !nettxf::ALL != 0 {
            set_fault(&mut fault, TxFault::BadFlags);
        }

        // Extra-info slots.
        let mut gso: Option<Gso> = None;
        let mut mcast: Option<(bool, MacAddr)> = None;
        if first.flags & nettxf::EXTRA_INFO != 0 {
            let mut seen = [false; extra_type::MAX as usize];
            let mut n = 0usize;
            loop {
                let slot = self.take_tx(avail)?;
                self.tx_slots.push(TxSlot {
                    id: slot.id,
                    extra: true,
                });
                n += 1;
                let e = NetifExtraInfo::from_tx_slot(&slot);
                if n > MAX_TX_EXTRAS {
                    set_fault(&mut fault, TxFault::TooManyExtras);
                } else if let Err(f) = self.parse_extra(&e, &mut seen, &mut gso, &mut mcast) {
                    set_fault(&mut fault, f);
                }
                if !e.has_more() {
                    break;
                }
            }
        }

        // Data fragments after the first slot.
        self.frags.clear();
        let mut last_flags = first.flags;
        let mut data_slots = 1usize;
        while last_flags & nettxf::MORE_DATA != 0 {
            let slot = self.take_tx(avail)?;
            self.tx_slots.push(TxSlot {
                id: slot.id,
                extra: false,
            });
            data_slots += 1;
            if data_slots > self.cfg.max_tx_slots {
                set_fault(&mut fault, TxFault::TooManySlots);
            } else {
                self.frags.push(slot);
            }
            last_flags = slot.flags;
        }
        let slots = slot_start..self.tx_slots.len();

        let offload = Offload {
            checksum: if first.flags & nettxf::CSUM_BLANK != 0 {
                Checksum::Partial
            } else if first.flags & nettxf::DATA_VALIDATED != 0 {
                Checksum::Validated
            } else {
                Checksum::None
            },
            gso,
        };
        // A multicast add/del carries no packet (Linux netback answers it before looking at
        // the data slots; some frontends send a zero-size dummy), so only a data packet's
        // slots are validated.
        let first_len = match (fault, mcast) {
            (Some(_), _) | (None, Some(_)) => 0,
            (None, None) => match self.validate_tx(&first, gso.is_some()) {
                Ok(len) => len,
                Err(f) => {
                    set_fault(&mut fault, f);
                    0
                }
            },
        };
        let ops_start = self.ops.len();
        let outcome = match (fault, mcast) {
            (Some(f), _) => TxOutcome::Fault(f),
            (None, Some((add, mac))) => match self.apply_mcast(add, mac) {
                Ok(()) => TxOutcome::Mcast,
                Err(f) => TxOutcome::Fault(f),
            },
            (None, None) => {
                let mut pos = *arena_pos;
                self.push_copy(first.gref, first.offset, first_len, &mut pos);
                for i in 0..self.frags.len() {
                    let f = self.frags[i];
                    self.push_copy(f.gref, f.offset, usize::from(f.size), &mut pos);
                }
                TxOutcome::Data
            }
        };
        let arena = match outcome {
            TxOutcome::Data => {
                let r = *arena_pos..*arena_pos + total;
                *arena_pos += total;
                r
            }
            _ => 0..0,
        };
        self.tx_batch.push(TxPending {
            slots,
            ops: ops_start..self.ops.len(),
            arena,
            offload,
            outcome,
        });
        Ok(())
    }

    /// Check one extra-info slot and record what it carries.
    fn parse_extra(
        &self,
        e: &NetifExtraInfo,
        seen: &mut [bool; extra_type::MAX as usize],
        gso: &mut Option<Gso>,
        mcast: &mut Option<(bool, MacAddr)>,
    ) -> Result<(), TxFault> {
        if e.kind == extra_type::NONE || e.kind >= extra_type::MAX {
            return Err(TxFault::BadExtra);
        }
        if e.flags & !XEN_NETIF_EXTRA_FLAG_MORE != 0 {
            return Err(TxFault::BadExtra);
        }
        let k = usize::from(e.kind);
        if seen[k] {
            return Err(TxFault::BadExtra);
        }
        seen[k] = true;
        match e.kind {
            extra_type::GSO => {
                let g = e.as_gso();
                let kind = match g.kind {
                    gso_type::TCPV4 if self.cfg.tx_gso_tcpv4 => GsoKind::TcpV4,
                    gso_type::TCPV6 if self.cfg.tx_gso_tcpv6 => GsoKind::TcpV6,
                    gso_type::TCPV4 | gso_type::TCPV6 => return Err(TxFault::GsoUnsupported),
                    _ => return Err(TxFault::BadExtra),
                };
                // No GSO features are defined; a zero MSS cannot be segmented.
                if g.size == 0 || g.features != 0 || e.payload.0[3] != 0 {
                    return Err(TxFault::BadExtra);
                }
                *gso = Some(Gso { kind, mss: g.size });
            }
            extra_type::MCAST_ADD | extra_type::MCAST_DEL => {
                if mcast.is_some() {
                    return Err(TxFault::BadExtra);
                }
                let mac = MacAddr(e.as_mcast_addr());
                if !mac.is_multicast() {
                    return Err(TxFault::BadExtra);
                }
                *mcast = Some((e.kind == extra_type::MCAST_ADD, mac));
            }
            // A hash the frontend computed: advisory, nothing to check or keep.
            _ => {}
        }
        Ok(())
    }

    /// Validate the data slots of a packet (first slot and `self.frags`); returns the first
    /// slot's own data length.
    fn validate_tx(&self, first: &NetifTxRequest, is_gso: bool) -> Result<usize, TxFault> {
        let total = usize::from(first.size);
        if total < ETH_HLEN {
            return Err(TxFault::TooShort);
        }
        if !is_gso && total > self.cfg.mtu.saturating_add(ETH_HLEN + 4) {
            return Err(TxFault::Oversize);
        }
        let mut rest = total;
        for f in &self.frags {
            if f.flags & !nettxf::ALL != 0 || f.flags & nettxf::EXTRA_INFO != 0 {
                return Err(TxFault::BadFlags);
            }
            let size = usize::from(f.size);
            if size > rest {
                return Err(TxFault::FragExceedsPacket);
            }
            rest -= size;
            if usize::from(f.offset) + size > PAGE_SIZE {
                return Err(TxFault::CrossesPage);
            }
            if reserved(f.gref) {
                return Err(TxFault::ReservedGref);
            }
        }
        if usize::from(first.offset) + rest > PAGE_SIZE {
            return Err(TxFault::CrossesPage);
        }
        if reserved(first.gref) {
            return Err(TxFault::ReservedGref);
        }
        Ok(rest)
    }

    fn apply_mcast(&mut self, add: bool, mac: MacAddr) -> Result<(), TxFault> {
        if !self.cfg.multicast_control {
            return Err(TxFault::McastRefused);
        }
        if add {
            if !self.mcast.contains(&mac) {
                if self.mcast.len() >= MAX_MCAST {
                    return Err(TxFault::McastRefused);
                }
                self.mcast.push(mac);
            }
        } else {
            self.mcast.retain(|m| *m != mac);
        }
        self.stats.tx_mcast_ops += 1;
        Ok(())
    }

    /// Append copy elements for `len` bytes of grant `gref` at `offset` into the arena at
    /// `*pos`, split so that no element crosses a local page boundary.
    fn push_copy(&mut self, gref: GrantRef, mut offset: u16, mut len: usize, pos: &mut usize) {
        while len > 0 {
            let (page, poff) = (*pos / PAGE_SIZE, *pos % PAGE_SIZE);
            let n = len.min(PAGE_SIZE - poff);
            // The caller checked the packet fits the arena, so the page exists.
            let gfn = self.pool.gfn(page).unwrap_or(u64::MAX);
            self.ops.push(GnttabCopy {
                source: GnttabCopyPtr {
                    u: u64::from(gref),
                    domid: self.cfg.frontend,
                    offset,
                },
                dest: GnttabCopyPtr {
                    u: gfn,
                    domid: DOMID_SELF,
                    offset: poff as u16,
                },
                len: n as u16,
                flags: gntcopy::SOURCE_GREF,
                status: 0,
            });
            // offset + len ≤ 4096 was validated, so this cannot overflow a u16.
            offset += n as u16;
            len -= n;
            *pos += n;
        }
    }

    fn run_copies<C: GrantCopier>(&mut self, copier: &mut C) {
        if self.ops.is_empty() {
            return;
        }
        self.stats.copy_batches += 1;
        if let Err(st) = copier.copy(&mut self.ops, &mut self.pool) {
            for op in self.ops.iter_mut() {
                op.status = st.as_i16();
            }
        }
    }

    /// Copy the batch, hand packets to the sink, queue every response.
    fn flush_tx<C: GrantCopier, S: FnMut(Packet) -> bool>(
        &mut self,
        copier: &mut C,
        sink: &mut S,
    ) -> Result<(), Disconnect> {
        self.run_copies(copier);
        for i in 0..self.tx_batch.len() {
            let p = self.tx_batch[i].clone();
            let status = match p.outcome {
                TxOutcome::Fault(f) => {
                    self.stats.tx_faults[f as usize] += 1;
                    rsp::ERROR
                }
                TxOutcome::Mcast => rsp::OKAY,
                TxOutcome::Data => {
                    let copied = self.ops[p.ops.clone()]
                        .iter()
                        .all(|o| o.status == GntStatus::Okay.as_i16());
                    let mut data = Vec::with_capacity(p.arena.len());
                    if copied && self.pool.read_into(p.arena.clone(), &mut data) {
                        self.stats.tx_packets += 1;
                        self.stats.tx_bytes += data.len() as u64;
                        if sink(Packet {
                            data,
                            offload: p.offload,
                        }) {
                            rsp::OKAY
                        } else {
                            self.stats.tx_dropped += 1;
                            rsp::DROPPED
                        }
                    } else {
                        self.stats.tx_faults[TxFault::GrantCopy as usize] += 1;
                        rsp::ERROR
                    }
                }
            };
            for s in p.slots {
                let slot = self.tx_slots[s];
                let r = NetifTxResponse {
                    id: slot.id,
                    status: if slot.extra { rsp::NULL } else { status },
                };
                self.tx
                    .push_response(&r)
                    .map_err(|_| Disconnect::Internal("tx response without a request"))?;
            }
        }
        // Flushes happen between packets, so every recorded slot has been answered.
        self.tx_slots.clear();
        self.tx_batch.clear();
        self.ops.clear();
        Ok(())
    }

    // ----------------------------------------------------------------------------- RX

    /// Deliver backlog frames into the buffers the frontend posted; publish and notify at
    /// most once.
    pub fn deliver_rx<C: GrantCopier, N: Notify>(
        &mut self,
        copier: &mut C,
        notify: &mut N,
    ) -> Result<PassSummary, Disconnect> {
        self.check_connected()?;
        match self.rx_pass(copier) {
            Ok(summary) => {
                if self.rx.push_responses_and_check_notify() {
                    self.stats.notifies += 1;
                    notify.notify(self.cfg.index, RingKind::Rx);
                }
                Ok(summary)
            }
            Err(d) => Err(self.fail(d)),
        }
    }

    fn rx_ring_err(err: RingError) -> Disconnect {
        Disconnect::RingIndex {
            ring: RingKind::Rx,
            err,
        }
    }

    /// Why `pkt` cannot be delivered to this frontend at all, and else how many data slots
    /// it needs.
    fn rx_plan(&self, pkt: &Packet) -> Result<usize, RxDrop> {
        let len = pkt.len();
        if len == 0 {
            return Err(RxDrop::Empty);
        }
        if len > XEN_NETIF_MAX_TX_SIZE {
            return Err(RxDrop::TooBig);
        }
        if let Some(g) = pkt.offload.gso {
            let ok = match g.kind {
                GsoKind::TcpV4 => self.cfg.rx_gso_tcpv4,
                GsoKind::TcpV6 => self.cfg.rx_gso_tcpv6,
            };
            if !ok || g.mss == 0 {
                return Err(RxDrop::GsoUnsupported);
            }
        }
        let slots = len.div_ceil(PAGE_SIZE);
        if slots > 1 && !self.cfg.rx_sg {
            return Err(RxDrop::NeedsSg);
        }
        Ok(slots)
    }

    fn rx_pass<C: GrantCopier>(&mut self, copier: &mut C) -> Result<PassSummary, Disconnect> {
        self.ops.clear();
        self.rx_ids.clear();
        self.rx_batch.clear();
        let mut summary = PassSummary::default();
        let mut page_pos = 0usize;
        let mut avail = 0u32;
        while let Some(pkt) = self.backlog.front() {
            if summary.packets >= self.cfg.rx_budget {
                summary.more = true;
                break;
            }
            let data_slots = match self.rx_plan(pkt) {
                Ok(n) => n,
                Err(d) => {
                    self.backlog.pop_front();
                    self.stats.rx_drops[d as usize] += 1;
                    summary.packets += 1;
                    continue;
                }
            };
            let needed = data_slots + usize::from(pkt.offload.gso.is_some());
            if (avail as usize) < needed {
                avail = self.rx.unconsumed_requests().map_err(Self::rx_ring_err)?;
                if (avail as usize) < needed {
                    // Ask to be told once enough buffers are posted (req_event = req_cons +
                    // needed, as Linux netback); the ring looks once more after arming, so a
                    // post racing with the arming is either counted here or notified.
                    avail = self
                        .rx
                        .arm_request_event(needed as u32)
                        .map_err(Self::rx_ring_err)?;
                    if (avail as usize) < needed {
                        summary.stalled = true;
                        break;
                    }
                }
            }
            if page_pos + data_slots > self.pool.pages() {
                self.flush_rx(copier)?;
                page_pos = 0;
            }
            let Some(pkt) = self.backlog.pop_front() else {
                break;
            };
            self.stage_rx(pkt, data_slots, needed, &mut avail, &mut page_pos)?;
            summary.packets += 1;
        }
        self.flush_rx(copier)?;
        Ok(summary)
    }

    /// Consume the `needed` posted buffers for `pkt`, stage its bytes in the pool and build
    /// the copies.
    fn stage_rx(
        &mut self,
        pkt: Packet,
        data_slots: usize,
        needed: usize,
        avail: &mut u32,
        page_pos: &mut usize,
    ) -> Result<(), Disconnect> {
        let slot_start = self.rx_ids.len();
        let ops_start = self.ops.len();
        let has_extra = pkt.offload.gso.is_some();
        let mut fault = None;
        let mut data_i = 0usize;
        for j in 0..needed {
            let req = match self.rx.get_request() {
                Ok(Some(r)) => r,
                Ok(None) => return Err(Disconnect::Internal("posted rx buffer vanished")),
                Err(e) => return Err(Self::rx_ring_err(e)),
            };
            *avail -= 1;
            self.stats.rx_slots += 1;
            self.rx_ids.push(req.id);
            if has_extra && j == 1 {
                continue; // This slot carries the GSO extra-info, not data.
            }
            if reserved(req.gref) {
                fault = Some(RxDrop::ReservedGref);
            }
            if fault.is_some() {
                data_i += 1;
                continue;
            }
            let start = data_i * PAGE_SIZE;
            let chunk = &pkt.data[start..pkt.data.len().min(start + PAGE_SIZE)];
            let page = *page_pos + data_i;
            let (Some(gfn), true) = (
                self.pool.gfn(page),
                self.pool.write_at(page * PAGE_SIZE, chunk),
            ) else {
                return Err(Disconnect::Internal("rx staging past the pool"));
            };
            self.ops.push(GnttabCopy {
                source: GnttabCopyPtr {
                    u: gfn,
                    domid: DOMID_SELF,
                    offset: 0,
                },
                dest: GnttabCopyPtr {
                    u: u64::from(req.gref),
                    domid: self.cfg.frontend,
                    offset: 0,
                },
                len: chunk.len() as u16,
                flags: gntcopy::DEST_GREF,
                status: 0,
            });
            data_i += 1;
        }
        *page_pos += data_slots;
        self.rx_batch.push(RxPending {
            slots: slot_start..self.rx_ids.len(),
            ops: ops_start..self.ops.len(),
            len: pkt.len(),
            data_slots,
            offload: pkt.offload,
            fault,
        });
        Ok(())
    }

    fn flush_rx<C: GrantCopier>(&mut self, copier: &mut C) -> Result<(), Disconnect> {
        self.run_copies(copier);
        for i in 0..self.rx_batch.len() {
            let p = self.rx_batch[i].clone();
            let fault = p.fault.or_else(|| {
                self.ops[p.ops.clone()]
                    .iter()
                    .any(|o| o.status != GntStatus::Okay.as_i16())
                    .then_some(RxDrop::GrantCopy)
            });
            if let Some(d) = fault {
                self.stats.rx_drops[d as usize] += 1;
                for s in p.slots.clone() {
                    let r = NetifRxResponse {
                        id: self.rx_ids[s],
                        offset: 0,
                        flags: 0,
                        status: rsp::ERROR,
                    };
                    self.push_rx(&r)?;
                }
                continue;
            }
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += p.len as u64;
            let csum = match p.offload.checksum {
                Checksum::Partial => netrxf::CSUM_BLANK | netrxf::DATA_VALIDATED,
                Checksum::Validated => netrxf::DATA_VALIDATED,
                Checksum::None => 0,
            };
            let mut data_i = 0usize;
            for (j, s) in p.slots.clone().enumerate() {
                let id = self.rx_ids[s];
                if let (Some(g), 1) = (p.offload.gso, j) {
                    let info = GsoInfo {
                        size: g.mss,
                        kind: match g.kind {
                            GsoKind::TcpV4 => gso_type::TCPV4,
                            GsoKind::TcpV6 => gso_type::TCPV6,
                        },
                        features: 0,
                    };
                    self.push_rx(&NetifExtraInfo::gso(info, 0).to_rx_slot())?;
                    continue;
                }
                let start = data_i * PAGE_SIZE;
                let n = (p.len - start).min(PAGE_SIZE);
                let mut flags = 0;
                if data_i == 0 {
                    flags |= csum;
                    if p.offload.gso.is_some() {
                        flags |= netrxf::EXTRA_INFO;
                    }
                }
                if data_i + 1 < p.data_slots {
                    flags |= netrxf::MORE_DATA;
                }
                self.push_rx(&NetifRxResponse {
                    id,
                    offset: 0,
                    flags,
                    status: n as i16,
                })?;
                data_i += 1;
            }
        }
        self.rx_batch.clear();
        self.rx_ids.clear();
        self.ops.clear();
        Ok(())
    }

    fn push_rx(&mut self, r: &NetifRxResponse) -> Result<(), Disconnect> {
        self.rx
            .push_response(r)
            .map_err(|_| Disconnect::Internal("rx response without a request"))
    }
}

/// A frontend's virtual interface: its queues (`multi-queue-num-queues`, 1 without
/// multi-queue). A fault on any queue disconnects them all, as the whole vif is the
/// frontend's one device.
#[derive(Debug)]
pub struct Vif {
    queues: Vec<Queue>,
}

impl Vif {
    pub fn new(queues: Vec<Queue>) -> Result<Self, QueueError> {
        if queues.is_empty() || queues.len() > MAX_QUEUES {
            return Err(QueueError::QueueCount {
                got: queues.len(),
                max: MAX_QUEUES,
            });
        }
        Ok(Vif { queues })
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn queue(&self, i: usize) -> Option<&Queue> {
        self.queues.get(i)
    }

    pub fn queue_mut(&mut self, i: usize) -> Option<&mut Queue> {
        self.queues.get_mut(i)
    }

    /// True while every queue serves the frontend.
    pub fn is_connected(&self) -> bool {
        self.queues
            .iter()
            .all(|q| q.state() == QueueState::Connected)
    }

    /// The queue a frame's flow maps to.
    pub fn select_queue(&self, frame: &[u8]) -> usize {
        flow_hash(frame) as usize % self.queues.len()
    }

    /// Queue a frame for the frontend on its flow's queue; false if dropped.
    pub fn enqueue_rx(&mut self, pkt: Packet) -> bool {
        let q = self.select_queue(&pkt.data);
        self.queues[q].enqueue_rx(pkt)
    }

    /// True if the frontend subscribed `mac` on any queue (multicast control).
    pub fn subscribed(&self, mac: MacAddr) -> bool {
        self.queues.iter().any(|q| q.mcast.contains(&mac))
    }

    fn propagate(&mut self, r: Result<PassSummary, Disconnect>) -> Result<PassSummary, Disconnect> {
        if let Err(d) = r {
            for q in &mut self.queues {
                q.disconnect(d);
            }
        }
        r
    }

    /// [`Queue::process_tx`] on queue `i`; a fault disconnects the whole vif.
    pub fn process_tx<C, N, S>(
        &mut self,
        i: usize,
        copier: &mut C,
        notify: &mut N,
        sink: S,
    ) -> Result<PassSummary, Disconnect>
    where
        C: GrantCopier,
        N: Notify,
        S: FnMut(Packet) -> bool,
    {
        let q = self
            .queues
            .get_mut(i)
            .ok_or(Disconnect::Internal("no such queue"))?;
        let r = q.process_tx(copier, notify, sink);
        self.propagate(r)
    }

    /// [`Queue::deliver_rx`] on queue `i`; a fault disconnects the whole vif.
    pub fn deliver_rx<C: GrantCopier, N: Notify>(
        &mut self,
        i: usize,
        copier: &mut C,
        notify: &mut N,
    ) -> Result<PassSummary, Disconnect> {
        let q = self
            .queues
            .get_mut(i)
            .ok_or(Disconnect::Internal("no such queue"))?;
        let r = q.deliver_rx(copier, notify);
        self.propagate(r)
    }

    /// Stop the whole vif.
    pub fn disconnect(&mut self, why: Disconnect) {
        for q in &mut self.queues {
            q.disconnect(why);
        }
    }
}
