//! `pair_ops` at the production config's proportions (windows auto-tuning 64-fold, time in
//! steps around the tuning's queue floors): the same checks, at the sizes users run.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    forward_mux::fuzzing::pair_tuned(data);
});
