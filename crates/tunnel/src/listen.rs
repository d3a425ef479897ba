//! Local listeners: TCP on explicit addresses (IPv6 sockets are v6-only so `127.0.0.1:P` and
//! `[::1]:P` are two independent listeners, exactly what the user asked for) and Unix sockets.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::relay::Endpoint;

/// Where a forward listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LocalAddr {
    /// A TCP address; port 0 asks the OS for a free one.
    Tcp(SocketAddr),
    /// A Unix stream socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalAddr::Tcp(a) => write!(f, "{a}"),
            LocalAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Why a listener could not be opened, worded for the user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// Something else already listens there.
    #[error("local address {addr} is already in use; pick another local port (or socket path) or stop what is listening there")]
    InUse {
        /// The address asked for.
        addr: LocalAddr,
    },
    /// Privileged port or a path we may not write.
    #[error("not permitted to listen on {addr}{hint}")]
    NotPermitted {
        /// The address asked for.
        addr: LocalAddr,
        /// What to do about it.
        hint: &'static str,
    },
    /// The Unix socket path names something that is not a socket: never removed.
    #[error("cannot listen on {addr}: it exists and is not a socket; pick another path or remove it yourself")]
    NotASocket {
        /// The address asked for.
        addr: LocalAddr,
    },
    /// The address is not one of this machine's.
    #[error(
        "cannot listen on {addr}: no such local address (is that IP configured on this machine?)"
    )]
    NotLocal {
        /// The address asked for.
        addr: LocalAddr,
    },
    /// A Unix socket path the OS cannot bind, and why in words.
    #[error("cannot listen on {addr}: {why}")]
    BadPath {
        /// The address asked for.
        addr: LocalAddr,
        /// What is wrong with the path.
        why: String,
    },
    /// Anything else the OS said.
    #[error("cannot listen on {addr}: {cause}")]
    Other {
        /// The address asked for.
        addr: LocalAddr,
        /// What the OS said.
        cause: io::Error,
    },
}

fn classify(addr: &LocalAddr, e: io::Error) -> ListenError {
    let addr = addr.clone();
    match e.kind() {
        io::ErrorKind::AddrInUse => ListenError::InUse { addr },
        io::ErrorKind::PermissionDenied => ListenError::NotPermitted {
            hint: match addr {
                LocalAddr::Tcp(a) if a.port() < 1024 => {
                    " (ports below 1024 need root or CAP_NET_BIND_SERVICE; pick a port above 1023)"
                }
                _ => "",
            },
            addr,
        },
        io::ErrorKind::AddrNotAvailable => ListenError::NotLocal { addr },
        _ => match &addr {
            LocalAddr::Unix(path) => match unix_path_problem(path, &e) {
                Some(why) => ListenError::BadPath { addr, why },
                None => ListenError::Other { addr, cause: e },
            },
            LocalAddr::Tcp(_) => ListenError::Other { addr, cause: e },
        },
    }
}

/// What the OS's terse answer means for a socket path (the standard library calls a long one
/// "shorter than SUN_LEN").
fn unix_path_problem(path: &Path, e: &io::Error) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let len = path.as_os_str().as_bytes().len();
    if len >= UNIX_PATH_MAX {
        return Some(format!(
            "the path is {len} bytes, and a Unix socket path must be under {UNIX_PATH_MAX}; pick a shorter one"
        ));
    }
    if e.kind() == io::ErrorKind::NotFound {
        // A directory that exists but takes no socket files (/proc) says ENOENT too.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
        if dir.exists() {
            return Some(format!(
                "{} takes no socket file (a kernel file system such as /proc?); pick another path",
                dir.display()
            ));
        }
        // `'~/x.sock:vm:22'` in quotes: the shell expands `~` only unquoted.
        let tilde = if path.starts_with("~") {
            " (the shell did not expand '~': it was quoted; write $HOME or the full path)"
        } else {
            ""
        };
        return Some(format!(
            "its directory {} does not exist{tilde}; create it or pick another path",
            dir.display()
        ));
    }
    None
}

/// `sun_path` of `sockaddr_un`, with its terminating NUL: 108 bytes on Linux, 104 on macOS and
/// the BSDs.
#[cfg(any(target_os = "linux", target_os = "android"))]
const UNIX_PATH_MAX: usize = 108;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const UNIX_PATH_MAX: usize = 104;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix; the path is removed again on drop.
    Unix(UnixListener, UnlinkOnDrop),
}

