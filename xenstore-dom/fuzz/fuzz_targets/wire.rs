//! Fuzz the wire parser and the engine behind it: arbitrary bytes from a privileged and an
//! unprivileged connection must never panic, and the store must stay consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared_abi::xenstore::MessageDecoder;
use xenstore_dom::Engine;

fuzz_target!(|data: &[u8]| {
    let mut e = Engine::default();
    let tools = e.connect_socket();
    let (dom, _) = e.connect_domain(3);
    let (left, right) = data.split_at(data.len() / 2);
    for (conn, bytes) in [(tools, left), (dom, right)] {
        let mut dec = MessageDecoder::new();
        let Ok(msgs) = dec.feed(bytes) else { continue };
        for m in msgs {
            let out = e.handle(conn, &m);
            for s in out.sends {
                assert!(s.bytes.len() <= 16 + 4096);
            }
        }
    }
    assert!(e.check().is_ok());
});
