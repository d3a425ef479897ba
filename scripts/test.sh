#!/usr/bin/env bash
# The project's test command (README): prepares the test environment, then runs every test of the
# workspace. Extra arguments go to `cargo test`, e.g. `scripts/test.sh --test e2e -- direct`.
# --no-fail-fast: one failing test binary must not hide the results of the others.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-env.sh
exec cargo test --workspace --locked --no-fail-fast "$@"