/// Removes a Unix socket file we created, then the lock file beside it (`SOCKET.lock`).
#[derive(Debug)]
pub struct UnlinkOnDrop {
    path: PathBuf,
    /// Held, not read: dropped after `drop` below, so it still guards the socket's removal.
    _lock: Option<SocketLock>,
}

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An exclusive lock on `SOCKET.lock`, held while we listen on `SOCKET` (released when the
/// file closes, a crash included).
#[derive(Debug)]
struct SocketLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl Drop for SocketLock {
    fn drop(&mut self) {
        // Removed while still locked; the file closes (unlocks) after this.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Locks `SOCKET.lock` beside a Unix socket path. Another forward listening there holds it:
/// `Err(InUse)` at once. Without it, the only test of a live socket is to connect to it, and
/// a forward that accepts that connection opens one to the VM service for it (session 10's
/// review, F5b). `Ok(None)`: no lock to be had (a directory we may not write, a file of that
/// name that is not an empty one of ours); the connect test then decides alone, as before.
fn lock_beside(addr: &LocalAddr, path: &Path) -> Result<Option<SocketLock>, ListenError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    // create_new never follows a symlink (a link planted in /tmp cannot make us create a file
    // elsewhere); an existing lock file is opened read-only, which flock needs and which
    // cannot change it.
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&lock_path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Held by a live forward or left by one that died. Ours are empty regular files;
            // anything else is the user's, never locked or removed.
            let ours = std::fs::symlink_metadata(&lock_path)
                .is_ok_and(|m| m.file_type().is_file() && m.len() == 0);
            if !ours {
                return Ok(None);
            }
            match std::fs::File::open(&lock_path) {
                Ok(f) => f,
                Err(_) => return Ok(None),
            }
        }
        Err(_) => return Ok(None),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(SocketLock {
            _file: file,
            path: lock_path,
        })),
        Err(std::fs::TryLockError::WouldBlock) => Err(ListenError::InUse { addr: addr.clone() }),
        Err(std::fs::TryLockError::Error(_)) => Ok(None),
    }
}

impl Listener {
    /// Binds `addr`. Must run inside a tokio runtime.
    pub fn bind(addr: &LocalAddr) -> Result<Self, ListenError> {
        match addr {
            LocalAddr::Tcp(sa) => bind_tcp(*sa)
                .map(Listener::Tcp)
                .map_err(|e| classify(addr, e)),
            LocalAddr::Unix(path) => bind_unix(addr, path),
        }
    }

    /// The address actually bound (the real port when 0 was asked).
    pub fn local_addr(&self) -> io::Result<LocalAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(LocalAddr::Tcp),
            Listener::Unix(_, path) => Ok(LocalAddr::Unix(path.path.clone())),
        }
    }

    /// Accepts one connection, tuned for relaying; returns it with a printable peer.
    pub async fn accept(&self) -> io::Result<(LocalStream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                // A killed forward resets its clients' connections instead of ending them.
                crate::relay::arm_reset_on_exit(&s);
                Ok((LocalStream::Tcp(s), peer.to_string()))
            }
            Listener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                Ok((LocalStream::Unix(s), path.path.display().to_string()))
            }
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // `[::]` alone would also take IPv4; we bind each family explicitly.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

fn bind_unix(addr: &LocalAddr, path: &Path) -> Result<Listener, ListenError> {
    let lock = lock_beside(addr, path)?;
    let e = match UnixListener::bind(path) {
        Ok(l) => {
            return Ok(Listener::Unix(
                l,
                UnlinkOnDrop {
                    path: path.to_owned(),
                    _lock: lock,
                },
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => e,
        Err(e) => return Err(classify(addr, e)),
    };
    // A socket file nobody accepts on is left over from a crash: take it over, like ssh's
    // StreamLocalBindUnlink, but never steal a live one. Anything else at the path (a file, a
    // link, a FIFO) is the user's: connecting to it is refused as well, so check its type
    // first, or a typo in a SPEC would delete a file.
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return Err(ListenError::NotASocket { addr: addr.clone() });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Err(c) if c.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| classify(addr, e))?;
            let l = UnixListener::bind(path).map_err(|e| classify(addr, e))?;
            Ok(Listener::Unix(
                l,
                UnlinkOnDrop {
                    path: path.to_owned(),
                    _lock: lock,
                },
            ))
        }
        _ => Err(classify(addr, e)),
    }
}

/// An accepted local connection.
#[derive(Debug)]
pub enum LocalStream {
    /// From a TCP listener.
    Tcp(TcpStream),
    /// From a Unix listener.
    Unix(UnixStream),
}

/// A [`LocalStream`] taken off its runtime, to be registered with another one.
#[derive(Debug)]
pub enum DetachedStream {
    /// A TCP connection.
    Tcp(std::net::TcpStream),
    /// A Unix-socket connection.
    Unix(std::os::unix::net::UnixStream),
}

impl LocalStream {
    /// Deregisters the connection from this runtime's reactor (it stays open and non-blocking).
    pub fn detach(self) -> io::Result<DetachedStream> {
        Ok(match self {
            LocalStream::Tcp(s) => DetachedStream::Tcp(s.into_std()?),
            LocalStream::Unix(s) => DetachedStream::Unix(s.into_std()?),
        })
    }
}

