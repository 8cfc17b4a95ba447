//! Conformance of the engine to Xen's xenstore semantics, message type by message type,
//! including every error path.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use shared_abi::xenstore::MsgType;
use xenstore_dom::engine::Config;
use xenstore_dom::quota::Quotas;
use xenstore_dom::{Effect, Engine};

// ---- READ / WRITE / MKDIR -------------------------------------------------------------

#[test]
fn write_then_read_returns_raw_value_without_nul() {
    let mut r = Rig::new();
    let c = r.sock();
    r.ok_write(c, "/a", "hello");
    assert_eq!(r.read(c, 0, "/a"), val("hello"));
}

#[test]
fn write_value_may_contain_nul_bytes() {
    let mut r = Rig::new();
    let c = r.sock();
    assert_eq!(r.req(c, MsgType::Write, 0, b"/bin\0a\0b").0, ok());
    assert_eq!(r.read(c, 0, "/bin"), Ok(b"a\0b".to_vec()));
}

#[test]
fn write_creates_missing_parents_empty() {
    let mut r = Rig::new();
    let c = r.sock();
    r.ok_write(c, "/x/y/z", "v");
    assert_eq!(r.read(c, 0, "/x"), val(""));
    assert_eq!(r.read(c, 0, "/x/y"), val(""));
    assert_eq!(r.dir(c, 0, "/x"), Ok(vec!["y".into()]));
}

#[test]
fn read_missing_is_enoent_and_bad_paths_are_einval() {
    let mut r = Rig::new();
    let c = r.sock();
    assert_eq!(r.read(c, 0, "/nope"), err("ENOENT"));
    for bad in ["/a/", "/a//b", "/a b", "@releaseDomain", ""] {
        assert_eq!(r.read(c, 0, bad), err("EINVAL"), "{bad:?}");
    }
    // Payload must be exactly one NUL-terminated string.
    assert_eq!(r.req(c, MsgType::Read, 0, b"/tool").0, err("EINVAL"));
    assert_eq!(r.req(c, MsgType::Read, 0, b"/tool\0x\0").0, err("EINVAL"));
    assert_eq!(r.req(c, MsgType::Write, 0, b"/nonul").0, err("EINVAL"));
}

#[test]
fn relative_paths_resolve_under_the_connection_home() {
    let mut r = Rig::new();
    let s = r.sock();
    r.ok_write(s, "rel", "0");
    assert_eq!(r.read(s, 0, "/local/domain/0/rel"), val("0"));
    r.ok_write(s, "/local/domain/3", "");
    r.ok_perms(s, "/local/domain/3", &["n3"]);
    let d = r.dom(3);
    assert_eq!(r.write(d, 0, "device/vbd", "x").0, ok());
    assert_eq!(r.read(s, 0, "/local/domain/3/device/vbd"), val("x"));
}

#[test]
fn unprivileged_domain_is_refused_and_learns_nothing_from_missing_nodes() {
    let mut r = Rig::new();
    let s = r.sock();
    let d = r.dom(5);
    r.ok_write(s, "/secret/k", "v");
    assert_eq!(r.read(d, 0, "/secret/k"), err("EACCES"));
    // Missing under an unreadable parent: EACCES, not ENOENT.
    assert_eq!(r.read(d, 0, "/secret/missing"), err("EACCES"));
    assert_eq!(r.write(d, 0, "/secret/k", "x").0, err("EACCES"));
    r.ok_perms(s, "/secret", &["n0", "r5"]);
    assert_eq!(r.read(d, 0, "/secret/missing"), err("ENOENT"));
}

#[test]
fn permissions_entries_grant_read_write_both_none() {
    let mut r = Rig::new();
    let s = r.sock();
    let (d5, d6, d7) = (r.dom(5), r.dom(6), r.dom(7));
    r.ok_write(s, "/p", "v");
    r.ok_perms(s, "/p", &["n0", "r5", "b6", "w7"]);
    assert_eq!(r.read(d5, 0, "/p"), val("v"));
    assert_eq!(r.write(d5, 0, "/p", "x").0, err("EACCES"));
    assert_eq!(r.write(d6, 0, "/p", "y").0, ok());
    assert_eq!(r.read(d6, 0, "/p"), val("y"));
    assert_eq!(r.read(d7, 0, "/p"), err("EACCES"));
    assert_eq!(r.write(d7, 0, "/p", "z").0, ok());
}

