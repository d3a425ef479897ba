//! The cargo-fuzz entry points (fuzz/fuzz_targets) on the stable toolchain: structured and
//! pseudo-random inputs, the committed seeds in fuzz/seeds/<target>/, and any corpus a local
//! `cargo +nightly fuzz run` left in fuzz/corpus/<target>/.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use forward_mux::{fuzzing, ErrorCode, Frame, ResetCode, Target};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .filter_map(|e| std::fs::read(e.path()).ok().map(|b| (e.path(), b)))
        .collect();
    out.sort();
    out
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut all = files(&fuzz_dir().join("seeds").join(target));
    all.extend(files(&fuzz_dir().join("corpus").join(target)));
    all
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A plausible frame with small ids, so random sequences hit real session paths, not just errors.
fn random_frame(rng: &mut Rng) -> Frame {
    let id = (rng.below(8) * 2 + 1) as u32;
    match rng.below(12) {
        0 => Frame::Auth(Bytes::from(vec![b'p'; 1 + rng.below(40) as usize])),
        1 => Frame::Open {
            id,
            target: Target::new("localhost", rng.below(65536) as u16).unwrap(),
        },
        2..=4 => Frame::Data {
            id,
            fin: rng.below(4) == 0,
            payload: Bytes::from(vec![rng.next() as u8; 1 + rng.below(3000) as usize]),
        },
        5 => Frame::WindowUpdate {
            id: if rng.below(2) == 0 { 0 } else { id },
            increment: rng.next() as u32 >> rng.below(32),
        },
        6 => Frame::Rst {
            id,
            code: ResetCode::from_u32(rng.below(10) as u32),
        },
        7 => Frame::Ping {
            ack: rng.below(2) == 0,
            opaque: rng.next().to_be_bytes(),
        },
        8 => Frame::GoAway {
            last_id: id,
            code: ErrorCode::from_u32(rng.below(3) as u32),
            reason: "bye".into(),
        },
        9 => Frame::OpenOk { id },
        10 => Frame::AuthOk,
        _ => Frame::AuthFail,
    }
}

/// Inputs that look like sessions: a mode byte, often a leading AUTH, then random frames, sometimes
/// with a flipped byte.
fn structured_inputs(count: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng(0x5eed_f00d_dead_beef);
    (0..count)
        .map(|_| {
            let mut input = vec![rng.next() as u8];
            if rng.below(4) != 0 {
                Frame::Auth(Bytes::from_static(b"proof")).encode(&mut input);
            }
            for _ in 0..rng.below(20) {
                random_frame(&mut rng).encode(&mut input);
            }
            if rng.below(3) == 0 && input.len() > 1 {
                let at = 1 + rng.below(input.len() as u64 - 1) as usize;
                input[at] ^= 1 << rng.below(8);
            }
            input
        })
        .collect()
}

fn random_inputs(count: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    (0..count)
        .map(|_| {
            let len = rng.below(600) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        })
        .collect()
}

#[test]
fn frame_decode_survives_corpus_and_generated_inputs() {
    for (path, bytes) in corpus("frame_decode") {
        eprintln!("corpus {}", path.display());
        fuzzing::frame_decode(&bytes);
    }
    for input in structured_inputs(3000)
        .iter()
        .chain(random_inputs(3000).iter())
    {
        fuzzing::frame_decode(input.get(1..).unwrap_or_default());
        fuzzing::frame_decode(input);
    }
}

#[test]
fn session_input_survives_corpus_and_generated_inputs() {
    for (path, bytes) in corpus("session_input") {
        eprintln!("corpus {}", path.display());
        fuzzing::session_input(&bytes);
    }
    for input in structured_inputs(3000)
        .iter()
        .chain(random_inputs(2000).iter())
    {
        fuzzing::session_input(input);
    }
}

#[test]
fn pair_ops_survives_corpus_and_generated_inputs() {
    for (path, bytes) in corpus("pair_ops") {
        eprintln!("corpus {}", path.display());
        fuzzing::pair_ops(&bytes);
    }
    for input in random_inputs(3000) {
        fuzzing::pair_ops(&input);
    }
}

#[test]
fn pair_tuned_survives_corpus_and_generated_inputs() {
    for (path, bytes) in corpus("pair_tuned") {
        eprintln!("corpus {}", path.display());
        fuzzing::pair_tuned(&bytes);
    }
    for input in random_inputs(3000) {
        fuzzing::pair_tuned(&input);
    }
}

/// Add generated seeds (the committed set was then minimized from libFuzzer runs, see fuzz/README.md):
/// `cargo test -p forward-mux --test fuzz_corpus -- --ignored`.
#[test]
#[ignore]
fn write_seeds() {
    for target in ["frame_decode", "session_input"] {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, input) in structured_inputs(24).into_iter().enumerate() {
            let bytes = if target == "frame_decode" {
                input[1..].to_vec()
            } else {
                input
            };
            std::fs::write(dir.join(format!("seed-{i:02}")), bytes).unwrap();
        }
    }
}
