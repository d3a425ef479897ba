//! Test harness: a client and a server session joined by a simulated link (latency, optional
//! bandwidth, optional cut), with a tiny "application" on each side, all on simulated time.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use forward_mux::{
    decoder::decode_all, CloseReason, Config, Event, Frame, ReadOutcome, ResetCode, Session,
    SessionError, StreamId, Target,
};

pub const GOOD_TOKEN: &[u8] = b"good-proof";

/// One side: its session plus what its application saw and still wants to send.
pub struct Endpoint {
    pub session: Session,
    pub events: Vec<Event>,
    pub received: HashMap<StreamId, Vec<u8>>,
    pub fins: HashSet<StreamId>,
    pub resets: HashMap<StreamId, ResetCode>,
    /// Streams whose local reader never reads.
    pub stalled: HashSet<StreamId>,
    /// Data the app still has to write, and whether to finish afterwards.
    pub outbox: BTreeMap<StreamId, (VecDeque<u8>, bool)>,
    /// Echo every received byte back and finish when the peer finishes.
    pub echo: bool,
    pub error: Option<SessionError>,
    pub closed: Option<CloseReason>,
    pub bytes_out: u64,
}

impl Endpoint {
    fn new(session: Session) -> Endpoint {
        Endpoint {
            session,
            events: Vec::new(),
            received: HashMap::new(),
            fins: HashSet::new(),
            resets: HashMap::new(),
            stalled: HashSet::new(),
            outbox: BTreeMap::new(),
            echo: false,
            error: None,
            closed: None,
            bytes_out: 0,
        }
    }

    pub fn send(&mut self, id: StreamId, data: &[u8], finish: bool) {
        let entry = self
            .outbox
            .entry(id)
            .or_insert_with(|| (VecDeque::new(), false));
        entry.0.extend(data);
        entry.1 |= finish;
    }

    fn read_stream(&mut self, id: StreamId) {
        if self.stalled.contains(&id) {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.session.read(id, &mut buf) {
                Ok(ReadOutcome::Data(n)) => {
                    self.received
                        .entry(id)
                        .or_default()
                        .extend_from_slice(&buf[..n]);
                    if self.echo {
                        self.send(id, &buf[..n], false);
                    }
                }
                Ok(ReadOutcome::Fin) => {
                    self.fins.insert(id);
                    if self.echo {
                        self.send(id, &[], true);
                    }
                    break;
                }
                Ok(ReadOutcome::Blocked) | Err(_) => break,
            }
        }
    }

    fn flush_outbox(&mut self) {
        let ids: Vec<StreamId> = self.outbox.keys().copied().collect();
        for id in ids {
            let (data, finish) = self.outbox.get_mut(&id).expect("id from keys");
            while !data.is_empty() {
                let (a, _) = data.as_slices();
                match self.session.write(id, a) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        data.drain(..n);
                    }
                }
            }
            if data.is_empty() && *finish {
                let _ = self.session.finish(id);
                self.outbox.remove(&id);
            } else if data.is_empty() {
                self.outbox.remove(&id);
            }
        }
    }
}

struct Link {
    queue: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes per second; None = infinite.
    rate: Option<u64>,
    /// Token-bucket depth as time at `rate`: bytes within it leave at once instead of being
    /// serialised (a buffering proxy or a shaper with a deep bucket). Zero = a plain serialising link.
    burst: Duration,
    busy_until: Option<Instant>,
}

impl Link {
    fn push(&mut self, now: Instant, latency: Duration, bytes: Vec<u8>) {
        let mut t = now;
        if let Some(rate) = self.rate {
            let serialize = Duration::from_nanos(bytes.len() as u64 * 1_000_000_000 / rate);
            if self.burst.is_zero() {
                let start = self.busy_until.map_or(now, |b| b.max(now));
                self.busy_until = Some(start + serialize);
                t = start + serialize;
            } else {
                // GCRA: leave once the debt beyond the bucket is paid off.
                let debt = self.busy_until.map_or(now, |b| b.max(now));
                t = debt.checked_sub(self.burst).map_or(now, |x| x.max(now));
                self.busy_until = Some(debt + serialize);
            }
        }
        self.queue.push_back((t + latency, bytes));
    }
}

