#!/usr/bin/env bash
# What the tests need that pip cannot install: an OpenSSH server (tests/test_ssh_target.py starts its own sshd
# on 127.0.0.1 with keys it makes) and a PostgreSQL server (tests/test_workers.py starts a private cluster on
# 127.0.0.1 in a temporary folder and stops it at the end, tests/pg_server.py). Installed with apt when missing
# and this is root on Debian/Ubuntu; the packages' own services are kept from starting (policy-rc.d), so nothing
# listens until a test starts it. Where it cannot install, it says so and the tests that need it skip, naming
# this script.
set -uo pipefail
need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: ${need[*]} missing; install it (needs root and apt) or the tests that need it skip" >&2
    exit 0
fi
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; } ||
    echo "warning: could not install ${need[*]}; the tests that need them will skip" >&2
[ $own_policy = 1 ] && rm -f "$policy"
exit 0