#[test]
fn created_nodes_inherit_parent_perms_and_unprivileged_creator_owns_them() {
    let mut r = Rig::new();
    let s = r.sock();
    let d = r.dom(4);
    r.ok_write(s, "/home", "");
    r.ok_perms(s, "/home", &["n0", "b4", "r9"]);
    assert_eq!(r.write(d, 0, "/home/a/b", "1").0, ok());
    assert_eq!(
        r.get_perms(s, 0, "/home/a/b"),
        Ok(vec!["n4".into(), "b4".into(), "r9".into()])
    );
    r.ok_write(s, "/home/c", "");
    assert_eq!(
        r.get_perms(s, 0, "/home/c"),
        Ok(vec!["n0".into(), "b4".into(), "r9".into()])
    );
}

#[test]
fn mkdir_creates_and_is_idempotent_without_second_event() {
    let mut r = Rig::new();
    let c = r.sock();
    r.ok_watch(c, "/m", "t");
    let (rep, evs) = r.mkdir(c, 0, "/m/n");
    assert_eq!(rep, ok());
    assert_eq!(evs_for(&evs, c), vec![pt("/m/n", "t")]);
    let (rep, evs) = r.mkdir(c, 0, "/m/n");
    assert_eq!(rep, ok());
    assert!(evs.is_empty());
    assert_eq!(r.read(c, 0, "/m/n"), val(""));
    assert_eq!(r.mkdir(c, 0, "/bad/").0, err("EINVAL"));
}

// ---- RM ------------------------------------------------------------------------------

#[test]
fn rm_removes_subtree_and_fires_exact_for_children() {
    let mut r = Rig::new();
    let c = r.sock();
    r.ok_write(c, "/t/a/x", "1");
    r.ok_write(c, "/t/b", "2");
    r.ok_watch(c, "/t", "tree");
    r.ok_watch(c, "/t/a/x", "leaf");
    r.ok_watch(c, "/t/a/x/deeper", "none");
    let (rep, evs) = r.rm(c, 0, "/t");
    assert_eq!(rep, ok());
    let mut got = evs_for(&evs, c);
    got.sort();
    let mut want = vec![pt("/t", "tree"), pt("/t/a/x", "leaf")];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(r.read(c, 0, "/t/a/x"), err("ENOENT"));
    assert!(!r.dir(c, 0, "/").unwrap().contains(&"t".to_owned()));
    r.e.check().unwrap();
}

#[test]
fn rm_missing_node_is_ok_if_parent_exists_else_enoent_and_root_is_einval() {
    let mut r = Rig::new();
    let c = r.sock();
    assert_eq!(r.rm(c, 0, "/tool/nothing").0, ok());
    assert_eq!(r.rm(c, 0, "/no/thing").0, err("ENOENT"));
    assert_eq!(r.rm(c, 0, "/").0, err("EINVAL"));
    let d = r.dom(2);
    assert_eq!(r.rm(d, 0, "/tool").0, err("EACCES"));
}

// ---- DIRECTORY / DIRECTORY_PART --------------------------------------------------------

#[test]
fn directory_lists_children_and_empty_for_leaf() {
    let mut r = Rig::new();
    let c = r.sock();
    r.ok_write(c, "/d/a", "");
    r.ok_write(c, "/d/b", "");
    assert_eq!(r.dir(c, 0, "/d"), Ok(vec!["a".into(), "b".into()]));
    assert_eq!(r.req(c, MsgType::Directory, 0, &z("/d/a")).0, Ok(vec![]));
    assert_eq!(r.dir(c, 0, "/missing"), Err("ENOENT".into()));
}

