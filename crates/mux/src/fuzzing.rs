//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the stable corpus test
//! (`tests/fuzz_corpus.rs`). Each must return normally for every input: a panic is a bug.

use std::time::{Duration, Instant};

use crate::decoder::Decoder;
use crate::event::{Event, ReadOutcome};
use crate::frame::Frame;
use crate::session::Session;
use crate::{Config, ResetCode};

/// Decode `data` split at points taken from its first byte, and check that every decoded frame
/// re-encodes to bytes that decode to the same frame.
pub fn frame_decode(data: &[u8]) {
    let step = data.first().map_or(1, |b| usize::from(*b % 17) + 1);
    let mut decoder = Decoder::new();
    for chunk in data.chunks(step) {
        let mut input = chunk;
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(frame)) => check_round_trip(&frame),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fn check_round_trip(frame: &Frame) {
    let mut wire = Vec::new();
    frame.encode(&mut wire);
    let again = crate::decoder::decode_all(&wire).expect("a re-encoded frame decodes");
    assert_eq!(
        again.as_slice(),
        std::slice::from_ref(frame),
        "frame survives a round trip"
    );
}

/// Feed `data` to a session as a peer would, acting as a busy driver between chunks.
///
/// The first byte picks the scenario: a server before auth, a server that accepts the AUTH the input
/// starts with, or a client that has sent AUTH.
pub fn session_input(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let config = Config {
        stream_window: 1024,
        connection_window: 4096,
        max_concurrent_streams: 8,
        max_pending_opens: 4,
        reset_budget: 10,
        ping_budget: 10,
        ..Config::default()
    };
    let start = Instant::now();
    let mut now = start;
    let mut session = match mode % 3 {
        0 | 1 => Session::server(config, now),
        _ => {
            let mut s = Session::client(config, now);
            let _ = s.open(crate::Target {
                host: "db".into(),
                port: 5432,
            });
            let _ = s.send_auth(b"proof");
            let _ = s.open(crate::Target {
                host: String::new(),
                port: 22,
            });
            s
        }
    };
    let accept_auth = mode % 3 == 1;
    let step = usize::from(mode / 3 % 31) + 1;
    let mut out = Vec::new();
    let mut buf = [0u8; 700];
    for chunk in rest.chunks(step) {
        now += Duration::from_millis(u64::from(chunk[0] % 50));
        let _ = session.handle_input(now, chunk);
        while let Some(event) = session.poll_event() {
            match event {
                // Err when a later frame of the same input already closed the session: fine.
                Event::AuthRequest(_) if accept_auth => drop(session.auth_accept()),
                Event::AuthRequest(_) => drop(session.auth_reject()),
                Event::Opened { id, .. } => {
                    if id % 4 == 1 {
                        let _ = session.accept(id);
                        let _ = session.write(id, b"hello");
                    } else {
                        let _ = session.reset(id, ResetCode::Refused);
                    }
                }
                Event::Readable(id) => {
                    while let Ok(ReadOutcome::Data(_)) = session.read(id, &mut buf) {}
                }
                _ => {}
            }
        }
        out.clear();
        while session.poll_transmit(now, &mut out, 4096) > 0 {
            out.clear();
        }
        if let Some(t) = session.poll_timeout() {
            if chunk[0] == 0xff {
                session.handle_timeout(t);
                now = now.max(t);
            }
        }
    }
}

/// One side of [`pair_ops`]: its session, bytes it sent that the peer has not received yet, and how
/// many bytes it wrote to / read from each stream (the content is a function of id and offset).
struct Side {
    session: Session,
    in_flight: Vec<u8>,
    written: std::collections::HashMap<u32, u64>,
    read: std::collections::HashMap<u32, u64>,
    /// Taken with `take_chunk` and not yet released (the server side, as the carrier does).
    held: Vec<(u32, usize)>,
    /// Streams whose last write was cut short and no `Writable` event has come since: a driver
    /// waits for that event before it reads more from the local socket.
    blocked: std::collections::HashSet<u32>,
    dir: u32,
}

fn content(id: u32, dir: u32, offset: u64) -> u8 {
    (offset as u32)
        .wrapping_mul(31)
        .wrapping_add(id.wrapping_mul(7))
        .wrapping_add(dir) as u8
}

impl Side {
    fn new(session: Session, dir: u32) -> Side {
        Side {
            session,
            in_flight: Vec::new(),
            written: Default::default(),
            read: Default::default(),
            held: Vec::new(),
            blocked: Default::default(),
            dir,
        }
    }

    fn write(&mut self, id: u32, len: usize) {
        // The session takes at most its room: a byte more still makes the write a short one,
        // and the rest need not be made.
        let Ok(room) = self.session.send_room(id) else {
            return;
        };
        let len = len.min(room + 1);
        let at = self.written.get(&id).copied().unwrap_or(0);
        let data: Vec<u8> = (0..len as u64)
            .map(|i| content(id, self.dir, at + i))
            .collect();
        if let Ok(n) = self.session.write(id, &data) {
            *self.written.entry(id).or_default() += n as u64;
            if n < len {
                self.blocked.insert(id);
            }
        }
    }

    /// Read what is there and check it is exactly what the peer wrote, in order.
    fn read(&mut self, id: u32, max: usize, peer_dir: u32) {
        if self.session.role() == crate::Role::Server {
            return self.take(id, max, peer_dir);
        }
        let mut buf = vec![0u8; max.max(1)];
        while let Ok(ReadOutcome::Data(n)) = self.session.read(id, &mut buf) {
            self.check(id, &buf[..n], peer_dir);
            if n == 0 {
                break;
            }
        }
    }

    /// The carrier's way: chunks taken, their credit returned later (half at once, the rest at
    /// the next read), so streams also end and reset while bytes are held.
    fn take(&mut self, id: u32, max: usize, peer_dir: u32) {
        for (held_id, n) in std::mem::take(&mut self.held) {
            self.session.release(held_id, n);
        }
        while let Ok(crate::ReadChunk::Data(chunk)) = self.session.take_chunk(id, max.max(1)) {
            if chunk.is_empty() {
                break;
            }
            self.check(id, &chunk, peer_dir);
            let now = chunk.len() / 2;
            self.session.release(id, now);
            self.held.push((id, chunk.len() - now));
        }
    }

    fn check(&mut self, id: u32, bytes: &[u8], peer_dir: u32) {
        let at = self.read.entry(id).or_default();
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(
                *b,
                content(id, peer_dir, *at + i as u64),
                "stream {id} corrupted at {}",
                *at + i as u64
            );
        }
        *at += bytes.len() as u64;
    }

    fn transmit(&mut self, now: Instant) {
        if self.session.role() == crate::Role::Server {
            // One side takes the chunked path the carrier uses, in uneven pieces, so the fuzzer
            // checks it carries what the copying path would.
            let mut chunks = crate::Transmit::new();
            while self.session.poll_transmit_chunks(now, &mut chunks, 8192) > 0 {
                while !chunks.is_empty() {
                    let first = chunks.chunks().next().unwrap_or_default();
                    let n = first.len().min(1 + chunks.len() / 3);
                    self.in_flight.extend_from_slice(&first[..n]);
                    chunks.advance(n);
                }
            }
        } else {
            while self.session.poll_transmit(now, &mut self.in_flight, 8192) > 0 {}
        }
    }
}

