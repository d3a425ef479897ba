#!/usr/bin/env bash
# The project's test command (README): prepares the test environment, then runs every test of the
# workspace. Extra arguments go to `cargo test`, e.g. `scripts/test.sh --test e2e -- direct`.
# --no-fail-fast: one failing test binary must not hide the results of the others.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-env.sh
# SIGHUP back to its default for the tests' processes: forward keeps a SIGHUP it started with
# ignored (nohup), so run under nohup or `setsid nohup` the tests that send SIGHUP would find
# every forward they start ignoring it. (A shell cannot undo an ignore it inherited; env can.)
exec env --default-signal=HUP cargo test --workspace --locked --no-fail-fast "$@"
