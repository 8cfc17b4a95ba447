//! `hvctl console <dom>`: a domain's console history, then its live output, with input.
//!
//! Interactive (stdin is a terminal): the terminal goes into raw mode, every keystroke goes
//! to the domain's console input as it is typed (Ctrl-C included: it is the domain's), and
//! Ctrl-] (0x1d, as in `xl console`) detaches; the terminal is restored however the command
//! ends. Not a terminal (a pipe, a file, a test's reader): the bytes are forwarded as they
//! are, without raw mode, and the command detaches at end of input once the domain's output
//! has been quiet for [`DRAIN_QUIET`] (at most [`DRAIN_MAX`] after the end of input), so
//! `printf 'ls\nquit\n' | hvctl console guest` shows the answers. A 0x1d byte detaches
//! there too. `--no-follow` prints the history and reads no input.
//!
//! Input travels as `ConsoleWrite` requests; the domain's input buffer is bounded (1 KiB in
//! the hypervisor), so what it does not take yet is kept and resent: nothing is dropped.
//! Output is polled with `ConsoleRead` every [`POLL`] (sooner when typing).

use std::io::{IsTerminal, Read, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use shared_abi::mgmt::{DomainRef, MAX_CHUNK, MgmtError, Reply, RequestBody};

use crate::client::{Client, ClientError};
use crate::{Failure, unexpected};

/// The detach key: Ctrl-] (as `xl console`).
pub const DETACH: u8 = 0x1d;
/// Output poll interval when nothing is happening.
pub const POLL: Duration = Duration::from_millis(100);
/// After the end of (non-terminal) input: detach once output has been quiet this long...
pub const DRAIN_QUIET: Duration = Duration::from_millis(1500);
/// ...or this long after the end of input, whichever comes first.
pub const DRAIN_MAX: Duration = Duration::from_secs(10);
/// Give up when the domain takes none of the input for this long after the end of input.
pub const STUCK: Duration = Duration::from_secs(10);

/// Where console input comes from.
pub enum Input {
    /// The process's stdin: raw mode when it is a terminal, else forwarded until EOF.
    Stdin,
    /// A reader (tests, scripts): forwarded until EOF, never raw mode.
    Reader(Box<dyn Read + Send>),
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Stdin => write!(f, "Input::Stdin"),
            Input::Reader(_) => write!(f, "Input::Reader(..)"),
        }
    }
}

/// Raw mode for as long as it lives.
struct RawMode;

impl RawMode {
    fn enable() -> std::io::Result<Self> {
        crossterm::terminal::enable_raw_mode()?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// Read `r` on a thread; each read arrives on the channel, which closes at EOF.
fn spawn_reader(mut r: Box<dyn Read + Send>) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    rx
}

/// Add typed `bytes` to `pending` up to the detach key; whether it was seen.
pub fn absorb(pending: &mut Vec<u8>, bytes: &[u8]) -> bool {
    match bytes.iter().position(|&b| b == DETACH) {
        Some(i) => {
            pending.extend_from_slice(&bytes[..i]);
            true
        }
        None => {
            pending.extend_from_slice(bytes);
            false
        }
    }
}

/// Output for a raw-mode terminal: a `\n` not preceded by `\r` becomes `\r\n` (raw mode
/// turns the terminal's own translation off). `last_cr` carries across chunks.
pub fn to_crlf(data: &[u8], last_cr: &mut bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + data.len() / 16);
    for &b in data {
        if b == b'\n' && !*last_cr {
            v.push(b'\r');
        }
        v.push(b);
        *last_cr = b == b'\r';
    }
    v
}

/// What one output poll gave.
#[derive(Debug, PartialEq, Eq)]
enum Polled {
    Data,
    Empty,
    /// The domain is gone (after it had printed something: the normal end of following).
    Gone,
}

struct Output<'a> {
    dom: DomainRef,
    from: u64,
    out: &'a mut dyn Write,
    /// `Some(last byte was \r)` in raw mode.
    crlf: Option<bool>,
}

impl Output<'_> {
    fn poll(&mut self, c: &mut Client) -> Result<Polled, Failure> {
        let r = c.call(RequestBody::ConsoleRead {
            dom: self.dom.clone(),
            from: self.from,
        });
        match r {
            Ok(Reply::Chunk { next, lost, data }) => {
                if lost > 0 {
                    let msg = format!("[{lost} bytes of console output were lost]\n");
                    self.write(msg.as_bytes())?;
                }
                self.write(&data)?;
                self.from = next;
                Ok(if data.is_empty() {
                    Polled::Empty
                } else {
                    Polled::Data
                })
            }
            Err(ClientError::Server(MgmtError::UnknownDomain(_))) if self.from > 0 => {
                Ok(Polled::Gone)
            }
            Ok(r) => Err(unexpected(&r)),
            Err(e) => Err(e.into()),
        }
    }

    fn write(&mut self, data: &[u8]) -> Result<(), Failure> {
        match &mut self.crlf {
            Some(cr) => self.out.write_all(&to_crlf(data, cr))?,
            None => self.out.write_all(data)?,
        }
        self.out.flush()?;
        Ok(())
    }
}