#[test]
fn directory_too_big_for_one_reply_is_e2big_and_directory_part_pages_it() {
    let mut r = Rig::new();
    let c = r.sock();
    let names: Vec<String> = (0..200)
        .map(|i| format!("child-with-a-long-name-{i:04}"))
        .collect();
    for n in &names {
        r.ok_write(c, &format!("/big/{n}"), "");
    }
    assert_eq!(r.dir(c, 0, "/big"), Err("E2BIG".into()));
    let mut all = Vec::new();
    let mut off = 0usize;
    let mut gen0 = None;
    loop {
        let mut p = z("/big");
        p.extend(z(&off.to_string()));
        let rep = r.req(c, MsgType::DirectoryPart, 0, &p).0.unwrap();
        assert!(rep.len() <= 4096);
        let parts = split(&rep);
        let g = parts[0].clone();
        assert_eq!(
            *gen0.get_or_insert(g.clone()),
            g,
            "generation stable while unchanged"
        );
        let end = rep.ends_with(&[0, 0]);
        let chunk: Vec<String> = parts[1..]
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        off += chunk.iter().map(|s| s.len() + 1).sum::<usize>();
        all.extend(chunk);
        if end {
            break;
        }
    }
    let mut want = names.clone();
    want.sort();
    assert_eq!(all, want);
    let mut p = z("/big");
    p.extend(z("999999"));
    let rep = r.req(c, MsgType::DirectoryPart, 0, &p).0.unwrap();
    assert!(rep.ends_with(&[0, 0]));
    assert_eq!(
        r.req(c, MsgType::DirectoryPart, 0, &z("/big")).0,
        err("EINVAL")
    );
    let mut p = z("/big");
    p.extend(z("x"));
    assert_eq!(r.req(c, MsgType::DirectoryPart, 0, &p).0, err("EINVAL"));
}

// ---- GET_PERMS / SET_PERMS ---------------------------------------------------------------

#[test]
fn get_perms_formats_entries_and_works_on_special_nodes() {
    let mut r = Rig::new();
    let c = r.sock();
    assert_eq!(r.get_perms(c, 0, "/"), Ok(vec!["n0".into()]));
    assert_eq!(r.get_perms(c, 0, "@releaseDomain"), Ok(vec!["n0".into()]));
    assert_eq!(r.get_perms(c, 0, "@nothing"), Err("ENOENT".into()));
    assert_eq!(r.set_perms(c, 0, "@introduceDomain", &["n0", "r5"]).0, ok());
    assert_eq!(
        r.get_perms(c, 0, "@introduceDomain"),
        Ok(vec!["n0".into(), "r5".into()])
    );
}

#[test]
fn set_perms_error_paths() {
    let mut r = Rig::new();
    let s = r.sock();
    let d = r.dom(5);
    r.ok_write(s, "/o", "");
    r.ok_perms(s, "/o", &["n5"]);
    // Bad entries and too few strings.
    assert_eq!(r.set_perms(s, 0, "/o", &["x5"]).0, err("EINVAL"));
    assert_eq!(r.set_perms(s, 0, "/o", &[]).0, err("EINVAL"));
    assert_eq!(r.set_perms(s, 0, "/missing", &["n0"]).0, err("ENOENT"));
    // Owner may change entries but not the owner.
    assert_eq!(r.set_perms(d, 0, "/o", &["n5", "r6"]).0, ok());
    assert_eq!(r.set_perms(d, 0, "/o", &["n6"]).0, err("EPERM"));
    // Unprivileged: at most node-permissions entries.
    assert_eq!(
        r.set_perms(d, 0, "/o", &["n5", "r1", "r2", "r3", "r4", "r6"])
            .0,
        err("ENOSPC")
    );
    // Non-owner without write: EACCES.
    let d7 = r.dom(7);
    assert_eq!(r.set_perms(d7, 0, "/o", &["n7"]).0, err("EACCES"));
}

#[test]
fn set_perms_fires_for_watchers_that_lost_access() {
    let mut r = Rig::new();
    let s = r.sock();
    let d = r.dom(5);
    r.ok_write(s, "/v", "");
    r.ok_perms(s, "/v", &["n0", "r5"]);
    r.ok_watch(d, "/v", "w");
    let (_, evs) = r.set_perms(s, 0, "/v", &["n0"]);
    assert_eq!(evs_for(&evs, d), vec![pt("/v", "w")]);
    // Now nothing readable: no more events for d.
    let (_, evs) = r.write(s, 0, "/v", "x");
    assert!(evs_for(&evs, d).is_empty());
}

