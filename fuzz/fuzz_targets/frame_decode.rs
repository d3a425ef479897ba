//! Arbitrary bytes through the streaming frame decoder: never panic, and every frame it accepts
//! re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    forward_mux::fuzzing::frame_decode(data);
});
