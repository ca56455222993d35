#!/usr/bin/env bash
# The test command (README, "The two commands"): installs what the tests
# drive as real clients, if the machine lacks it, then runs every crate's
# tests. Extra arguments go to `cargo test` (a filter, `-- --nocapture`).
#
# The tests need curl, OpenBSD netcat (`nc -N -X 5 -x ...` for half-closed
# requests through SOCKS), python3, openssl (`s_client` checks the TLS links
# from outside, tests/it/tls.rs), and iproute2's `ip` with root (network
# namespaces of the tests' own, tests/it/netns.rs; without root the
# two-namespace TLS test says it is skipped). A test whose tool is missing
# fails; none is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
if ! { command -v nc >/dev/null 2>&1 && nc -h 2>&1 | grep -q -- '-X proxy_protocol'; }; then
    need+=(netcat-openbsd)
fi
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: please install ${need[*]} (the tests drive them), then run cargo test" >&2
        exit 2
    fi
    echo "test.sh: installing ${need[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi

exec cargo test --workspace "$@"