// ---- WATCH / UNWATCH / RESET_WATCHES ---------------------------------------------------------

#[test]
fn watch_fires_once_on_registration_after_the_reply() {
    let mut r = Rig::new();
    let c = r.sock();
    let (rep, evs) = r.watch(c, "/nothing/yet", "tok");
    assert_eq!(rep, ok());
    assert_eq!(evs_for(&evs, c), vec![pt("/nothing/yet", "tok")]);
}

#[test]
fn watch_fires_for_changes_at_and_below_only() {
    let mut r = Rig::new();
    let c = r.sock();
    let other = r.sock();
    r.ok_watch(c, "/w", "t");
    assert_eq!(
        evs_for(&r.write(other, 0, "/w/a/b", "1").1, c),
        vec![pt("/w/a/b", "t")]
    );
    assert_eq!(
        evs_for(&r.write(other, 0, "/w", "1").1, c),
        vec![pt("/w", "t")]
    );
    assert!(evs_for(&r.write(other, 0, "/wx", "1").1, c).is_empty());
    assert!(r.read(other, 0, "/w").is_ok());
}

#[test]
fn relative_watch_gets_relative_event_paths() {
    let mut r = Rig::new();
    let s = r.sock();
    r.ok_write(s, "/local/domain/6", "");
    r.ok_perms(s, "/local/domain/6", &["n6"]);
    let d = r.dom(6);
    let (_, evs) = r.watch(d, "device", "dev");
    assert_eq!(evs_for(&evs, d), vec![pt("device", "dev")]);
    let (_, evs) = r.write(s, 0, "/local/domain/6/device/vif/0", "x");
    assert_eq!(evs_for(&evs, d), vec![pt("device/vif/0", "dev")]);
}

#[test]
fn watch_errors_duplicate_quota_bad_path_and_unwatch_missing() {
    let mut cfg = Config::default();
    cfg.quotas.watches = 2;
    let mut r = Rig::with(Engine::new(cfg));
    let d = r.dom(3);
    assert_eq!(r.watch(d, "/a", "1").0, ok());
    assert_eq!(r.watch(d, "/a", "1").0, err("EEXIST"));
    assert_eq!(r.watch(d, "/a", "2").0, ok());
    assert_eq!(r.watch(d, "/a", "3").0, err("E2BIG"));
    assert_eq!(r.watch(d, "/bad/", "4").0, err("EINVAL"));
    assert_eq!(r.req(d, MsgType::Watch, 0, &z("/a")).0, err("EINVAL"));
    assert_eq!(r.unwatch(d, "/a", "9"), err("ENOENT"));
    assert_eq!(r.unwatch(d, "/a", "1"), ok());
    assert_eq!(r.watch(d, "/a", "3").0, ok());
}

#[test]
fn privileged_connections_have_a_watch_cap_too() {
    let mut cfg = Config::default();
    cfg.privileged.watches = 3;
    let mut r = Rig::with(Engine::new(cfg));
    let c = r.sock();
    for i in 0..3 {
        assert_eq!(r.watch(c, "/a", &i.to_string()).0, ok());
    }
    assert_eq!(r.watch(c, "/a", "x").0, err("E2BIG"));
    // Another socket client is unaffected.
    let c2 = r.sock();
    assert_eq!(r.watch(c2, "/a", "x").0, ok());
}

#[test]
fn watch_ignores_transaction_id_and_unwatch_stops_events() {
    let mut r = Rig::new();
    let c = r.sock();
    let (rep, _) = r.req(c, MsgType::Watch, 77, &[z("/q"), z("t")].concat());
    assert_eq!(rep, ok());
    assert_eq!(r.unwatch(c, "/q", "t"), ok());
    assert!(r.write(c, 0, "/q", "1").1.is_empty());
}

#[test]
fn reset_watches_drops_watches_and_transactions() {
    let mut r = Rig::new();
    let c = r.sock();
    r.ok_watch(c, "/r", "t");
    let tx = r.start(c);
    assert_eq!(r.req(c, MsgType::ResetWatches, 0, b"\0").0, ok());
    assert!(r.write(c, 0, "/r", "1").1.is_empty());
    assert_eq!(r.read(c, tx, "/r"), err("ENOENT"));
}

