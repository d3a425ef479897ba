//! [`Transmit`]: carrier bytes as a list of chunks, for a vectored write without copying stream
//! payloads a second time.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

/// What [`crate::Session::poll_transmit`] and [`crate::Session::poll_transmit_chunks`] append to.
pub(crate) trait Sink {
    /// Bytes appended so far (and not yet consumed).
    fn len(&self) -> usize;
    /// Appends a copy of `data` (frame headers, control frames).
    fn put_slice(&mut self, data: &[u8]);
    /// Appends the first `len` bytes of `buf` and removes them from it.
    fn put_from(&mut self, buf: &mut BytesMut, len: usize);
}

impl Sink for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn put_slice(&mut self, data: &[u8]) {
        self.extend_from_slice(data);
    }

    fn put_from(&mut self, buf: &mut BytesMut, len: usize) {
        self.extend_from_slice(&buf[..len]);
        buf.advance(len);
    }
}

/// Carrier bytes in order, as chunks. Stream payloads are taken from the streams' send buffers
/// by reference; headers and control frames are copied into a small staging buffer. Write them
/// with one vectored write ([`Transmit::chunks`]) and [`Transmit::advance`] by what was written.
#[derive(Debug, Default)]
pub struct Transmit {
    chunks: VecDeque<Bytes>,
    /// Small bytes not yet sealed into a chunk; always after every chunk.
    staging: BytesMut,
    len: usize,
}

impl Transmit {
    /// An empty list.
    pub fn new() -> Transmit {
        Transmit::default()
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes in order, as slices for a vectored write (`IoSlice::new` each).
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks
            .iter()
            .map(|c| c.as_ref())
            .chain((!self.staging.is_empty()).then_some(self.staging.as_ref()))
    }

    /// Drops the first `n` bytes (what a write took).
    ///
    /// # Panics
    /// If `n` exceeds [`Transmit::len`].
    pub fn advance(&mut self, mut n: usize) {
        assert!(
            n <= self.len,
            "advance({n}) past the {} bytes held",
            self.len
        );
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                self.staging.advance(n);
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.chunks.pop_front();
        }
    }

    /// Copies everything held into one buffer (for writers without vectored writes).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for c in self.chunks() {
            v.extend_from_slice(c);
        }
        v
    }

    fn seal(&mut self) {
        if !self.staging.is_empty() {
            self.chunks.push_back(self.staging.split().freeze());
        }
    }
}

impl Sink for Transmit {
    fn len(&self) -> usize {
        self.len
    }

    fn put_slice(&mut self, data: &[u8]) {
        self.staging.extend_from_slice(data);
        self.len += data.len();
    }

    fn put_from(&mut self, buf: &mut BytesMut, len: usize) {
        if len == 0 {
            return;
        }
        self.seal();
        self.chunks.push_back(buf.split_to(len).freeze());
        self.len += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(t: &Transmit) -> Vec<u8> {
        t.chunks().flatten().copied().collect()
    }

    #[test]
    fn chunks_keep_order_and_advance_crosses_chunk_boundaries() {
        let mut t = Transmit::new();
        let mut payload = BytesMut::from(&b"0123456789"[..]);
        t.put_slice(b"ab");
        t.put_from(&mut payload, 4);
        t.put_slice(b"cd");
        t.put_slice(b"e");
        t.put_from(&mut payload, 6);
        t.put_slice(b"f");
        assert_eq!(t.len(), 16);
        assert_eq!(collect(&t), b"ab0123cde456789f");
        assert_eq!(t.to_vec(), b"ab0123cde456789f");
        assert!(payload.is_empty());
        t.advance(3);
        assert_eq!(collect(&t), b"123cde456789f");
        t.advance(6);
        assert_eq!(collect(&t), b"456789f");
        t.advance(7);
        assert!(t.is_empty());
        assert_eq!(t.chunks().count(), 0);
    }

    #[test]
    fn the_same_bytes_as_the_vec_sink() {
        let mut v = Vec::new();
        let mut t = Transmit::new();
        let mut a = BytesMut::from(&b"payload-one"[..]);
        let mut b = a.clone();
        for (sink_v, sink_t) in [(b"hdr1", 3usize), (b"hdr2", 8)] {
            v.put_slice(sink_v);
            t.put_slice(sink_v);
            Sink::put_from(&mut v, &mut a, sink_t);
            t.put_from(&mut b, sink_t);
        }
        assert_eq!(Sink::len(&v), t.len());
        assert_eq!(collect(&t), v);
        assert_eq!(a, b);
    }
}
