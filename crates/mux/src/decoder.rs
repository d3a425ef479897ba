//! Streaming frame decoder: arbitrary byte chunks in, whole frames out.
//!
//! A frame that lies entirely inside the input chunk is parsed in place and only a `DATA`/`AUTH`
//! payload is copied (once, into its own [`Bytes`](bytes::Bytes)); a frame split across chunks is gathered in a
//! buffer sized from its already-validated header. Nothing is allocated for a frame whose header is
//! invalid, so a hostile peer cannot make the decoder reserve more than [`MAX_PAYLOAD`] bytes.
//!
//! [`MAX_PAYLOAD`]: crate::frame::MAX_PAYLOAD

use bytes::BytesMut;

use crate::frame::{Frame, FrameError, FrameType, Header, HEADER_LEN};

/// Incremental decoder for the carrier byte stream.
#[derive(Debug, Default)]
pub struct Decoder {
    header: [u8; HEADER_LEN],
    header_len: usize,
    partial: Option<Partial>,
    failed: Option<FrameError>,
}

#[derive(Debug)]
struct Partial {
    header: Header,
    ty: FrameType,
    buf: BytesMut,
}

impl Decoder {
    /// A decoder at a frame boundary.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Decode the next frame from `input`, advancing it past the consumed bytes.
    ///
    /// Returns `Ok(None)` when `input` is exhausted before a frame completes (the partial frame is kept).
    /// After an error the decoder stays failed: the byte stream has no resynchronisation point.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, FrameError> {
        self.decode_checked(input, |_, _| Ok::<(), FrameError>(()))
    }

    /// Whether the decoder sits between frames (no partial header or payload buffered).
    pub fn is_at_boundary(&self) -> bool {
        self.header_len == 0 && self.partial.is_none()
    }

    /// Like [`Decoder::decode`], but `check` sees every valid header before its payload is buffered,
    /// so the session can refuse a frame (unknown stream, window exceeded) without allocating.
    pub(crate) fn decode_checked<E: From<FrameError>>(
        &mut self,
        input: &mut &[u8],
        mut check: impl FnMut(FrameType, &Header) -> Result<(), E>,
    ) -> Result<Option<Frame>, E> {
        if let Some(e) = &self.failed {
            return Err(e.clone().into());
        }
        if self.partial.is_none() {
            let header = if self.header_len == 0 && input.len() >= HEADER_LEN {
                let (h, rest) = input.split_at(HEADER_LEN);
                *input = rest;
                Header::decode(h.try_into().expect("split at HEADER_LEN"))
            } else {
                let take = (HEADER_LEN - self.header_len).min(input.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&input[..take]);
                self.header_len += take;
                *input = &input[take..];
                if self.header_len < HEADER_LEN {
                    return Ok(None);
                }
                self.header_len = 0;
                Header::decode(&self.header)
            };
            let ty = match header.validate() {
                Ok(ty) => ty,
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e.into());
                }
            };
            check(ty, &header)?;
            let len = header.length as usize;
            if input.len() >= len {
                let (p, rest) = input.split_at(len);
                *input = rest;
                return self.finish(Frame::parse_slice(ty, &header, p));
            }
            self.partial = Some(Partial {
                header,
                ty,
                buf: BytesMut::with_capacity(len),
            });
        }
        let Some(p) = self.partial.as_mut() else {
            return Ok(None);
        };
        let need = p.header.length as usize - p.buf.len();
        let take = need.min(input.len());
        p.buf.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if take < need {
            return Ok(None);
        }
        let p = self.partial.take().expect("partial frame present");
        self.finish(Frame::parse(p.ty, &p.header, p.buf.freeze()))
    }

    fn finish<E: From<FrameError>>(
        &mut self,
        r: Result<Frame, FrameError>,
    ) -> Result<Option<Frame>, E> {
        match r {
            Ok(f) => Ok(Some(f)),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e.into())
            }
        }
    }
}

/// Convenience for tests and tools: decode every complete frame in `bytes`.
pub fn decode_all(mut bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    while let Some(f) = d.decode(&mut bytes)? {
        out.push(f);
    }
    Ok(out)
}