/// Client + server on simulated time.
pub struct Pair {
    pub start: Instant,
    pub now: Instant,
    pub latency: Duration,
    pub client: Endpoint,
    pub server: Endpoint,
    to_server: Link,
    to_client: Link,
    /// When set, every byte in both directions is dropped (the carrier silently died).
    pub cut: bool,
    /// Server driver refuses targets with this port.
    pub refuse_port: u16,
    /// Server driver leaves opens pending (neither accepts nor refuses).
    pub hold_opens: bool,
    /// Everything the client put on the wire, for frame-level assertions.
    pub client_wire: Vec<u8>,
    pub record_client_wire: bool,
    /// When set, deliveries are cut into pieces of pseudo-random size (xorshift state).
    pub split: Option<u64>,
}

impl Pair {
    pub fn new(config: Config) -> Pair {
        Pair::with(config.clone(), config, Duration::from_millis(1))
    }

    pub fn with(client: Config, server: Config, latency: Duration) -> Pair {
        let start = Instant::now();
        let mut server = Endpoint::new(Session::server(server, start));
        server.echo = true;
        Pair {
            start,
            now: start,
            latency,
            client: Endpoint::new(Session::client(client, start)),
            server,
            to_server: Link {
                queue: VecDeque::new(),
                rate: None,
                burst: Duration::ZERO,
                busy_until: None,
            },
            to_client: Link {
                queue: VecDeque::new(),
                rate: None,
                burst: Duration::ZERO,
                busy_until: None,
            },
            cut: false,
            refuse_port: 1,
            hold_opens: false,
            client_wire: Vec::new(),
            record_client_wire: false,
            split: None,
        }
    }

    pub fn set_rate(&mut self, bytes_per_sec: u64) {
        self.to_server.rate = Some(bytes_per_sec);
        self.to_client.rate = Some(bytes_per_sec);
    }

    /// Like `set_rate`, through a token bucket `depth` bytes deep: bursts up to it arrive
    /// all at once, so no burst shows the link's rate.
    pub fn set_bucket(&mut self, bytes_per_sec: u64, depth: u64) {
        self.set_rate(bytes_per_sec);
        let burst = Duration::from_nanos(depth * 1_000_000_000 / bytes_per_sec);
        self.to_server.burst = burst;
        self.to_client.burst = burst;
    }

    /// Client authenticates with `token` (the server accepts only [`GOOD_TOKEN`]).
    pub fn auth(&mut self, token: &[u8]) {
        self.client.session.send_auth(token).expect("send_auth");
    }