#[test]
fn watch_events_respect_permissions_of_node_or_parent() {
    let mut r = Rig::new();
    let s = r.sock();
    let d = r.dom(8);
    r.ok_watch(d, "/", "all");
    let (_, evs) = r.write(s, 0, "/hidden", "x");
    assert!(evs_for(&evs, d).is_empty());
    r.ok_write(s, "/shared", "");
    r.ok_perms(s, "/shared", &["n0", "r8"]);
    // A child inherits the perms; the parent is readable too.
    let (_, evs) = r.write(s, 0, "/shared/k", "x");
    assert_eq!(evs_for(&evs, d), vec![pt("/shared/k", "all")]);
}

// ---- TRANSACTIONS ------------------------------------------------------------------------------

#[test]
fn transaction_is_isolated_until_commit_and_fires_once() {
    let mut r = Rig::new();
    let c = r.sock();
    let w = r.sock();
    r.ok_watch(w, "/tx", "t");
    let tx = r.start(c);
    let (rep, evs) = r.write(c, tx, "/tx/a", "1");
    assert_eq!(rep, ok());
    assert!(evs.is_empty(), "no events inside a transaction");
    assert_eq!(r.write(c, tx, "/tx/a", "2").0, ok());
    assert_eq!(r.read(c, tx, "/tx/a"), val("2"));
    assert_eq!(r.read(c, 0, "/tx/a"), err("ENOENT"));
    let (rep, evs) = r.end(c, tx, true);
    assert_eq!(rep, ok());
    let got = evs_for(&evs, w);
    assert_eq!(got.iter().filter(|e| e.0 == "/tx/a").count(), 1, "{got:?}");
    assert_eq!(r.read(w, 0, "/tx/a"), val("2"));
    r.e.check().unwrap();
}

#[test]
fn transaction_snapshot_does_not_see_later_changes() {
    let mut r = Rig::new();
    let c = r.sock();
    r.ok_write(c, "/s", "old");
    let tx = r.start(c);
    r.ok_write(c, "/s", "new");
    assert_eq!(r.read(c, tx, "/s"), val("old"));
}

#[test]
fn commit_fails_eagain_when_a_read_node_changed() {
    let mut r = Rig::new();
    let c = r.sock();
    let o = r.sock();
    r.ok_write(c, "/k", "1");
    let tx = r.start(c);
    assert_eq!(r.read(c, tx, "/k"), val("1"));
    assert_eq!(r.write(c, tx, "/out", "x").0, ok());
    r.ok_write(o, "/k", "2");
    assert_eq!(r.end(c, tx, true).0, err("EAGAIN"));
    assert_eq!(r.read(c, 0, "/out"), err("ENOENT"), "nothing applied");
    // The transaction is gone either way.
    assert_eq!(r.end(c, tx, true).0, err("ENOENT"));
}

#[test]
fn commit_fails_when_a_missing_node_read_was_created() {
    let mut r = Rig::new();
    let c = r.sock();
    let tx = r.start(c);
    assert_eq!(r.read(c, tx, "/tool/new"), err("ENOENT"));
    r.ok_write(c, "/tool/new", "x");
    assert_eq!(r.end(c, tx, true).0, err("EAGAIN"));
}

#[test]
fn commit_succeeds_when_only_unrelated_nodes_changed() {
    let mut r = Rig::new();
    let c = r.sock();
    let o = r.sock();
    r.ok_write(c, "/a/k", "1");
    r.ok_write(c, "/b/k", "1");
    let tx = r.start(c);
    assert_eq!(r.read(c, tx, "/a/k"), val("1"));
    assert_eq!(r.write(c, tx, "/a/k", "2").0, ok());
    r.ok_write(o, "/b/k", "2");
    r.ok_write(o, "/b/new", "2");
    r.ok_write(o, "/c", "x");
    assert_eq!(r.end(c, tx, true).0, ok());
    assert_eq!(r.read(c, 0, "/a/k"), val("2"));
    assert_eq!(r.read(c, 0, "/b/new"), val("2"));
    r.e.check().unwrap();
}

