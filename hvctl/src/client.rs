//! The client side of the management channel: one request at a time, matched to its
//! response by id, with a deadline.
//!
//! Invariant: a reply whose id is not the outstanding request's is dropped (a late answer to
//! a request we gave up on), except id 0, which the server uses for errors about frames it
//! could not attribute (version mismatch, undecodable payload) and which answers the
//! outstanding request. Garbage and corrupted frames are skipped; the deadline bounds the
//! wait.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use shared_abi::mgmt::{
    self, FrameDecoder, FrameError, MgmtError, Reply, Request, RequestBody, UNATTRIBUTED_ID,
};

/// Bytes written between two progress reports.
pub const PROGRESS_CHUNK: usize = 4096;
/// How often [`Client::call_waiting`] reports that it is still waiting.
pub const TICK: Duration = Duration::from_secs(1);

/// Why a call did not get an answer from ctl-dom.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("system not reachable at {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("system not reachable: {0}")]
    Io(#[from] io::Error),
    #[error("system not reachable: no answer within {0:?}")]
    Timeout(Duration),
    #[error("system not reachable: the channel closed")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(FrameError),
    /// ctl-dom answered with an error.
    #[error("{0}")]
    Server(MgmtError),
}

/// A connection to ctl-dom.
pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
    next_id: u32,
    timeout: Duration,
}

impl Client {
    /// Connect to the unix socket `cargo hv run` printed.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::over(stream, timeout))
    }

    /// Use an already connected stream (tests pass one end of a socket pair).
    pub fn over(stream: UnixStream, timeout: Duration) -> Self {
        Client {
            stream,
            decoder: FrameDecoder::new(),
            next_id: 1,
            timeout,
        }
    }

    /// Send one request and wait for its answer.
    pub fn call(&mut self, body: RequestBody) -> Result<Reply, ClientError> {
        self.call_with_progress(body, &mut |_, _| {})
    }

    /// [`Client::call`], telling `progress(sent, total)` how much of the frame has been
    /// handed to the channel, in [`PROGRESS_CHUNK`] steps (long transfers: a kernel).
    pub fn call_with_progress(
        &mut self,
        body: RequestBody,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Reply, ClientError> {
        self.exchange(body, progress, self.timeout, &mut |_| {})
    }

    /// [`Client::call`] for a request the server may take long to answer (a detach waiting
    /// for the guest): the answer may take `wait` instead of the connection's timeout, and
    /// `tick(elapsed)` runs about every [`TICK`] while none has come.
    pub fn call_waiting(
        &mut self,
        body: RequestBody,
        wait: Duration,
        tick: &mut dyn FnMut(Duration),
    ) -> Result<Reply, ClientError> {
        self.exchange(body, &mut |_, _| {}, wait, tick)
    }

    fn exchange(
        &mut self,
        body: RequestBody,
        progress: &mut dyn FnMut(usize, usize),
        wait: Duration,
        tick: &mut dyn FnMut(Duration),
    ) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let frame = mgmt::encode_request(&Request { id, body }).map_err(ClientError::Protocol)?;
        let mut sent = 0;
        for chunk in frame.chunks(PROGRESS_CHUNK) {
            self.stream.write_all(chunk)?;
            sent += chunk.len();
            progress(sent, frame.len());
        }
        self.stream.flush()?;
        let start = Instant::now();
        let deadline = start + wait;
        let mut buf = [0u8; 4096];
        loop {
            while let Some(f) = self.decoder.next_frame() {
                let payload = match f {
                    Ok(p) => p,
                    // Noise on the line: skip and keep waiting for our answer.
                    Err(FrameError::Garbage { .. } | FrameError::Checksum { .. }) => continue,
                    Err(e) => return Err(ClientError::Protocol(e)),
                };
                let resp = mgmt::decode_response(&payload).map_err(ClientError::Protocol)?;
                if resp.id != id && resp.id != UNATTRIBUTED_ID {
                    continue;
                }
                return resp.result.map_err(ClientError::Server);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(wait));
            }
            self.stream.set_read_timeout(Some(left.min(TICK)))?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.decoder.push(&buf[..n]),
                // Still waiting: the deadline is checked above.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    tick(start.elapsed());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
