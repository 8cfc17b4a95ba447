//! The fuzz target's property in the normal test run: random bytes through the decoder and
//! the engine, from a privileged and an unprivileged connection, never panic, every reply
//! fits the protocol, and the store stays consistent.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use shared_abi::xenstore::{self, Header, MessageDecoder, MsgType};
use xenstore_dom::Engine;

fn framed() -> impl Strategy<Value = Vec<u8>> {
    // Mostly well-framed messages of any type with random payloads (so the engine, not just
    // the framer, sees them), sometimes raw noise.
    let msg = (
        0u32..30,
        any::<u32>(),
        prop_oneof![Just(0u32), 1u32..3],
        proptest::collection::vec(
            prop_oneof![
                Just(0u8),
                Just(b'/'),
                Just(b'a'),
                Just(b'@'),
                Just(b'1'),
                any::<u8>()
            ],
            0..40,
        ),
    )
        .prop_map(|(t, r, tx, p)| {
            let mut v = Header {
                msg_type: t,
                req_id: r,
                tx_id: tx,
                len: p.len() as u32,
            }
            .to_bytes()
            .to_vec();
            v.extend(p);
            v
        });
    prop_oneof![8 => msg, 1 => proptest::collection::vec(any::<u8>(), 0..64)]
}

proptest! {
    #[test]
    fn random_bytes_never_break_the_engine(chunks in proptest::collection::vec((any::<bool>(), framed()), 0..40)) {
        let mut e = Engine::default();
        let tools = e.connect_socket();
        let (dom, _) = e.connect_domain(3);
        let mut decs = [MessageDecoder::new(), MessageDecoder::new()];
        for (privileged, bytes) in chunks {
            let (conn, dec) = if privileged { (tools, &mut decs[0]) } else { (dom, &mut decs[1]) };
            let Ok(msgs) = dec.feed(&bytes) else { continue };
            for m in msgs {
                let out = e.handle(conn, &m);
                let mut replies = 0;
                for s in &out.sends {
                    let got = MessageDecoder::new().feed(&s.bytes).unwrap();
                    prop_assert_eq!(got.len(), 1);
                    prop_assert!(got[0].payload.len() <= xenstore::PAYLOAD_MAX);
                    if s.conn == conn && got[0].header.msg_type != MsgType::WatchEvent.as_u32() {
                        replies += 1;
                        prop_assert_eq!(got[0].header.req_id, m.header.req_id);
                    }
                }
                prop_assert_eq!(replies, 1);
            }
        }
        prop_assert!(e.check().is_ok(), "{:?}", e.check());
    }
}