impl DetachedStream {
    /// Registers the connection with the runtime this is called on.
    pub fn attach(self) -> io::Result<LocalStream> {
        Ok(match self {
            DetachedStream::Tcp(s) => LocalStream::Tcp(TcpStream::from_std(s)?),
            DetachedStream::Unix(s) => LocalStream::Unix(UnixStream::from_std(s)?),
        })
    }
}

impl Endpoint for LocalStream {
    fn abort(&self) {
        if let LocalStream::Tcp(s) = self {
            s.abort();
        }
    }

    fn before_shutdown(&self) {
        if let LocalStream::Tcp(s) = self {
            s.before_shutdown();
        }
    }

    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self {
            LocalStream::Tcp(s) => s.poll_reset(cx),
            // A Unix stream has no reset: its peer's close is an EOF or EPIPE on our writes.
            LocalStream::Unix(_) => Poll::Pending,
        }
    }
}

impl AsyncRead for LocalStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            LocalStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LocalStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            LocalStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            LocalStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            LocalStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    // The relay writes a mux stream's received chunks in one vectored write.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LocalStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            LocalStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "forward-listen-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(0);
        h.finish()
    }

    #[tokio::test]
    async fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
        let d = dir();
        let path = d.join("important.txt");
        std::fs::write(&path, b"precious").unwrap();
        let fifo = d.join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let link = d.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        for p in [&path, &fifo, &link] {
            let addr = LocalAddr::Unix(p.clone());
            let e = Listener::bind(&addr).unwrap_err();
            assert!(matches!(e, ListenError::NotASocket { .. }), "{p:?}: {e}");
            let text = e.to_string();
            assert!(text.contains("exists and is not a socket"), "{text}");
            assert!(std::fs::symlink_metadata(p).is_ok(), "{p:?} was removed");
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_stale_socket_is_taken_over_and_a_live_one_is_not() {
        let d = dir();
        let path = d.join("s.sock");
        let addr = LocalAddr::Unix(path.clone());
        // A socket file whose listener is gone, as after a crash.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = Listener::bind(&addr).expect("stale socket taken over");
        let e = Listener::bind(&addr).unwrap_err();
        assert!(matches!(e, ListenError::InUse { .. }), "{e}");
        drop(live);
        assert!(!path.exists(), "socket removed on drop");
        assert!(!d.join("s.sock.lock").exists(), "lock file removed on drop");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_second_forward_on_a_live_socket_does_not_connect_to_it() {
        // The first forward would accept that connection and open one to the VM service.
        let d = dir();
        let addr = LocalAddr::Unix(d.join("s.sock"));
        let live = Listener::bind(&addr).unwrap();
        let e = Listener::bind(&addr).unwrap_err();
        assert!(matches!(e, ListenError::InUse { .. }), "{e}");
        let Listener::Unix(l, _) = &live else {
            panic!("a Unix listener")
        };
        // A connect would have been queued before bind returned: none may be waiting.
        let accepted = tokio::time::timeout(Duration::from_millis(200), l.accept()).await;
        assert!(
            accepted.is_err(),
            "the second bind connected to the live socket"
        );
        drop(live);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_lock_file_of_the_users_is_left_alone() {
        // SOCKET.lock with content is not ours: no lock, never removed; the connect test
        // alone decides, as before the lock existed.
        let d = dir();
        let addr = LocalAddr::Unix(d.join("s.sock"));
        std::fs::write(d.join("s.sock.lock"), b"precious").unwrap();
        let live = Listener::bind(&addr).unwrap();
        let e = Listener::bind(&addr).unwrap_err();
        assert!(matches!(e, ListenError::InUse { .. }), "{e}");
        drop(live);
        assert_eq!(std::fs::read(d.join("s.sock.lock")).unwrap(), b"precious");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn unbindable_socket_paths_say_why() {
        let missing = LocalAddr::Unix(PathBuf::from("/nonexistent-forward-dir/x.sock"));
        let e = Listener::bind(&missing).unwrap_err().to_string();
        assert!(
            e.contains("its directory /nonexistent-forward-dir does not exist"),
            "{e}"
        );
        let quoted = LocalAddr::Unix(PathBuf::from("~/forward-test-x.sock"));
        let e = Listener::bind(&quoted).unwrap_err().to_string();
        assert!(e.contains("the shell did not expand '~'"), "{e}");
        // A directory that exists and takes no files says ENOENT too: not "does not exist".
        if cfg!(target_os = "linux") {
            let proc = LocalAddr::Unix(PathBuf::from("/proc/x.sock"));
            let e = Listener::bind(&proc).unwrap_err().to_string();
            assert!(e.contains("/proc takes no socket file"), "{e}");
        }
        let long = LocalAddr::Unix(PathBuf::from(format!("/tmp/{}.sock", "x".repeat(120))));
        let e = Listener::bind(&long).unwrap_err().to_string();
        assert!(
            e.contains("the path is 130 bytes") && e.contains(&format!("under {UNIX_PATH_MAX}")),
            "{e}"
        );
    }
}