#[test]
fn abort_discards_and_transaction_errors() {
    let mut r = Rig::new();
    let c = r.sock();
    let tx = r.start(c);
    assert_eq!(r.write(c, tx, "/gone", "1").0, ok());
    assert_eq!(r.end(c, tx, false).0, ok());
    assert_eq!(r.read(c, 0, "/gone"), err("ENOENT"));
    assert_eq!(r.end(c, 0, true).0, err("ENOENT"));
    let tx = r.start(c);
    assert_eq!(
        r.end(c, tx, true).0.clone().and(r.end(c, tx, true).0),
        err("ENOENT")
    );
    let tx = r.start(c);
    assert_eq!(
        r.req(c, MsgType::TransactionEnd, tx, b"X\0").0,
        err("EINVAL")
    );
    assert_eq!(
        r.req(c, MsgType::TransactionStart, tx, b"\0").0,
        err("EBUSY")
    );
    assert_eq!(r.read(c, 4242, "/tool"), err("ENOENT"));
    // Transactions belong to their connection.
    let other = r.sock();
    assert_eq!(r.read(other, tx, "/tool"), err("ENOENT"));
}

#[test]
fn transaction_quotas_enospc() {
    let cfg = Config {
        quotas: Quotas {
            transactions: 2,
            transaction_nodes: 3,
            ..Quotas::default()
        },
        ..Config::default()
    };
    let mut r = Rig::with(Engine::new(cfg));
    let s = r.sock();
    r.ok_write(s, "/local/domain/5", "");
    r.ok_perms(s, "/local/domain/5", &["n5"]);
    let d = r.dom(5);
    let t1 = r.start(d);
    r.start(d);
    assert_eq!(
        r.req(d, MsgType::TransactionStart, 0, b"\0").0,
        err("ENOSPC")
    );
    assert_eq!(r.write(d, t1, "a", "1").0, ok());
    assert_eq!(r.write(d, t1, "b", "1").0, ok());
    assert_eq!(r.write(d, t1, "c", "1").0, err("ENOSPC"));
    assert_eq!(r.end(d, t1, true).0, ok());
    assert_eq!(r.read(s, 0, "/local/domain/5/b"), val("1"));
    assert_eq!(r.read(s, 0, "/local/domain/5/c"), err("ENOENT"));
}

#[test]
fn rm_in_transaction_fires_on_commit() {
    let mut r = Rig::new();
    let c = r.sock();
    r.ok_write(c, "/z/a", "1");
    let w = r.sock();
    r.ok_watch(w, "/z", "t");
    let tx = r.start(c);
    assert!(r.rm(c, tx, "/z").1.is_empty());
    assert_eq!(r.read(c, 0, "/z/a"), val("1"));
    let (rep, evs) = r.end(c, tx, true);
    assert_eq!(rep, ok());
    assert!(evs_for(&evs, w).contains(&pt("/z", "t")));
    assert_eq!(r.read(c, 0, "/z"), err("ENOENT"));
    r.e.check().unwrap();
}

// ---- QUOTAS --------------------------------------------------------------------------------

#[test]
fn node_quota_and_node_size_enospc_for_unprivileged_only() {
    let mut cfg = Config::default();
    cfg.quotas.nodes = 3;
    cfg.quotas.node_size = 100;
    let mut r = Rig::with(Engine::new(cfg));
    let s = r.sock();
    r.ok_write(s, "/local/domain/5", "");
    r.ok_perms(s, "/local/domain/5", &["n5"]);
    let d = r.dom(5);
    // /local/domain/5 counts as one owned node already.
    assert_eq!(r.write(d, 0, "a", "1").0, ok());
    assert_eq!(r.write(d, 0, "b", "1").0, ok());
    assert_eq!(r.write(d, 0, "c", "1").0, err("ENOSPC"));
    assert_eq!(r.write(d, 0, "a", &"x".repeat(200)).0, err("ENOSPC"));
    assert_eq!(r.read(d, 0, "a"), val("1"));
    r.ok_write(s, "/local/domain/5/big", &"x".repeat(2000));
    assert_eq!(r.e.nodes_owned(5), 4);
    r.e.check().unwrap();
}

