//! Bytes arrive intact, in order, and complete: one large transfer each way, and many connections
//! at once with distinct payloads.

use std::process::Command;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::{forward_bin, forward_env, Proc, TIMEOUT};
use crate::net::{echo_exchange, hex, Backend, Payload};
use crate::stack::{Forward, Stack, Transport};

per_transport!(bulk_64mib_each_way);
per_transport!(hundred_concurrent_connections);
per_transport!(hundred_connections_under_a_soft_file_limit_of_64);

const MIB: usize = 1024 * 1024;

fn bulk_64mib_each_way(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let fwd = stack.forward_to(backend.port);

    let seed = rand::random();
    let len = 64 * MIB;
    // The echo makes the 64 MiB cross the tunnel up and back down at the same time.
    let sent = echo_exchange(fwd.local().connect(), seed, len);

    let report = backend.next_report();
    assert_eq!(report.note, "eof", "service saw {report:?}");
    assert_eq!(report.received, len);
    assert_eq!(
        hex(&report.hash),
        hex(&sent),
        "service received other bytes"
    );
}

fn hundred_concurrent_connections(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let fwd = stack.forward_to(backend.port);
    concurrent_echoes(&fwd, &backend, 100);
}

/// A user's shell may give forward a soft open-file limit far below what it serves (1024 under
/// systemd, 256 on macOS): forward raises it to the hard limit at start, so 100 connections at
/// once (200 descriptors in direct mode) pass through a forward started with a soft limit of 64.
fn hundred_connections_under_a_soft_file_limit_of_64(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"ulimit -S -n 64 && exec "$0" "$@""#)
        .arg(forward_bin())
        .args(stack.client_args())
        .arg(format!("127.0.0.1:0:{}", stack.target(backend.port)));
    forward_env(&mut cmd, "info");
    let fwd = Forward::start_with(Proc::spawn("forward", cmd), 1, t);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", fwd.proc.pid())).unwrap();
    let (soft, hard) = open_files(&limits);
    assert!(
        soft > 64,
        "forward kept its soft limit of {soft}:\n{limits}"
    );
    assert_eq!(
        soft, hard,
        "forward did not raise its soft limit to the hard one"
    );
    concurrent_echoes(&fwd, &backend, 100);
}

/// Soft and hard "Max open files" of a /proc/PID/limits text ("unlimited" as `u64::MAX`).
fn open_files(limits: &str) -> (u64, u64) {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut v = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(u64::MAX));
    (v.next().unwrap(), v.next().unwrap())
}

/// `n` connections through `fwd`, all open at once, each echoing a payload of its own through
/// `backend`: every one must come back intact and the service must see exactly those payloads.
fn concurrent_echoes(fwd: &Forward, backend: &Backend, n: usize) {
    let base: u64 = rand::random();
    // All n are connected before any sends, so they really are open at the same time.
    let barrier = Arc::new(Barrier::new(n));
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let local = fwd.local().clone();
            let barrier = Arc::clone(&barrier);
            let seed = base.wrapping_add(i as u64);
            // Sizes differ so a mixed-up pairing cannot go unnoticed.
            let len = 1
                + (Payload::bytes(seed, 4)
                    .iter()
                    .map(|&b| b as usize)
                    .sum::<usize>()
                    * 512);
            thread::spawn(move || {
                let conn = local.connect();
                barrier.wait();
                (echo_exchange(conn, seed, len), len)
            })
        })
        .collect();
    // Join all before judging, so one failure does not tear down the others mid-transfer.
    let results: Vec<_> = clients.into_iter().map(|c| c.join()).collect();
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 0, "{failed} of {n} connections failed (see above)");
    let mut sent: Vec<_> = results.into_iter().map(Result::unwrap).collect();

    let mut seen: Vec<_> = (0..n)
        .map(|_| {
            let r = backend.next_report();
            assert_eq!(r.note, "eof", "service saw {r:?}");
            (r.hash, r.received)
        })
        .collect();
    sent.sort();
    seen.sort();
    assert_eq!(
        sent, seen,
        "the service did not receive exactly the {n} payloads"
    );
}

/// Direct mode on its default one thread: a connection accepted while a transfer keeps that
/// thread busy moves to the spare thread before its first byte (forward_tunnel::spare), and its
/// bytes, and the transfer's, arrive intact.
#[test]
fn a_connection_accepted_beside_a_busy_transfer_moves_to_the_spare_thread_intact() {
    let backend = Backend::echo();
    let stack = Stack::start(Transport::Direct, &[backend.port]);
    let spec = format!("127.0.0.1:0:{}", stack.target(backend.port));
    let fwd = stack.forward_logging("info,forward_tunnel::serve=debug", &[], &[spec], 1);
    let local = fwd.local().clone();
    // Transfers one after another until a connection moved: a single one of 128 MiB ended
    // before any newcomer was judged when the whole suite loaded the host (CI).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let deadline = Instant::now() + TIMEOUT;
    let bulk = thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            echo_exchange(local.connect(), rand::random(), 32 * MIB);
        }
    });
    let mut moved = false;
    while !moved && !bulk.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        // echo_exchange asserts that the 64 KiB came back as sent.
        echo_exchange(fwd.local().connect(), rand::random(), 64 * 1024);
        moved = fwd.proc.stderr_text().contains("moved to the spare thread");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    bulk.join()
        .expect("the transfers beside the moved connections");
    assert!(
        moved,
        "no connection moved to the spare thread while forward relayed 32 MiB transfers each way for {TIMEOUT:?}; its log:\n{}",
        fwd.proc.stderr_text()
    );
}
