//! The byte-stream side of the management channel: frames in, frames out.
//!
//! Invariant: every complete, decodable request gets exactly one response with its id;
//! frames of another version or with an undecodable payload get one id-0 error; garbage and
//! corrupted frames get no answer (the client's deadline covers them).

use alloc::vec::Vec;

use shared_abi::mgmt::{self, FrameDecoder, Response};

use crate::{Platform, Toolstack};

/// A toolstack behind a frame decoder.
pub struct Server<P: Platform> {
    pub toolstack: Toolstack<P>,
    decoder: FrameDecoder,
}

impl<P: Platform> Server<P> {
    pub fn new(platform: P) -> Self {
        Server {
            toolstack: Toolstack::new(platform),
            decoder: FrameDecoder::new(),
        }
    }

    /// Feed bytes read from the channel; returns the bytes to write back.
    pub fn receive(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.decoder.push(bytes);
        let mut out = Vec::new();
        while let Some(f) = self.decoder.next_frame() {
            let resp = match f.and_then(|p| mgmt::decode_request(&p)) {
                Ok(req) => Some(Response {
                    id: req.id,
                    result: self.toolstack.handle(req.body),
                }),
                Err(e) => mgmt::error_reply(&e),
            };
            // Our own responses always fit a frame: chunks and lists are bounded.
            if let Some(frame) = resp.and_then(|r| mgmt::encode_response(&r).ok()) {
                out.extend_from_slice(&frame);
            }
        }
        out
    }
}