#[test]
fn path_max_applies_to_unprivileged_below_home() {
    let mut cfg = Config::default();
    cfg.quotas.path_max = 10;
    let mut r = Rig::with(Engine::new(cfg));
    let s = r.sock();
    r.ok_write(s, "/local/domain/5", "");
    r.ok_perms(s, "/local/domain/5", &["n5"]);
    let d = r.dom(5);
    assert_eq!(r.write(d, 0, "0123456789", "1").0, ok());
    assert_eq!(r.write(d, 0, "0123456789a", "1").0, err("EINVAL"));
    r.ok_write(s, "/local/domain/5/0123456789abcdef", "1");
}

// ---- DOMAINS -------------------------------------------------------------------------------

#[test]
fn introduce_release_and_special_watches() {
    let mut r = Rig::new();
    let s = r.sock();
    r.ok_watch(s, "@introduceDomain", "in");
    r.ok_watch(s, "@releaseDomain", "out");
    let is_intro = |r: &mut Rig, d: &str| r.req(s, MsgType::IsDomainIntroduced, 0, &z(d)).0;
    assert_eq!(is_intro(&mut r, "9"), Ok(b"F\0".to_vec()));
    let (rep, evs, fx) = r.raw(
        s,
        MsgType::Introduce.as_u32(),
        0,
        &[z("9"), z("-1234"), z("17")].concat(),
    );
    assert_eq!(rep, ok());
    assert_eq!(evs_for(&evs, s), vec![pt("@introduceDomain", "in")]);
    assert_eq!(
        fx,
        vec![Effect::Introduce {
            domid: 9,
            gfn: -1234,
            port: 17
        }]
    );
    assert_eq!(is_intro(&mut r, "9"), Ok(b"T\0".to_vec()));
    assert_eq!(is_intro(&mut r, "32752"), Ok(b"T\0".to_vec()), "DOMID_SELF");
    assert_eq!(r.req(s, MsgType::Resume, 0, &z("9")).0, ok());
    // Nodes the domain owns go on release.
    r.ok_write(s, "/local/domain/9/x", "");
    r.ok_perms(s, "/local/domain/9", &["n9"]);
    r.ok_write(s, "/keep", "");
    let (rep, evs, fx) = r.raw(s, MsgType::Release.as_u32(), 0, &z("9"));
    assert_eq!(rep, ok());
    assert!(evs_for(&evs, s).contains(&pt("@releaseDomain", "out")));
    assert!(fx.contains(&Effect::Release { domid: 9 }));
    assert_eq!(r.read(s, 0, "/local/domain/9"), err("ENOENT"));
    assert_eq!(r.read(s, 0, "/keep"), val(""));
    assert_eq!(is_intro(&mut r, "9"), Ok(b"F\0".to_vec()));
    r.e.check().unwrap();
}

#[test]
fn domain_message_error_paths() {
    let mut r = Rig::new();
    let s = r.sock();
    let d = r.dom(5);
    for ty in [
        MsgType::Introduce,
        MsgType::Release,
        MsgType::IsDomainIntroduced,
        MsgType::Resume,
        MsgType::SetTarget,
        MsgType::Control,
    ] {
        assert_eq!(r.req(d, ty, 0, &z("1")).0, err("EACCES"), "{ty:?}");
    }
    assert_eq!(
        r.req(s, MsgType::Introduce, 0, &[z("9"), z("1")].concat())
            .0,
        err("EINVAL")
    );
    assert_eq!(
        r.req(s, MsgType::Introduce, 0, &[z("9"), z("1"), z("0")].concat())
            .0,
        err("EINVAL")
    );
    assert_eq!(
        r.req(s, MsgType::Introduce, 0, &[z("x"), z("1"), z("3")].concat())
            .0,
        err("EINVAL")
    );
    assert_eq!(r.req(s, MsgType::Release, 0, &z("0")).0, err("EINVAL"));
    assert_eq!(r.req(s, MsgType::Release, 0, &z("44")).0, err("ENOENT"));
    assert_eq!(r.req(s, MsgType::Resume, 0, &z("44")).0, err("ENOENT"));
    assert_eq!(
        r.req(s, MsgType::SetTarget, 0, &[z("5"), z("44")].concat())
            .0,
        err("ENOENT")
    );
    assert_eq!(r.req(s, MsgType::SetTarget, 0, &z("5")).0, err("EINVAL"));
    assert_eq!(
        r.req(s, MsgType::GetDomainPath, 0, &z("abc")).0,
        err("EINVAL")
    );
}

