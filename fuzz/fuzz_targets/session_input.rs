//! Arbitrary bytes from a peer into a session (server before auth, server after accepting AUTH,
//! client after sending AUTH), with a busy driver in between: never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    forward_mux::fuzzing::session_input(data);
});