/// The only ways two correct peers part: simulated time ran past a deadline.
fn timed_out(reason: &crate::CloseReason) -> bool {
    use crate::CloseReason as R;
    matches!(
        reason,
        R::Timeout
            | R::AuthTimeout
            | R::PeerError {
                code: crate::ErrorCode::AuthTimeout,
                ..
            }
    )
}

/// Deliver up to `len` in-flight bytes from `from` to `to`; a correct peer never causes an error.
fn deliver(from: &mut Side, to: &mut Side, now: Instant, len: usize) {
    let n = len.min(from.in_flight.len());
    let bytes: Vec<u8> = from.in_flight.drain(..n).collect();
    if let Err(e) = to.session.handle_input(now, &bytes) {
        assert_eq!(
            e,
            crate::SessionError::Closed,
            "a correct peer was accused: {e}"
        );
    }
}

/// Sizes and clock of a [`pair_ops`] run: its config and how far one operation moves.
struct Profile {
    config: Config,
    /// Every byte count an operation derives from its argument is multiplied by this.
    scale: usize,
    /// The simulated time a time operation lets pass, from its argument.
    tick: fn(u8) -> Duration,
}

/// Two correct sessions driven by operations read from `data` (open, write, finish, reset, read,
/// partial deliveries, time, GOAWAY). They must never accuse each other of a protocol violation,
/// every byte read must be the byte written at that offset, and once the operations end and both
/// sides read everything, every byte written to a stream that was not reset arrives and every
/// stream still open for writing takes more (see `settle`).
///
/// Small windows (2 KiB growing to 16 KiB, a connection window of 8 KiB), so few operations
/// reach every limit.
pub fn pair_ops(data: &[u8]) {
    let config = Config {
        stream_window: 2048,
        max_stream_window: 16 * 1024,
        connection_window: 8192,
        stream_send_buffer: 1500,
        // Six streams share less than 6 x 1500: the budget's shares and floor are exercised.
        send_budget: 4000,
        send_quantum: 700,
        max_concurrent_streams: 6,
        max_pending_opens: 2,
        // Open-and-cancel faster than the rapid-reset budget is the abuse that budget exists for
        // (tests/limits.rs); here the fuzzer may do it freely.
        reset_budget: u32::MAX,
        ..Config::default()
    };
    let tick = |arg: u8| Duration::from_millis(u64::from(arg) * 20);
    run_pair(
        Profile {
            config,
            scale: 1,
            tick,
        },
        data,
    );
}