#[test]
fn get_domain_path_for_anyone() {
    let mut r = Rig::new();
    let d = r.dom(5);
    assert_eq!(
        r.req(d, MsgType::GetDomainPath, 0, &z("12")).0,
        Ok(z("/local/domain/12"))
    );
}

#[test]
fn set_target_gives_the_targets_access() {
    let mut r = Rig::new();
    let s = r.sock();
    let stub = r.dom(20);
    r.dom(21);
    r.ok_write(s, "/local/domain/21/k", "v");
    r.ok_perms(s, "/local/domain/21/k", &["n21"]);
    assert_eq!(r.read(stub, 0, "/local/domain/21/k"), err("EACCES"));
    assert_eq!(
        r.req(s, MsgType::SetTarget, 0, &[z("20"), z("21")].concat())
            .0,
        ok()
    );
    assert_eq!(r.read(stub, 0, "/local/domain/21/k"), val("v"));
}

#[test]
fn release_closes_the_domains_connections() {
    let mut r = Rig::new();
    let s = r.sock();
    let d = r.dom(7);
    let (_, _, fx) = r.raw(s, MsgType::Release.as_u32(), 0, &z("7"));
    assert!(fx.contains(&Effect::Close(d)));
    assert_eq!(
        r.e.handle(
            d,
            &shared_abi::xenstore::Message {
                header: Default::default(),
                payload: vec![]
            }
        )
        .sends
        .len(),
        0
    );
}

// ---- CONTROL / unknown ---------------------------------------------------------------------------

#[test]
fn control_subset() {
    let mut r = Rig::new();
    let s = r.sock();
    let help = r.req(s, MsgType::Control, 0, &z("help")).0.unwrap();
    assert!(String::from_utf8_lossy(&help).contains("quota"));
    assert_eq!(r.req(s, MsgType::Control, 0, &z("check")).0, ok());
    let (rep, _, fx) = r.raw(s, 0, 0, &[z("print"), z("hi")].concat());
    assert_eq!(rep, ok());
    assert_eq!(fx, vec![Effect::Log("hi".into())]);
    let q = String::from_utf8(r.req(s, MsgType::Control, 0, &z("quota")).0.unwrap()).unwrap();
    assert!(q.contains("nodes") && q.contains("1000"), "{q}");
    assert_eq!(
        r.req(
            s,
            MsgType::Control,
            0,
            &[z("quota"), z("set"), z("nodes"), z("5")].concat()
        )
        .0,
        ok()
    );
    assert_eq!(r.e.config().quotas.nodes, 5);
    assert_eq!(
        r.req(
            s,
            MsgType::Control,
            0,
            &[z("quota"), z("set"), z("bogus"), z("5")].concat()
        )
        .0,
        err("EINVAL")
    );
    assert_eq!(
        r.req(
            s,
            MsgType::Control,
            0,
            &[z("quota"), z("set"), z("nodes"), z("0")].concat()
        )
        .0,
        err("EINVAL")
    );
    let d0 = String::from_utf8(
        r.req(s, MsgType::Control, 0, &[z("quota"), z("0")].concat())
            .0
            .unwrap(),
    )
    .unwrap();
    assert!(d0.starts_with("Domain 0:"), "{d0}");
    assert_eq!(
        r.req(s, MsgType::Control, 0, &[z("quota"), z("77")].concat())
            .0,
        err("ENOENT")
    );
    assert_eq!(
        r.req(s, MsgType::Control, 0, &z("frobnicate")).0,
        err("EINVAL")
    );
    assert_eq!(r.req(s, MsgType::Control, 0, b"").0, err("EINVAL"));
}

#[test]
fn unknown_and_server_only_types_are_enosys() {
    let mut r = Rig::new();
    let s = r.sock();
    for ty in [15u32, 16, 20, 23, 24, 25, 26, 27, 0xFFFF, u32::MAX] {
        assert_eq!(r.raw(s, ty, 0, b"").0, err("ENOSYS"), "type {ty}");
    }
}
