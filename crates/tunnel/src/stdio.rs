//! stdin and stdout as the local side of `forward stdio`.
//!
//! tokio's stdin and stdout do blocking reads and writes on a blocking thread, which is right
//! for the blocking pipes ssh gives a ProxyCommand. A descriptor that its owner left
//! non-blocking (an inherited terminal, a socketpair of a program that set `O_NONBLOCK`) made
//! those calls fail with EAGAIN, which ended the relay: a tester's finding. Such a descriptor
//! is polled by the reactor instead, the way ssh and socat wait for it, and the flag stays as
//! its owner set it (it belongs to the open file, which others share).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustix::fs::OFlags;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::relay::Joined;

/// This process's stdin and stdout as one endpoint for [`crate::relay`]. Needs a tokio runtime
/// with I/O enabled.
pub fn stdio() -> Joined<Input, Output> {
    let input = match polled(io::stdin()) {
        Some(fd) => Input::Polled(fd),
        None => Input::Thread(tokio::io::stdin()),
    };
    let output = match polled(io::stdout()) {
        Some(fd) => Output::Polled(fd),
        None => Output::Thread(tokio::io::stdout()),
    };
    Joined::new(input, output)
}

/// `fd` (a copy of it) registered with the reactor, if it is non-blocking and can be polled
/// (a regular file cannot, and never says EAGAIN either).
fn polled(fd: impl AsFd) -> Option<AsyncFd<OwnedFd>> {
    let flags = rustix::fs::fcntl_getfl(fd.as_fd()).ok()?;
    if !flags.contains(OFlags::NONBLOCK) {
        return None;
    }
    let owned = fd.as_fd().try_clone_to_owned().ok()?;
    // `new` is deprecated for types whose descriptor could close or change under the reactor;
    // an `OwnedFd` holds its own, open until the `AsyncFd` drops it (what `register` asks,
    // behind an `unsafe` this workspace forbids).
    #[allow(deprecated)]
    AsyncFd::new(owned).ok()
}

/// stdin, read on a blocking thread or polled (see the module).
#[derive(Debug)]
pub enum Input {
    /// A blocking descriptor: tokio's stdin.
    Thread(tokio::io::Stdin),
    /// A non-blocking one, read when the reactor says it is readable.
    Polled(AsyncFd<OwnedFd>),
}

/// stdout, written on a blocking thread or polled (see the module).
#[derive(Debug)]
pub enum Output {
    /// A blocking descriptor: tokio's stdout.
    Thread(tokio::io::Stdout),
    /// A non-blocking one, written when the reactor says it is writable; straight to the
    /// descriptor, past std's line buffer, so nothing is held back.
    Polled(AsyncFd<OwnedFd>),
}

impl AsyncRead for Input {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let fd = match self.get_mut() {
            Input::Thread(s) => return Pin::new(s).poll_read(cx, buf),
            Input::Polled(fd) => fd,
        };
        loop {
            let mut guard = ready!(fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            // Straight from the descriptor, past std's buffer, which would hide bytes from the
            // reactor.
            let read = guard.try_io(|inner| {
                retry_interrupted(|| {
                    rustix::io::read(inner.get_ref(), &mut *unfilled).map_err(io::Error::from)
                })
            });
            match read {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Readiness was stale: the reactor clears it and waits again.
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Output {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let fd = match self.get_mut() {
            Output::Thread(s) => return Pin::new(s).poll_write(cx, data),
            Output::Polled(fd) => fd,
        };
        loop {
            let mut guard = ready!(fd.poll_write_ready(cx))?;
            let written = guard.try_io(|inner| {
                retry_interrupted(|| {
                    rustix::io::write(inner.get_ref(), data).map_err(io::Error::from)
                })
            });
            match written {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Output::Thread(s) => Pin::new(s).poll_flush(cx),
            // Written straight to the descriptor: nothing is held here.
            Output::Polled(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Output::Thread(s) => Pin::new(s).poll_shutdown(cx),
            // As tokio's stdout: the end of the stream is the process closing fd 1 at exit.
            Output::Polled(_) => Poll::Ready(Ok(())),
        }
    }
}

fn retry_interrupted<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}
