//! Engine tests of console input (`ConsoleWrite`) and I/O counters (`DomainStats`) against
//! the fake platform.

use super::*;
use crate::fake::{FAKE_CONSOLE_INPUT_BYTES, FakePlatform};
use shared_abi::mgmt::DomainIoStats;

fn write(t: &mut Toolstack<FakePlatform>, dom: DomainRef, data: &[u8]) -> Result<u32, MgmtError> {
    match t.handle(RequestBody::ConsoleWrite {
        dom,
        data: data.to_vec(),
    })? {
        Reply::Written { accepted } => Ok(accepted),
        r => panic!("{r:?}"),
    }
}

#[test]
fn console_input_reaches_the_domain_by_id_or_name() {
    let mut t = Toolstack::fake();
    assert_eq!(write(&mut t, DomainRef::Id(2), b"ls\n"), Ok(3));
    assert_eq!(
        write(&mut t, DomainRef::Name("blkback".into()), b"quit\n"),
        Ok(5)
    );
    assert_eq!(t.platform.console_input[&2], b"ls\nquit\n");
    assert_eq!(write(&mut t, DomainRef::Id(2), b""), Ok(0));
}

#[test]
fn a_full_input_buffer_takes_part_then_nothing() {
    let mut t = Toolstack::fake();
    let data = vec![b'x'; MAX_CHUNK];
    assert_eq!(
        write(&mut t, DomainRef::Id(3), &data),
        Ok(FAKE_CONSOLE_INPUT_BYTES as u32)
    );
    assert_eq!(write(&mut t, DomainRef::Id(3), b"more"), Ok(0), "full: 0");
    t.platform.console_input.get_mut(&3).unwrap().drain(..2);
    assert_eq!(write(&mut t, DomainRef::Id(3), b"more"), Ok(2));
}

#[test]
fn bad_console_writes_get_clear_errors() {
    let mut t = Toolstack::fake();
    assert_eq!(
        write(&mut t, DomainRef::Id(77), b"x"),
        Err(MgmtError::UnknownDomain(DomainRef::Id(77)))
    );
    assert_eq!(
        write(&mut t, DomainRef::Name("nobody".into()), b"x"),
        Err(MgmtError::UnknownDomain(DomainRef::Name("nobody".into())))
    );
    assert!(matches!(
        write(&mut t, DomainRef::Id(2), &vec![0; MAX_CHUNK + 1]),
        Err(MgmtError::BadRequest(_))
    ));
    assert!(t.platform.console_input.is_empty(), "nothing taken");
}

/// A platform without the operations: `Unsupported`, not a crash.
#[test]
fn a_platform_without_console_input_or_stats_says_unsupported() {
    struct Bare(FakePlatform);
    impl Platform for Bare {
        fn list(&mut self) -> Result<Vec<HvDomain>, XenError> {
            self.0.list()
        }
        fn create(&mut self, c: &DomainConfig, k: &[u8]) -> Result<DomId, XenError> {
            self.0.create(c, k)
        }
        fn destroy(&mut self, d: DomId) -> Result<(), XenError> {
            self.0.destroy(d)
        }
        fn pause(&mut self, d: DomId) -> Result<(), XenError> {
            self.0.pause(d)
        }
        fn unpause(&mut self, d: DomId) -> Result<(), XenError> {
            self.0.unpause(d)
        }
        fn shutdown(&mut self, d: DomId, r: u32) -> Result<(), XenError> {
            self.0.shutdown(d, r)
        }
        fn set_sched(&mut self, d: DomId, w: u32, c: u32) -> Result<(), XenError> {
            self.0.set_sched(d, w, c)
        }
        fn set_memory(&mut self, d: DomId, k: u64) -> Result<(), XenError> {
            self.0.set_memory(d, k)
        }
        fn console_read(&mut self, d: DomId, f: u64, m: usize) -> Result<Chunk, XenError> {
            self.0.console_read(d, f, m)
        }
        fn dmesg(&mut self, f: u64, m: usize) -> Result<Chunk, XenError> {
            self.0.dmesg(f, m)
        }
        fn xs_introduce(&mut self, d: DomId) -> Result<(), XenError> {
            self.0.xs_introduce(d)
        }
        fn xs_release(&mut self, d: DomId) -> Result<(), XenError> {
            self.0.xs_release(d)
        }
        fn xs_write(&mut self, p: &str, v: &str) -> Result<(), XenError> {
            self.0.xs_write(p, v)
        }
        fn xs_rm(&mut self, p: &str) -> Result<(), XenError> {
            self.0.xs_rm(p)
        }
        fn xs_write_plan(&mut self, p: &xenstore_layout::XsPlan) -> Result<(), XenError> {
            self.0.xs_write_plan(p)
        }
        fn xs_read(&mut self, p: &str) -> Result<String, XenError> {
            self.0.xs_read(p)
        }
        fn now_ms(&mut self) -> u64 {
            self.0.now_ms()
        }
        fn sleep_ms(&mut self, ms: u64) {
            self.0.sleep_ms(ms)
        }
        fn set_max_memory(&mut self, d: DomId, k: u64) -> Result<(), XenError> {
            self.0.set_max_memory(d, k)
        }
    }
    let mut t = Toolstack::new(Bare(FakePlatform::with_boot_domains()));
    assert!(matches!(
        t.handle(RequestBody::ConsoleWrite {
            dom: DomainRef::Id(2),
            data: b"x".to_vec()
        }),
        Err(MgmtError::Unsupported(_))
    ));
    assert!(matches!(
        t.handle(RequestBody::DomainStats),
        Err(MgmtError::Unsupported(_))
    ));
}

#[test]
fn domain_stats_has_a_row_per_domain_with_its_counters() {
    let mut t = Toolstack::fake();
    t.platform.io.insert(
        2,
        DomainIoStats {
            evtchn_sends: 10,
            grant_copies_done: 4,
            ..Default::default()
        },
    );
    t.platform.io.insert(
        3,
        DomainIoStats {
            domid: 99, // the engine names the row by the domain it asked about
            grant_copy_bytes: 8192,
            ..Default::default()
        },
    );
    let Ok(Reply::Stats(rows)) = t.handle(RequestBody::DomainStats) else {
        panic!("stats");
    };
    let ids: Vec<DomId> = rows.iter().map(|r| r.domid).collect();
    assert_eq!(ids, [0, 1, 2, 3]);
    assert_eq!((rows[2].evtchn_sends, rows[2].grant_copies_done), (10, 4));
    assert_eq!(rows[3].grant_copy_bytes, 8192);
    assert_eq!(rows[0], DomainIoStats::default());
}
