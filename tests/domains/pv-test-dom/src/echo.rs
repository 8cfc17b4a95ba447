//! `role=echo`: the console-input guest. Binds `VIRQ_CONSOLE`, prints `echo: ready`, then
//! for every line typed on its console (`hvctl console`) prints `echo: <line>`, until a line
//! reads `quit`: it prints `RESULT <name> pass echoed <n> lines` and powers off.

use dom_rt::StartInfo;
use dom_rt::console::{Input, LineBuffer};
use dom_rt::event::Waiter;
use dom_rt::println;

pub fn run(si: &StartInfo) {
    let name = si.name();
    let mut input = match Input::new() {
        Ok(i) => i,
        Err(e) => {
            println!("RESULT {name} fail binding VIRQ_CONSOLE: {e:?}");
            return;
        }
    };
    println!("echo: ready");
    let mut waiter = Waiter::new();
    let mut lines = LineBuffer::<200>::default();
    let mut buf = [0u8; 256];
    let (mut n, mut quit) = (0u32, false);
    while !quit {
        let got = match input.read_blocking(&mut waiter, &mut buf) {
            Ok(got) => got,
            Err(e) => {
                println!("RESULT {name} fail reading console input: {e:?}");
                return;
            }
        };
        lines.feed(&buf[..got], |l| {
            if quit {
                return;
            }
            let text = core::str::from_utf8(l).unwrap_or("<not UTF-8>");
            if text.trim() == "quit" {
                quit = true;
                return;
            }
            n += 1;
            println!("echo: {text}");
        });
    }
    println!("RESULT {name} pass echoed {n} lines");
}