/// `hvctl console`: see the module documentation.
pub(crate) fn console(
    c: &mut Client,
    dom: DomainRef,
    follow: bool,
    input: Input,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Failure> {
    let mut o = Output {
        dom: dom.clone(),
        from: 0,
        out,
        crlf: None,
    };
    // The history first (this also finds out whether the domain exists, before the
    // terminal is touched).
    loop {
        match o.poll(c)? {
            Polled::Data => {}
            Polled::Empty => break,
            Polled::Gone => return Ok(()),
        }
    }
    if !follow {
        return Ok(());
    }
    let (reader, raw): (Box<dyn Read + Send>, bool) = match input {
        Input::Stdin => {
            let tty = std::io::stdin().is_terminal();
            (Box::new(std::io::stdin()), tty)
        }
        Input::Reader(r) => (r, false),
    };
    let _raw = if raw {
        let g = RawMode::enable().map_err(|e| Failure {
            status: crate::exit::FAILED,
            message: format!("console: cannot put the terminal in raw mode: {e}"),
        })?;
        let _ = write!(err, "[console of domain {dom}: detach with Ctrl-]]\r\n");
        o.crlf = Some(false);
        Some(g)
    } else {
        None
    };
    let rx = spawn_reader(reader);
    let mut pending: Vec<u8> = Vec::new();
    let (mut eof, mut detach) = (false, false);
    let mut eof_at: Option<Instant> = None;
    let mut last_output = Instant::now();
    let mut last_taken = Instant::now();
    loop {
        // 1. What was typed.
        while !eof && !detach {
            match rx.try_recv() {
                Ok(b) => detach = absorb(&mut pending, &b),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => eof = true,
            }
        }
        if eof && eof_at.is_none() {
            eof_at = Some(Instant::now());
        }
        // 2. Send it: what the domain does not take yet stays pending.
        let mut busy = false;
        if !pending.is_empty() {
            let n = pending.len().min(MAX_CHUNK);
            match c.call(RequestBody::ConsoleWrite {
                dom: dom.clone(),
                data: pending[..n].to_vec(),
            }) {
                Ok(Reply::Written { accepted }) => {
                    let a = (accepted as usize).min(n);
                    pending.drain(..a);
                    if a > 0 {
                        busy = true;
                        last_taken = Instant::now();
                    }
                }
                Err(ClientError::Server(MgmtError::UnknownDomain(_))) => break,
                Ok(r) => return Err(unexpected(&r)),
                Err(e) => return Err(e.into()),
            }
        }
        // 3. Its output.
        match o.poll(c)? {
            Polled::Data => {
                busy = true;
                last_output = Instant::now();
            }
            Polled::Empty => {}
            Polled::Gone => break,
        }
        // 4. The end?
        if detach && pending.is_empty() {
            break;
        }
        if let Some(at) = eof_at {
            let now = Instant::now();
            if pending.is_empty() {
                let quiet = now.duration_since(last_output.max(last_taken));
                if quiet >= DRAIN_QUIET || now.duration_since(at) >= DRAIN_MAX {
                    break;
                }
            } else if now.duration_since(last_taken.max(at)) >= STUCK {
                return Err(Failure {
                    status: crate::exit::FAILED,
                    message: format!(
                        "console: domain {dom} took no input for {} s ({} bytes not delivered)",
                        STUCK.as_secs(),
                        pending.len()
                    ),
                });
            }
        }
        // 5. Wait: for a keystroke (answered at once) or the next poll.
        if !busy {
            if eof || detach {
                std::thread::sleep(POLL);
            } else {
                match rx.recv_timeout(POLL) {
                    Ok(b) => detach = absorb(&mut pending, &b),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => eof = true,
                }
            }
        }
    }
    if raw {
        let _ = o.out.write_all(b"\r\n");
        let _ = o.out.flush();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detach_key_ends_input_and_is_not_sent() {
        let mut p = Vec::new();
        assert!(!absorb(&mut p, b"ls\r"));
        assert!(absorb(&mut p, b"ab\x1dcd"));
        assert_eq!(p, b"ls\rab");
        let mut p = Vec::new();
        assert!(absorb(&mut p, b"\x1d"));
        assert!(p.is_empty());
    }

    #[test]
    fn raw_output_gets_carriage_returns_once() {
        let mut cr = false;
        assert_eq!(to_crlf(b"a\nb\r\nc\r", &mut cr), b"a\r\nb\r\nc\r");
        assert!(cr);
        assert_eq!(to_crlf(b"\nx\n", &mut cr), b"\nx\r\n", "CR carried over");
        assert!(!cr);
    }
}
