//! Property tests of the codec: header and frame round trips, arbitrary chunk splits, garbage input.

use bytes::Bytes;
use proptest::prelude::*;

use crate::codes::{ErrorCode, ResetCode};
use crate::decoder::{decode_all, Decoder};
use crate::frame::{Frame, FrameError, FrameType, Header, Target, HEADER_LEN, MAX_PAYLOAD};

fn arb_frame() -> impl Strategy<Value = Frame> {
    let id = 1u32..;
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..=1024).prop_map(|p| Frame::Auth(Bytes::from(p))),
        Just(Frame::AuthOk),
        Just(Frame::AuthFail),
        (id.clone(), "[a-z0-9.:-]{0,255}", any::<u16>()).prop_map(|(id, host, port)| Frame::Open {
            id,
            target: Target { host, port }
        }),
        id.clone().prop_map(|id| Frame::OpenOk { id }),
        (
            id.clone(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(id, fin, p)| {
                Frame::Data {
                    id,
                    fin: fin || p.is_empty(),
                    payload: Bytes::from(p),
                }
            }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(id, increment)| Frame::WindowUpdate { id, increment }),
        (id.clone(), any::<u32>()).prop_map(|(id, c)| Frame::Rst {
            id,
            code: ResetCode::from_u32(c)
        }),
        (any::<bool>(), any::<[u8; 8]>()).prop_map(|(ack, opaque)| Frame::Ping { ack, opaque }),
        (any::<u32>(), any::<u32>(), "\\PC{0,60}").prop_map(|(last_id, c, reason)| Frame::GoAway {
            last_id,
            code: ErrorCode::from_u32(c),
            reason
        }),
    ]
}

proptest! {
    #[test]
    fn header_round_trips(ty: u8, flags: u8, reserved: u16, stream_id: u32, length: u32) {
        let h = Header { ty, flags, reserved, stream_id, length };
        prop_assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn frames_round_trip_across_any_split(
        frames in proptest::collection::vec(arb_frame(), 1..8),
        cuts in proptest::collection::vec(0usize..10_000, 0..12),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        prop_assert_eq!(&decode_all(&wire).unwrap(), &frames);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.sort_unstable();
        let mut decoder = Decoder::new();
        let mut got = Vec::new();
        let mut prev = 0;
        for cut in cuts.into_iter().chain(std::iter::once(wire.len())) {
            let mut chunk = &wire[prev..cut];
            prev = cut;
            while let Some(f) = decoder.decode(&mut chunk).unwrap() {
                got.push(f);
            }
            prop_assert!(chunk.is_empty());
        }
        prop_assert!(decoder.is_at_boundary());
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        crate::fuzzing::frame_decode(&data);
        crate::fuzzing::session_input(&data);
    }
}

fn header_bytes(ty: u8, flags: u8, id: u32, len: u32) -> Vec<u8> {
    Header {
        ty,
        flags,
        reserved: 0,
        stream_id: id,
        length: len,
    }
    .encode()
    .to_vec()
}

fn decode_err(bytes: &[u8]) -> FrameError {
    let mut input = bytes;
    Decoder::new()
        .decode(&mut input)
        .expect_err("must be rejected")
}

#[test]
fn oversized_frame_rejected_from_header_alone() {
    let e = decode_err(&header_bytes(FrameType::Data as u8, 0, 1, MAX_PAYLOAD + 1));
    assert_eq!(
        e,
        FrameError::TooLarge {
            ty: FrameType::Data,
            len: MAX_PAYLOAD + 1
        }
    );
    assert_eq!(
        e.to_string(),
        "DATA frame of 65537 bytes exceeds the 65536-byte limit"
    );
    assert_eq!(e.code(), ErrorCode::FrameSizeError);
}

#[test]
fn bad_headers_rejected_with_precise_errors() {
    assert_eq!(
        decode_err(&header_bytes(0x42, 0, 0, 0)),
        FrameError::UnknownType(0x42)
    );
    assert_eq!(
        decode_err(&header_bytes(FrameType::Ping as u8, 0, 0, 4)).to_string(),
        "PING frame has a 4-byte payload, expected 8 bytes"
    );
    assert_eq!(
        decode_err(&header_bytes(FrameType::WindowUpdate as u8, 0, 3, 5)).to_string(),
        "WINDOW_UPDATE frame has a 5-byte payload, expected 4 bytes"
    );
    assert_eq!(
        decode_err(&header_bytes(FrameType::Data as u8, 0x80, 1, 1)).to_string(),
        "DATA frame has undefined flags 0x80"
    );
    assert_eq!(
        decode_err(&header_bytes(FrameType::Data as u8, 0, 0, 1)).to_string(),
        "DATA frame on stream 0: must name a stream (non-zero id)"
    );
    assert_eq!(
        decode_err(&header_bytes(FrameType::Ping as u8, 0, 5, 8)).to_string(),
        "PING frame on stream 5: must use stream id 0"
    );
    assert!(matches!(
        decode_err(&header_bytes(FrameType::Data as u8, 0, 1, 0)),
        FrameError::BadLength { .. }
    ));
    let mut reserved = header_bytes(FrameType::AuthOk as u8, 0, 0, 0);
    reserved[3] = 1;
    assert!(matches!(decode_err(&reserved), FrameError::Reserved { .. }));
}

#[test]
fn open_target_must_be_consistent() {
    let mut bytes = header_bytes(FrameType::Open as u8, 0, 1, 5);
    bytes.extend_from_slice(&[0, 80, 3, b'a', b'b']);
    assert_eq!(
        decode_err(&bytes),
        FrameError::BadTarget("host length does not match the frame length")
    );
    let mut bytes = header_bytes(FrameType::Open as u8, 0, 1, 4);
    bytes.extend_from_slice(&[0, 80, 1, 0xff]);
    assert_eq!(
        decode_err(&bytes),
        FrameError::BadTarget("host is not UTF-8")
    );
}

#[test]
fn partial_header_then_payload_is_buffered() {
    let mut wire = Vec::new();
    Frame::Ping {
        ack: false,
        opaque: *b"12345678",
    }
    .encode(&mut wire);
    assert_eq!(wire.len(), HEADER_LEN + 8);
    let mut d = Decoder::new();
    for b in &wire[..wire.len() - 1] {
        let mut one = std::slice::from_ref(b);
        assert_eq!(d.decode(&mut one).unwrap(), None);
    }
    let mut last = &wire[wire.len() - 1..];
    assert_eq!(
        d.decode(&mut last).unwrap(),
        Some(Frame::Ping {
            ack: false,
            opaque: *b"12345678"
        })
    );
}

#[test]
fn target_display_brackets_ipv6() {
    assert_eq!(Target::new("::1", 22).unwrap().to_string(), "[::1]:22");
    assert_eq!(Target::new("", 5432).unwrap().to_string(), "localhost:5432");
    assert!(Target::new("x".repeat(256), 1).is_err());
}

#[test]
fn session_moves_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<crate::Session>();
    assert_send_sync::<crate::Event>();
    assert_send_sync::<crate::SessionError>();
    assert_send_sync::<crate::StreamError>();
}