/// [`pair_ops`] with the production config's proportions, a sixteenth of its sizes: a stream
/// window of 16 KiB auto-tuning toward 1 MiB inside a 4 MiB connection window, so a stream alone
/// can grow 64-fold and the connection window is not what limits it (in [`pair_ops`] it is). Time
/// passes in steps of 250 µs up to 50 ms, around the tuning's queue floors, or of whole seconds,
/// around the keepalive and idle timeouts.
pub fn pair_tuned(data: &[u8]) {
    let d = Config::default();
    let config = Config {
        stream_window: d.stream_window / 16,
        max_stream_window: d.max_stream_window / 16,
        connection_window: d.connection_window / 16,
        stream_send_buffer: d.stream_send_buffer / 16,
        send_budget: d.send_budget / 16,
        send_quantum: d.send_quantum / 16,
        max_concurrent_streams: 8,
        max_pending_opens: 4,
        reset_budget: u32::MAX,
        ..d
    };
    let tick = |arg: u8| match arg {
        0..=199 => Duration::from_micros(u64::from(arg) * 250),
        _ => Duration::from_secs(u64::from(arg - 199)),
    };
    run_pair(
        Profile {
            config,
            scale: 16,
            tick,
        },
        data,
    );
}

/// Stream ids and what became of them, shared by the operations and the final check.
#[derive(Default)]
struct Streams {
    ids: Vec<u32>,
    /// Opened by the client, neither accepted nor refused by the server yet.
    pending: Vec<u32>,
    /// Reset by either side: what was written to them may be lost.
    reset: std::collections::HashSet<u32>,
}

