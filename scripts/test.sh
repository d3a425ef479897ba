#!/usr/bin/env bash
# The project's test command (README): prepares the test environment, then runs every test of the
# workspace. Extra arguments go to `cargo test`, e.g. `scripts/test.sh -- --nocapture e2e::direct`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-env.sh
exec cargo test --workspace --locked "$@"
