//! The local edge over real loopback sockets and real TLS: routing, refusals, half-close, faults.

use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use forward_edge::{Edge, EdgeConfig, EdgeCounters, PortMap, RunningEdge, TestCa};
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const LIMIT: Duration = Duration::from_secs(60);

async fn timed<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test step did not finish in time")
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

async fn read_all<R: AsyncRead + Unpin>(r: &mut R) -> (Vec<u8>, io::Result<()>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Err(e)),
        }
    }
}

/// An IPv6-only "VM service" on [::1]: echoes every byte, and half-closes when the client does.
async fn echo_backend() -> u16 {
    let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    port
}

async fn edge_to(vm_port: u16, tweak: impl FnOnce(&mut EdgeConfig)) -> RunningEdge {
    let mut config = EdgeConfig::with_ports([PortMap::to(0, vm_port)]);
    tweak(&mut config);
    Edge::start(config).await.unwrap()
}

async fn connect_with(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

async fn connect(edge: &RunningEdge, vm: &str) -> TlsStream<TcpStream> {
    timed(connect_with(
        edge.addr(),
        &edge.host_for(vm),
        edge.ca().client_config(),
    ))
    .await
    .expect("TLS through the edge")
}

/// Counters are bumped just after the client sees the outcome: wait for them to settle.
async fn wait_count(counter: &AtomicU64, want: u64) {
    timed(async {
        while EdgeCounters::get(counter) < want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(EdgeCounters::get(counter), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_echo_back_intact_through_tls() {
    let edge = edge_to(echo_backend().await, |_| {}).await;
    let client = connect(&edge, "vm1").await;
    let data = pattern(6 * 1024 * 1024 + 11, 7);
    let (mut r, mut w) = tokio::io::split(client);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let (got, end) = timed(read_all(&mut r)).await;
    end.unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(sha(&got), sha(&data));
    drop(writer.await.unwrap());
    wait_count(&edge.counters().relayed_ok, 1).await;
    assert_eq!(EdgeCounters::get(&edge.counters().relay_errors), 0);
}

#[tokio::test]
async fn unknown_names_are_refused_with_an_alert_and_others_still_served() {
    let edge = edge_to(echo_backend().await, |_| {}).await;
    // The edge refuses before sending any certificate, so the client sees the edge's alert, not
    // a failure of its own name check.
    let config = edge.ca().client_config();
    for (i, sni) in ["vm1.other.example", "vm.vers.sh", "a.b.vm.vers.sh"]
        .into_iter()
        .enumerate()
    {
        let err = timed(connect_with(edge.addr(), sni, config.clone()))
            .await
            .expect_err(sni)
            .to_string();
        assert!(
            err.contains("received fatal alert"),
            "{sni}: expected an alert from the edge, got: {err}"
        );
        wait_count(&edge.counters().refused_sni, i as u64 + 1).await;
    }
    // Names under the domain still work afterwards.
    let mut ok = connect(&edge, "vm2").await;
    ok.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    timed(ok.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn a_client_that_trusts_another_ca_rejects_the_edge() {
    let edge = edge_to(echo_backend().await, |_| {}).await;
    let stranger = TestCa::new();
    let err = timed(connect_with(
        edge.addr(),
        &edge.host_for("vm1"),
        stranger.client_config(),
    ))
    .await
    .expect_err("the edge's certificate is not from this CA")
    .to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
    wait_count(&edge.counters().handshake_failed, 1).await;
}

#[tokio::test]
async fn client_half_close_passes_and_the_vm_answers_afterwards() {
    // The VM service reads the whole request, then answers and closes.
    let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let (req, end) = read_all(&mut s).await;
        end.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(format!("got {} bytes", req.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    });
    let edge = edge_to(port, |_| {}).await;
    let mut client = connect(&edge, "vm1").await;
    client.write_all(&pattern(300_000, 1)).await.unwrap();
    client.shutdown().await.unwrap();
    let (answer, end) = timed(read_all(&mut client)).await;
    end.unwrap();
    assert_eq!(answer, b"got 300000 bytes");
}

#[tokio::test]
async fn vm_half_close_passes_while_the_client_still_uploads() {
    let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        w.write_all(b"banner").await.unwrap();
        w.shutdown().await.unwrap();
        let (upload, end) = read_all(&mut r).await;
        end.unwrap();
        let _ = tx.send(sha(&upload));
    });
    let edge = edge_to(port, |_| {}).await;
    let client = connect(&edge, "vm1").await;
    let (mut r, mut w) = tokio::io::split(client);
    let (banner, end) = timed(read_all(&mut r)).await;
    end.unwrap();
    assert_eq!(banner, b"banner");
    let upload = pattern(2 * 1024 * 1024, 9);
    w.write_all(&upload).await.unwrap();
    w.shutdown().await.unwrap();
    assert_eq!(timed(rx).await.unwrap(), sha(&upload));
}

#[tokio::test]
async fn without_half_close_the_first_eof_ends_both_directions() {
    // The VM answers only after the request ended: an edge without half-close loses the answer.
    let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = read_all(&mut s).await;
        let _ = s.write_all(b"too late").await;
    });
    let edge = edge_to(port, |c| c.half_close = false).await;
    let mut client = connect(&edge, "vm1").await;
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let (answer, end) = timed(read_all(&mut client)).await;
    end.expect("a clean close (close_notify), like nginx without proxy_half_close");
    assert!(answer.is_empty(), "got {answer:?}");
}

#[tokio::test]
async fn an_abort_mid_transfer_resets_the_client() {
    let edge = edge_to(echo_backend().await, |c| {
        c.abort_after_bytes = Some(100_000)
    })
    .await;
    let client = connect(&edge, "vm1").await;
    let (mut r, mut w) = tokio::io::split(client);
    let writer = tokio::spawn(async move {
        // Fails once the edge resets; the reader's view is what counts.
        let _ = w.write_all(&pattern(4 * 1024 * 1024, 3)).await;
    });
    let (got, end) = timed(read_all(&mut r)).await;
    let err = end.expect_err("the client must see a reset, never a clean EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    assert!(got.len() < 4 * 1024 * 1024);
    let _ = writer.await;
    wait_count(&edge.counters().relay_errors, 1).await;
}

#[tokio::test]
async fn an_unreachable_vm_port_resets_the_client() {
    let closed = {
        let l = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await.unwrap();
        l.local_addr().unwrap().port()
    };
    let edge = edge_to(closed, |_| {}).await;
    let mut client = connect(&edge, "vm1").await;
    let (_, end) = timed(read_all(&mut client)).await;
    assert_eq!(
        end.expect_err("a reset, not EOF").kind(),
        io::ErrorKind::ConnectionReset
    );
    wait_count(&edge.counters().backend_failed, 1).await;
}

#[tokio::test]
async fn start_reports_clear_errors() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = Edge::start(EdgeConfig::with_ports([port]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && err.contains("port is taken"),
        "{err}"
    );
    let err = Edge::start(EdgeConfig::with_ports(Vec::<u16>::new()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no port to listen on"), "{err}");
    // The same port twice is named as such, not as a port some other program took.
    let free = taken.local_addr().unwrap().port();
    drop(taken);
    let err = Edge::start(EdgeConfig::with_ports([free, free]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("port {free} is given twice")),
        "{err}"
    );
    let mut bad = EdgeConfig::with_ports([0u16]);
    bad.domain = "not a domain".into();
    let err = Edge::start(bad).await.unwrap_err().to_string();
    assert!(err.contains("is not a DNS name"), "{err}");
}

#[tokio::test]
async fn the_binary_prints_its_listeners_and_serves() {
    use tokio::io::AsyncBufReadExt;
    let vm_port = echo_backend().await;
    let dir = std::env::temp_dir().join(format!("forward-edge-bin-{}", std::process::id()));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_forward-edge"))
        .args(["--port", &format!("0:{vm_port}"), "--ca-dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = timed(lines.next_line()).await.unwrap().unwrap();
    let second = timed(lines.next_line()).await.unwrap().unwrap();
    // edge listening on 127.0.0.1:PORT -> [::1]:VMPORT (*.vm.vers.sh)
    let rest = first
        .strip_prefix("edge listening on 127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"));
    let (port, tail) = rest.split_once(' ').unwrap();
    assert_eq!(tail, format!("-> [::1]:{vm_port} (*.vm.vers.sh)"));
    assert!(
        second.starts_with(&format!("edge CA: {}", dir.join("ca.pem").display())),
        "{second}"
    );
    // What a client needs, copyable: without --edge it would look up the real VM name.
    assert!(
        second.contains(&format!(
            "forward --edge 127.0.0.1 --ca-file {} ",
            dir.join("ca.pem").display()
        )),
        "{second}"
    );

    let pem = std::fs::read(dir.join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut client = timed(connect_with(addr, "box.vm.vers.sh", Arc::new(config)))
        .await
        .unwrap();
    client.write_all(b"through the binary").await.unwrap();
    client.shutdown().await.unwrap();
    let (got, end) = timed(read_all(&mut client)).await;
    end.unwrap();
    assert_eq!(got, b"through the binary");

    child.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_shared_client_config_resumes_sessions() {
    let edge = edge_to(echo_backend().await, |_| {}).await;
    let config = edge.ca().client_config();
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let mut c = timed(connect_with(edge.addr(), "vm1.vm.vers.sh", config.clone()))
            .await
            .unwrap();
        // A round trip makes the client take in the session tickets sent after the handshake.
        c.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        timed(c.read_exact(&mut one)).await.unwrap();
        kinds.push(c.get_ref().1.handshake_kind());
        c.shutdown().await.unwrap();
        let _ = timed(read_all(&mut c)).await;
    }
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
}

#[tokio::test]
async fn listens_on_ipv6_loopback_too_and_maps_port_zero_to_itself() {
    let vm_port = echo_backend().await;
    let mut config = EdgeConfig::with_ports([PortMap::to(0, vm_port), PortMap::same(0)]);
    config.bind = Ipv6Addr::LOCALHOST.into();
    let edge = Edge::start(config).await.unwrap();
    let [mapped, same] = edge.listeners() else {
        panic!("two listeners expected")
    };
    assert!(
        mapped.addr.is_ipv6() && mapped.addr.ip().is_loopback(),
        "{mapped:?}"
    );
    assert_eq!(mapped.vm, SocketAddr::from((Ipv6Addr::LOCALHOST, vm_port)));
    // Port 0 without a mapping: the VM port is the port actually listened on.
    assert_eq!(same.vm.port(), same.addr.port());

    let mut c = timed(connect_with(
        mapped.addr,
        &edge.host_for("vm6"),
        edge.ca().client_config(),
    ))
    .await
    .unwrap();
    c.write_all(b"v6").await.unwrap();
    c.shutdown().await.unwrap();
    let (got, end) = timed(read_all(&mut c)).await;
    end.unwrap();
    assert_eq!(got, b"v6");
}

#[tokio::test]
async fn shutdown_cuts_open_connections_and_stops_listening() {
    let edge = edge_to(echo_backend().await, |_| {}).await;
    let addr = edge.addr();
    let mut c = connect(&edge, "vm1").await;
    c.write_all(b"hi").await.unwrap();
    let mut two = [0u8; 2];
    timed(c.read_exact(&mut two)).await.unwrap();
    timed(edge.shutdown()).await;
    let (_, end) = timed(read_all(&mut c)).await;
    // No close_notify: a client must be able to tell this from a clean end.
    assert_eq!(
        end.expect_err("truncated, not a clean EOF").kind(),
        io::ErrorKind::UnexpectedEof
    );
    assert_eq!(
        TcpStream::connect(addr).await.unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused
    );
}
