#!/usr/bin/env bash
# Makes sure the programs the end-to-end tests drive are installed: stunnel (bench peer), socat,
# OpenSSH client+server, PostgreSQL server+client, procps (kill(1), used to signal test
# processes). Idempotent: apt runs only when something is missing.
# It starts no services: every test starts its own instance in a temp dir and stops it again.
set -euo pipefail

packages=(stunnel4 socat openssh-server openssh-client postgresql postgresql-contrib procps iproute2)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done

if ((${#missing[@]} > 0)); then
    if [[ $(id -u) -ne 0 ]]; then
        sudo=sudo
        command -v sudo >/dev/null || {
            echo "test-env: missing packages ${missing[*]}; run this script as root or install them" >&2
            exit 1
        }
    else
        sudo=
    fi
    echo "test-env: installing ${missing[*]}"
    # policy-rc.d 101 keeps the packages' post-install scripts from starting system daemons.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        remove_policy=1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    if [[ -n ${remove_policy:-} ]]; then
        $sudo rm -f /usr/sbin/policy-rc.d
    fi
fi

# sshd refuses to start without its privilege-separation directory.
if [[ $(id -u) -eq 0 ]]; then
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
fi

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
for tool in socat stunnel4 ssh sshd ssh-keygen psql pgbench; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || {
        echo "test-env: $tool not found after install" >&2
        exit 1
    }
done
[[ -n $pg_bin && -x $pg_bin/initdb && -x $pg_bin/postgres ]] || {
    echo "test-env: PostgreSQL server binaries (initdb, postgres) not found under /usr/lib/postgresql/*/bin" >&2
    exit 1
}
echo "test-env: ok (PostgreSQL in $pg_bin)"
