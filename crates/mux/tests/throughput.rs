//! Rough CPU cost of the session itself (no sockets, no TLS): one bulk stream and an interleaved
//! interactive one, client → server. Prints numbers; asserts only correctness.
//! `cargo test -p forward-mux --release --test throughput -- --ignored --nocapture`

use std::time::Instant;

use forward_mux::{Config, Event, ReadOutcome, Session, Target};

#[test]
#[ignore]
fn session_throughput() {
    let now = Instant::now();
    let mut client = Session::client(Config::default(), now);
    let mut server = Session::server(Config::default(), now);
    client.send_auth(b"proof").unwrap();
    let bulk = client.open(Target::new("", 5201).unwrap()).unwrap();
    let total: u64 = 2 << 30;
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut carrier = Vec::with_capacity(256 * 1024);
    let mut back = Vec::with_capacity(64 * 1024);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut sent, mut received) = (0u64, 0u64);
    let (mut checksum, mut rounds) = (0u64, 0u64);
    let started = Instant::now();
    while received < total {
        while sent < total {
            let n = client.write(bulk, &chunk).unwrap();
            if n == 0 {
                break;
            }
            sent += n as u64;
        }
        carrier.clear();
        client.poll_transmit(now, &mut carrier, 256 * 1024);
        server.handle_input(now, &carrier).unwrap();
        while let Some(event) = server.poll_event() {
            match event {
                Event::AuthRequest(_) => server.auth_accept().unwrap(),
                Event::Opened { id, .. } => server.accept(id).unwrap(),
                _ => {}
            }
        }
        while let Ok(ReadOutcome::Data(n)) = server.read(bulk, &mut buf) {
            received += n as u64;
            checksum = checksum.wrapping_add(buf[..n].iter().map(|&b| u64::from(b)).sum::<u64>());
            rounds += 1;
        }
        back.clear();
        while server.poll_transmit(now, &mut back, 64 * 1024) > 0 {}
        client.handle_input(now, &back).unwrap();
        while client.poll_event().is_some() {}
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        checksum,
        total * 0xa5,
        "every byte arrived ({rounds} reads)"
    );
    println!(
        "moved {} MiB through client+server sessions in {secs:.2} s: {:.0} MiB/s ({:.2} Gbit/s) for both sides on one core",
        total >> 20,
        total as f64 / secs / (1 << 20) as f64,
        total as f64 * 8.0 / secs / 1e9
    );
}