fn run_pair(profile: Profile, data: &[u8]) {
    let Profile {
        config,
        scale,
        tick,
    } = profile;
    let start = Instant::now();
    let mut now = start;
    let mut client = Side::new(Session::client(config.clone(), now), 0);
    let mut server = Side::new(Session::server(config, now), 1);
    client.session.send_auth(b"proof").expect("fresh client");
    let mut st = Streams::default();
    let mut bytes = data.iter().copied();
    while let Some(op) = bytes.next() {
        let arg = bytes.next().unwrap_or(0);
        let n = usize::from(arg) * scale;
        let pick = |ids: &[u32]| (!ids.is_empty()).then(|| ids[usize::from(arg) % ids.len()]);
        match op % 16 {
            0 => {
                let port = if arg % 5 == 0 { 1 } else { 80 };
                if let Ok(id) = client.session.open(crate::Target {
                    host: String::new(),
                    port,
                }) {
                    st.ids.push(id);
                }
            }
            1 => {
                if let Some(id) = pick(&st.ids) {
                    client.write(id, n * 13);
                }
            }
            2 => drop(pick(&st.ids).map(|id| client.session.finish(id))),
            3 => {
                if let Some(id) = pick(&st.ids) {
                    if client.session.reset(id, ResetCode::Cancel).is_ok() {
                        st.reset.insert(id);
                    }
                }
            }
            4 => {
                if let Some(id) = pick(&st.ids) {
                    server.write(id, n * 11);
                }
            }
            5 => drop(pick(&st.ids).map(|id| server.session.finish(id))),
            6 => {
                if let Some(id) = pick(&st.ids) {
                    if server.session.reset(id, ResetCode::Internal).is_ok() {
                        st.reset.insert(id);
                    }
                }
            }
            7 | 8 => deliver(&mut client, &mut server, now, n * 40 + 1),
            9 | 10 => deliver(&mut server, &mut client, now, n * 40 + 1),
            11 => drop(pick(&st.ids).map(|id| client.read(id, n * 8, 1))),
            12 => drop(pick(&st.ids).map(|id| server.read(id, n * 8, 0))),
            13 => {
                now += tick(arg);
                client.session.handle_timeout(now);
                server.session.handle_timeout(now);
            }
            14 if arg == 0xff => server.session.go_away(crate::ErrorCode::NoError, "fuzz"),
            _ => {
                if let Some(&id) = st.pending.get(usize::from(arg) % st.pending.len().max(1)) {
                    st.pending.retain(|p| *p != id);
                    let _ = server.session.accept(id);
                }
            }
        }
        handle_events(&mut client, &mut server, &mut st);
        client.transmit(now);
        server.transmit(now);
    }
    settle(&mut client, &mut server, &mut st, now);
}

fn handle_events(client: &mut Side, server: &mut Side, st: &mut Streams) {
    while let Some(event) = server.session.poll_event() {
        match event {
            Event::AuthRequest(_) => server.session.auth_accept().expect("auth pending"),
            // A later event may already have reset it: then there is nothing to refuse.
            Event::Opened { id, target } if target.port == 1 => {
                let _ = server.session.reset(id, ResetCode::Refused);
                st.reset.insert(id);
            }
            Event::Opened { id, .. } => st.pending.push(id),
            Event::Reset { id, .. } => drop(st.reset.insert(id)),
            Event::Writable(id) => drop(server.blocked.remove(&id)),
            Event::Closed { reason } => assert!(timed_out(&reason), "server closed: {reason}"),
            _ => {}
        }
    }
    while let Some(event) = client.session.poll_event() {
        match event {
            Event::Reset { id, .. } => drop(st.reset.insert(id)),
            Event::Writable(id) => drop(client.blocked.remove(&id)),
            Event::Closed { reason } => assert!(timed_out(&reason), "client closed: {reason}"),
            _ => {}
        }
    }
}

