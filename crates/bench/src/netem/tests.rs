//! The link over real devices: bytes through a delayed, rate-limited, lossy link arrive
//! intact, and the namespace is cleaned up. Skipped (with the reason printed) only where TUN
//! devices or network namespaces cannot be made at all.

use std::net::{Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::*;
use crate::backend::{Backend, ECHO};

/// Set when this test binary runs [`echo_helper`] inside a lab's namespace.
const HELPER_ENV: &str = "FORWARD_BENCH_NETEM_ECHO_IP";

/// Not a test of its own: the link test runs this binary inside the namespace with
/// [`HELPER_ENV`] set, and this serves the echo backend there. Without the variable it
/// returns at once.
#[tokio::test]
async fn echo_helper() {
    let Ok(ip) = std::env::var(HELPER_ENV) else {
        return;
    };
    let ip: Ipv6Addr = ip.parse().expect("helper IP");
    let backend = Backend::start(SocketAddr::from((ip, 0)))
        .await
        .expect("helper backend");
    println!("echo port {}", backend.addr.port());
    std::future::pending::<()>().await;
}

fn skip_reason() -> Option<String> {
    preflight().err()
}

async fn start_helper(lab: &Lab) -> (tokio::process::Child, SocketAddr) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns.name])
        .arg(exe)
        .args([
            "netem::tests::echo_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, lab.vm_ip.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the echo helper in the namespace");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let port = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("helper stdout") {
            // libtest prints the test's name on the same line first.
            if let Some(p) = line.split("echo port ").nth(1) {
                return p.trim().parse::<u16>().expect("port");
            }
        }
        panic!("the echo helper ended without printing its port");
    })
    .await
    .expect("the echo helper did not start within 60 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, SocketAddr::from((lab.vm_ip, port)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_through_a_lossy_link_arrives_intact() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::start(LinkParams {
        one_way: Duration::from_millis(3),
        bytes_per_sec: Some(50e6 / 8.0),
        loss: 0.02,
        queue_bytes: 128 * 1024,
    })
    .await
    .expect("lab");
    let ns_name = lab.ns.name.clone();
    let (mut helper, addr) = start_helper(&lab).await;

    let mut data = vec![0u8; 2 << 20];
    rand::thread_rng().fill_bytes(&mut data);
    let sent_hash = Sha256::digest(&data);
    let stream = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .expect("connect timed out")
    .expect("connect through the link");
    let (mut rd, mut wr) = stream.into_split();
    let len = data.len();
    let writer = tokio::spawn(async move {
        wr.write_all(&[ECHO]).await?;
        wr.write_all(&data).await?;
        std::io::Result::Ok(wr)
    });
    let mut back = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(120), rd.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .expect("echo read");
    let _wr = writer.await.expect("writer task").expect("write");
    assert_eq!(Sha256::digest(&back), sent_hash, "bytes changed on the way");

    let [up, down] = lab.stats();
    assert!(
        up.packets_out > 1000 && down.packets_out > 1000,
        "{up:?} {down:?}"
    );
    assert!(
        up.lost + down.lost > 0,
        "2 % loss dropped nothing: {up:?} {down:?}"
    );
    let _ = helper.kill().await;
    lab.shutdown().await;
    let left = ip_output(&["netns", "list"]);
    assert!(
        !left
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&ns_name)),
        "namespace {ns_name} still there: {left}"
    );
}

#[tokio::test]
async fn namespaces_of_dead_runs_are_removed() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    // A pid above every real one: its run is certainly gone.
    let dead = (4_194_000..4_194_304)
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid");
    let name = format!("{NS_PREFIX}{dead}-0");
    ip(&["netns", "add", &name]).expect("create a stale namespace");
    clean_stale();
    // (A lab starting in a parallel test may have been the one to remove it.)
    let left = ip_output(&["netns", "list"]);
    assert!(
        !left
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&name)),
        "{name} still there: {left}"
    );
    // A namespace of a live run (this one) stays.
    let live = Netns::create(format!("{NS_PREFIX}{}-stale-test", std::process::id())).unwrap();
    assert!(!clean_stale().contains(&live.name));
    let live_name = live.name.clone();
    drop(live);
    assert!(!ip_output(&["netns", "list"]).contains(&live_name));
}

#[test]
fn profiles_have_a_bdp_queue() {
    let p = netem_profile("loss50").unwrap();
    assert_eq!(p.queue_bytes(), 625_000);
    assert_eq!(p.link_params().one_way, Duration::from_millis(25));
    assert_eq!(netem_profile("wan100").unwrap().queue_bytes(), 1_250_000);
    // An eighth of 50 ms at 100 Mbit/s: 78 kB, 6.25 ms of queue.
    assert_eq!(netem_profile("shallow50").unwrap().queue_bytes(), 78_125);
    assert!(netem_profile("nope").is_none());
}
