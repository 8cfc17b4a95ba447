//! `Engine::release_domain`: what the service domain calls when the hypervisor reports a
//! domain dead (no `RELEASE` request is involved).

use shared_abi::xenstore::{Header, Message, MsgType};
use xenstore_dom::{ConnId, Effect, Engine, Output};

fn req(e: &mut Engine, c: ConnId, ty: MsgType, args: &[&str]) -> Output {
    let mut payload = Vec::new();
    for a in args {
        payload.extend_from_slice(a.as_bytes());
        payload.push(0);
    }
    let msg = Message {
        header: Header {
            msg_type: ty.as_u32(),
            req_id: 1,
            tx_id: 0,
            len: payload.len() as u32,
        },
        payload,
    };
    e.handle(c, &msg)
}

#[test]
fn release_domain_closes_its_connection_removes_its_nodes_and_fires_release_watches() {
    let mut e = Engine::default();
    let tool = e.connect_socket();
    req(&mut e, tool, MsgType::Mkdir, &["/local/domain/5"]);
    req(&mut e, tool, MsgType::SetPerms, &["/local/domain/5", "n5"]);
    let (dom, _) = e.connect_domain(5);
    req(&mut e, dom, MsgType::Write, &["data", "v"]);
    req(&mut e, tool, MsgType::Watch, &["@releaseDomain", "tok"]);
    assert!(e.nodes_owned(5) >= 2);

    let out = e.release_domain(5);

    assert!(out.effects.contains(&Effect::Close(dom)));
    assert!(out.effects.contains(&Effect::Release { domid: 5 }));
    assert!(
        out.sends
            .iter()
            .any(|s| s.conn == tool && s.bytes.windows(14).any(|w| w == b"@releaseDomain"))
    );
    assert_eq!(e.nodes_owned(5), 0);
    let r = req(&mut e, tool, MsgType::Read, &["/local/domain/5/data"]);
    assert!(r.sends[0].bytes.windows(6).any(|w| w == b"ENOENT"));
    e.check().unwrap();
}

#[test]
fn release_domain_of_an_unknown_domain_changes_nothing() {
    let mut e = Engine::default();
    let before = e.node_count();
    assert_eq!(e.release_domain(9), Output::default());
    assert_eq!(e.release_domain(0), Output::default());
    assert_eq!(e.node_count(), before);
}