/// Without further writes, time or loss, let both sides read everything and the carrier carry
/// everything until nothing moves. Then every byte written to a stream neither side reset must
/// have been read by the other, and every stream still open for writing must take more bytes, with
/// a `Writable` event after any write that was cut short. Credit the flow control failed to grant
/// or an event it failed to raise would stop a stream here for good: in production, a connection
/// that hangs.
fn settle(client: &mut Side, server: &mut Side, st: &mut Streams, now: Instant) {
    if !settle_in_order(client, server, st, now)
        || !carry_until_quiet(client, server, st, now, None)
    {
        return;
    }
    for &id in st.ids.iter().filter(|id| !st.reset.contains(id)) {
        check_settled(client, server, id, "client");
        check_settled(server, client, id, "server");
    }
}

/// First as a driver whose application handles its connections one after another: both sides
/// read only the streams up to the oldest one not checked yet, until nothing moves, and every
/// byte written to that one must have arrived. Streams not read yet hold what they received;
/// they must not take the credit the one being read needs (1000 downloads read in order over
/// a TCP carrier stopped for good until session 27). False if a session closed.
fn settle_in_order(client: &mut Side, server: &mut Side, st: &mut Streams, now: Instant) -> bool {
    for k in 0..st.ids.len() {
        if !carry_until_quiet(client, server, st, now, Some(k)) {
            return false;
        }
        let id = st.ids[k];
        if !st.reset.contains(&id) {
            check_arrived(client, server, id, "client");
            check_arrived(server, client, id, "server");
        }
    }
    true
}

/// Both sides read the streams up to index `upto` (every stream: `None`), the server releases
/// what it holds, as the carrier does once bytes are written out, and the carrier carries
/// everything, until nothing moves. False if a session closed (only a simulated timeout ends
/// one here, checked by `handle_events`).
fn carry_until_quiet(
    client: &mut Side,
    server: &mut Side,
    st: &mut Streams,
    now: Instant,
    upto: Option<usize>,
) -> bool {
    // Each round trip of credit moves at least a quarter window, so this is far more rounds than
    // the largest run of operations can need; running out of them is frames that never end.
    let mut quiet = false;
    for _ in 0..100_000 {
        if client.session.is_closed() || server.session.is_closed() {
            return false;
        }
        for id in std::mem::take(&mut st.pending) {
            let _ = server.session.accept(id);
        }
        let reading = match upto {
            Some(k) => &st.ids[..=k],
            None => &st.ids[..],
        };
        for &id in reading {
            client.read(id, 64 * 1024, 1);
            server.read(id, 64 * 1024, 0);
        }
        for (id, n) in std::mem::take(&mut server.held) {
            server.session.release(id, n);
        }
        handle_events(client, server, st);
        client.transmit(now);
        server.transmit(now);
        if client.in_flight.is_empty() && server.in_flight.is_empty() {
            quiet = true;
            break;
        }
        deliver(client, server, now, usize::MAX);
        deliver(server, client, now, usize::MAX);
        handle_events(client, server, st);
    }
    handle_events(client, server, st);
    if client.session.is_closed() || server.session.is_closed() {
        return false;
    }
    assert!(quiet, "the sessions never stop sending each other frames");
    true
}

fn check_arrived(from: &Side, to: &Side, id: u32, who: &str) {
    let sent = from.written.get(&id).copied().unwrap_or(0);
    let got = to.read.get(&id).copied().unwrap_or(0);
    assert_eq!(
        got, sent,
        "stream {id}: bytes the {who} wrote never arrived"
    );
}

fn check_settled(from: &mut Side, to: &Side, id: u32, who: &str) {
    check_arrived(from, to, id, who);
    // Err: finished by this side, or gone; nothing more to write either way.
    if let Ok(room) = from.session.send_room(id) {
        assert!(room > 0, "stream {id}: the {who} can never write again");
        assert!(
            !from.blocked.contains(&id),
            "stream {id}: the {who}'s write was cut short and no Writable followed"
        );
    }
}
