//! Two correct sessions under operations chosen by the fuzzer (open, write, finish, reset, read,
//! partial deliveries, time, GOAWAY): never a protocol error between them, never a corrupted byte,
//! and once both sides read everything, no byte or writer left stuck.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    forward_mux::fuzzing::pair_ops(data);
});
