//! The UDP socket under both QUIC endpoints: quinn's tokio socket, adjusted so that packets
//! larger than Ethernet's work together with segmentation offload (GSO).
//!
//! On loopback PMTUD finds packets of up to 64 KiB (see `transport`), and a bulk stream then
//! costs well under half the CPU per byte of 1452-byte packets. But quinn 0.11 batches
//! up to 10 packets into one GSO send whatever their size, and the kernel refuses a send of more
//! than 64 KiB: the whole batch would be lost, and the losses would make PMTUD give up. Here a
//! batch that is too large goes out as several sends, each within the limit; and the receive
//! buffers are sized for one 64 KiB datagram each rather than GRO segments × the payload limit.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};

/// Most bytes one UDP send may carry, segmented or not (IPv4 and IPv6 without jumbograms).
const MAX_SEND: usize = 65_507;

/// quinn's tokio runtime, with sockets wrapped in [`Socket`].
#[derive(Debug)]
pub(super) struct Tokio;

impl Runtime for Tokio {
    fn new_timer(&self, i: std::time::Instant) -> Pin<Box<dyn AsyncTimer>> {
        TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        TokioRuntime.spawn(future);
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(Socket(TokioRuntime.wrap_udp_socket(t)?)))
    }

    fn now(&self) -> std::time::Instant {
        TokioRuntime.now()
    }
}

/// A quinn UDP socket whose GSO batches never exceed one UDP send's limit.
struct Socket(Arc<dyn AsyncUdpSocket>);

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size else {
            return self.0.try_send(transmit);
        };
        if transmit.contents.len() <= MAX_SEND || segment == 0 {
            return self.0.try_send(transmit);
        }
        // Whole segments per send; an error (even after some sends went out) makes quinn send
        // the whole batch again later, and the receiver drops the duplicates.
        let per_send = (MAX_SEND / segment).max(1) * segment;
        for part in transmit.contents.chunks(per_send) {
            self.0.try_send(&Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: part,
                segment_size: (part.len() > segment).then_some(segment),
                src_ip: transmit.src_ip,
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        // quinn sizes each receive buffer as this × the largest payload it accepts (64 KiB
        // here): one such buffer already holds the largest coalesced (GRO) datagram the kernel
        // delivers, and GRO segments × 64 KiB would reserve hundreds of MiB.
        1
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}
