#!/usr/bin/env bash
# Type-checks forward for macOS (aarch64-apple-darwin) with clippy, so that Linux-only APIs do
# not creep into what users build on their laptops. Nothing is linked or run: there is no macOS
# SDK here, so the C parts of dependencies (ring, mimalloc) are "compiled" by a stand-in that
# writes empty objects. forward-bench is left out: it is Linux-only (network namespaces, TUN).
# Libraries and binaries only, what a user builds: the tests run on Linux, and type-checking
# them and their dev-dependencies for macOS too cost the CI minutes it does not have.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-apple-darwin
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
cat >"$stub/cc" <<'STUB'
#!/usr/bin/env bash
# Answers the cc crate's probes as clang would and writes an empty file where an object is due.
out=
prev=
for a in "$@"; do
    [[ $prev == -o ]] && out=$a
    case $a in
    "-?") exit 1 ;; # not MSVC
    -o) ;;
    -o*) out=${a#-o} ;;
    *detect_compiler_family.c) echo clang; echo clang >&2 ;;
    esac
    prev=$a
done
[[ -z $out ]] || : >"$out"
STUB
chmod +x "$stub/cc"

# A target directory of its own: the stubbed objects must never reach a real build.
CC_aarch64_apple_darwin="$stub/cc" AR_aarch64_apple_darwin=ar \
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/check-$target" \
    cargo clippy --locked --target "$target" --workspace --exclude forward-bench -- -D warnings
