//! Micro-benchmarks of the hot paths: frame codec, two mux sessions in memory, the relay loop.
//! `cargo bench --bench mux`; whole-path figures come from `forward-bench`.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use forward_mux::{Config, Decoder, Event, Frame, ReadOutcome, Session, Target};

const CHUNK: usize = 16 * 1024;

fn codec(c: &mut Criterion) {
    let payload = bytes::Bytes::from(vec![0xa5u8; CHUNK]);
    let frames = 64;
    let mut wire = Vec::with_capacity(frames * (CHUNK + 12));
    for i in 0..frames {
        Frame::Data {
            id: 1 + 2 * i as u32,
            fin: false,
            payload: payload.clone(),
        }
        .encode(&mut wire);
    }
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("encode 64 x 16 KiB DATA", |b| {
        let mut out = Vec::with_capacity(wire.len());
        b.iter(|| {
            out.clear();
            for i in 0..frames {
                forward_mux::frame::encode_data_header(
                    &mut out,
                    1 + 2 * i as u32,
                    false,
                    CHUNK as u32,
                );
                out.extend_from_slice(&payload);
            }
            out.len()
        })
    });
    g.bench_function("decode 64 x 16 KiB DATA", |b| {
        b.iter(|| {
            let mut d = Decoder::new();
            let mut input = wire.as_slice();
            let mut n = 0;
            while let Some(f) = d.decode(&mut input).expect("valid frames") {
                if let Frame::Data { payload, .. } = f {
                    n += payload.len();
                }
            }
            n
        })
    });
    g.finish();
}

/// Client and server sessions moving 16 MiB on one stream through memory: the protocol's own
/// cost per byte, without sockets or TLS.
fn sessions(c: &mut Criterion) {
    const TOTAL: usize = 16 << 20;
    let data = vec![7u8; 64 * 1024];
    let mut g = c.benchmark_group("session pair");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.sample_size(10);
    g.bench_function("16 MiB one stream", |b| {
        b.iter_batched(
            || (),
            |_| {
                let now = Instant::now();
                let mut client = Session::client(Config::default(), now);
                let mut server = Session::server(Config::default(), now);
                let id = client
                    .open(Target::new("", 1).expect("target"))
                    .expect("open");
                client.send_auth(b"proof").expect("auth");
                let (mut sent, mut got) = (0usize, 0usize);
                let mut wire = Vec::with_capacity(256 * 1024);
                let mut buf = vec![0u8; 256 * 1024];
                while got < TOTAL {
                    while sent < TOTAL {
                        let n = client
                            .write(id, &data[..(TOTAL - sent).min(data.len())])
                            .expect("write");
                        if n == 0 {
                            break;
                        }
                        sent += n;
                    }
                    wire.clear();
                    while client.poll_transmit(now, &mut wire, 256 * 1024) > 0 {}
                    server.handle_input(now, &wire).expect("server input");
                    while let Some(ev) = server.poll_event() {
                        match ev {
                            Event::AuthRequest(_) => server.auth_accept().expect("accept auth"),
                            Event::Opened { id, .. } => server.accept(id).expect("accept"),
                            _ => {}
                        }
                    }
                    while let Ok(ReadOutcome::Data(n)) = server.read(id, &mut buf) {
                        got += n;
                    }
                    wire.clear();
                    while server.poll_transmit(now, &mut wire, 256 * 1024) > 0 {}
                    client.handle_input(now, &wire).expect("client input");
                    while client.poll_event().is_some() {}
                }
                got
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The relay moving 64 MiB between two in-memory duplex pipes.
fn relay(c: &mut Criterion) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TOTAL: usize = 64 << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.sample_size(10);
    g.bench_function("64 MiB duplex to duplex", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (mut client, a) = tokio::io::duplex(256 * 1024);
                let (b_side, mut server) = tokio::io::duplex(256 * 1024);
                let relay = tokio::spawn(forward_tunnel::relay(a, b_side));
                let writer = tokio::spawn(async move {
                    let chunk = vec![1u8; 64 * 1024];
                    for _ in 0..TOTAL / chunk.len() {
                        client.write_all(&chunk).await.expect("write");
                    }
                    client.shutdown().await.expect("shutdown");
                    client
                });
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0;
                loop {
                    let n = server.read(&mut buf).await.expect("read");
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                server.shutdown().await.expect("shutdown");
                drop(writer.await.expect("writer"));
                relay.await.expect("relay task").expect("relay");
                got
            })
        })
    });
    g.finish();
}

criterion_group!(benches, codec, sessions, relay);
criterion_main!(benches);
