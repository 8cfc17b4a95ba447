//! What hvctl's integration tests share: running hvctl against a fake server (ctl-dom's
//! engine over the in-memory platform) on one end of a unix socket pair, speaking the real
//! framed protocol. Each test file (`mod common;`) uses part of it.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use clap::Parser;
use hvctl::client::{Client, ClientError};
use hvctl::console::Input;
use hvctl::{Cli, run_with_input};

/// Serve one connection until the client hangs up: each batch of bytes read goes to
/// `answer` (a `Server::receive`, with whatever the test does around it) and what it
/// returns is written back.
pub fn serve(mut s: UnixStream, mut answer: impl FnMut(&[u8]) -> Vec<u8>) {
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let out = answer(&buf[..n]);
                if s.write_all(&out).is_err() {
                    return;
                }
            }
        }
    }
}

/// Run `hvctl <args>` with console `input` against `server`, which gets the other end of
/// the socket pair on a thread of its own; (status, stdout, stderr).
pub fn hv_over(
    args: &[&str],
    input: Input,
    server: impl FnOnce(UnixStream) + Send + 'static,
) -> (i32, String, String) {
    let mut argv = vec!["hvctl"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || server(b));
    let mut a = Some(a);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = {
        let mut connect =
            |_: Option<&std::path::Path>, to: Duration| -> Result<Client, ClientError> {
                Ok(Client::over(a.take().unwrap(), to))
            };
        run_with_input(cli, &mut connect, input, &mut out, &mut err)
    };
    // Hang up if the command never connected, so the server thread ends.
    drop(a);
    t.join().unwrap();
    (
        status,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

/// Run `hvctl <args>` where connecting is a bug (`why` says which): a command refused
/// before it reaches the system; (status, stderr).
pub fn hv_offline(args: &[&str], why: &str) -> (i32, String) {
    let cli = Cli::try_parse_from([&["hvctl"][..], args].concat()).unwrap();
    let mut connect = |_: Option<&std::path::Path>, _: Duration| -> Result<Client, ClientError> {
        panic!("{why}")
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = run_with_input(cli, &mut connect, Input::Stdin, &mut out, &mut err);
    (status, String::from_utf8(err).unwrap())
}