    pub fn open(&mut self, port: u16) -> StreamId {
        self.client
            .session
            .open(Target::new("localhost", port).unwrap())
            .expect("open")
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Run until `done` holds or `limit` of simulated time passes; true if `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Pair) -> bool) -> bool {
        let deadline = self.now + limit;
        loop {
            self.settle();
            if done(self) {
                return true;
            }
            let next = [
                self.to_server.queue.front().map(|q| q.0),
                self.to_client.queue.front().map(|q| q.0),
                self.client.session.poll_timeout(),
                self.server.session.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= deadline => {
                    self.now = self.now.max(t);
                    self.client.session.handle_timeout(self.now);
                    self.server.session.handle_timeout(self.now);
                }
                _ => {
                    self.now = deadline;
                    return done(self);
                }
            }
        }
    }

    /// Do everything possible at the current instant.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            let mut progress = false;
            progress |= self.deliver();
            progress |= self.app_client();
            progress |= self.app_server();
            progress |= self.transmit();
            if !progress {
                return;
            }
        }
        panic!("pair did not settle");
    }

    fn transmit(&mut self) -> bool {
        let mut progress = false;
        loop {
            let mut buf = Vec::new();
            let n = self
                .client
                .session
                .poll_transmit(self.now, &mut buf, 256 * 1024);
            if n == 0 {
                break;
            }
            progress = true;
            self.client.bytes_out += n as u64;
            if self.record_client_wire {
                self.client_wire.extend_from_slice(&buf);
            }
            if !self.cut {
                self.to_server.push(self.now, self.latency, buf);
            }
        }
        loop {
            let mut buf = Vec::new();
            let n = self
                .server
                .session
                .poll_transmit(self.now, &mut buf, 256 * 1024);
            if n == 0 {
                break;
            }
            progress = true;
            self.server.bytes_out += n as u64;
            if !self.cut {
                self.to_client.push(self.now, self.latency, buf);
            }
        }
        progress
    }

    fn deliver(&mut self) -> bool {
        let mut progress = false;
        while self
            .to_server
            .queue
            .front()
            .is_some_and(|q| q.0 <= self.now)
        {
            let (_, bytes) = self.to_server.queue.pop_front().unwrap();
            for piece in pieces(&mut self.split, &bytes) {
                if let Err(e) = self.server.session.handle_input(self.now, piece) {
                    self.server.error.get_or_insert(e);
                }
            }
            progress = true;
        }
        while self
            .to_client
            .queue
            .front()
            .is_some_and(|q| q.0 <= self.now)
        {
            let (_, bytes) = self.to_client.queue.pop_front().unwrap();
            for piece in pieces(&mut self.split, &bytes) {
                if let Err(e) = self.client.session.handle_input(self.now, piece) {
                    self.client.error.get_or_insert(e);
                }
            }
            progress = true;
        }
        progress
    }

    fn app_client(&mut self) -> bool {
        let c = &mut self.client;
        let mut progress = false;
        while let Some(event) = c.session.poll_event() {
            progress = true;
            match &event {
                Event::Readable(id) => c.read_stream(*id),
                Event::Reset { id, code } => {
                    c.resets.insert(*id, *code);
                    c.outbox.remove(id);
                }
                Event::Closed { reason } => c.closed = Some(reason.clone()),
                _ => {}
            }
            c.events.push(event);
        }
        let before = c.outbox.len();
        c.flush_outbox();
        progress || before != c.outbox.len()
    }

    fn app_server(&mut self) -> bool {
        let refuse_port = self.refuse_port;
        let hold = self.hold_opens;
        let s = &mut self.server;
        let mut progress = false;
        while let Some(event) = s.session.poll_event() {
            progress = true;
            match &event {
                Event::AuthRequest(token) => {
                    if token == GOOD_TOKEN {
                        s.session.auth_accept().unwrap();
                    } else {
                        s.session.auth_reject().unwrap();
                    }
                }
                Event::Opened { id, target } if !hold => {
                    // The client may have reset it already (a later event in the queue says so).
                    if target.port == refuse_port {
                        let _ = s.session.reset(*id, ResetCode::Refused);
                    } else {
                        let _ = s.session.accept(*id);
                    }
                }
                // A pending stream has no target socket yet: accept re-announces its bytes.
                Event::Readable(id) if s.session.is_pending(*id) => {}
                Event::Readable(id) => s.read_stream(*id),
                Event::Reset { id, code } => {
                    s.resets.insert(*id, *code);
                    s.outbox.remove(id);
                }
                Event::Closed { reason } => s.closed = Some(reason.clone()),
                _ => {}
            }
            s.events.push(event);
        }
        let before = s.outbox.len();
        s.flush_outbox();
        progress || before != s.outbox.len()
    }

    /// Read a stalled stream once the test decides to unblock it.
    pub fn unstall_server(&mut self, id: StreamId) {
        self.server.stalled.remove(&id);
        self.server.read_stream(id);
    }

    /// The same on the client's side.
    pub fn unstall_client(&mut self, id: StreamId) {
        self.client.stalled.remove(&id);
        self.client.read_stream(id);
    }
}

/// Cut `bytes` at pseudo-random points when splitting is on (1 to 3000 bytes per piece).
fn pieces<'a>(split: &mut Option<u64>, bytes: &'a [u8]) -> Vec<&'a [u8]> {
    let Some(state) = split.as_mut() else {
        return vec![bytes];
    };
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let n = (1 + (*state % 3000) as usize).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift) so transfers are checkable without a dependency.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An authenticated server session fed by hand, for frame-level tests.
pub fn authed_server(config: Config) -> (Session, Instant) {
    let now = Instant::now();
    let mut s = Session::server(config, now);
    s.handle_input(now, &wire(&[Frame::Auth(GOOD_TOKEN.to_vec().into())]))
        .unwrap();
    assert!(matches!(s.poll_event(), Some(Event::AuthRequest(_))));
    s.auth_accept().unwrap();
    drain(&mut s, now);
    (s, now)
}

pub fn wire(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        f.encode(&mut out);
    }
    out
}

/// Everything the session wants to send, decoded.
pub fn drain(s: &mut Session, now: Instant) -> Vec<Frame> {
    let mut out = Vec::new();
    while s.poll_transmit(now, &mut out, 1 << 20) > 0 {}
    decode_all(&out).expect("session emits valid frames")
}

pub fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}
