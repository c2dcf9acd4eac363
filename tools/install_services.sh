#!/usr/bin/env bash
# What the tests need that pip cannot install: an OpenSSH server (tests/test_ssh_target.py starts its own sshd
# on 127.0.0.1 with keys it makes). Installed with apt when missing and this is root on Debian/Ubuntu; the
# package's own service is kept from starting (policy-rc.d), so nothing listens until a test starts it.
# Where it cannot install, it says so and the tests that need it skip, naming this script.
set -uo pipefail
need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: ${need[*]} missing; install it (needs root and apt) or the SSH target tests skip" >&2
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
    echo "warning: could not install ${need[*]}; the SSH target tests will skip" >&2
[ $own_policy = 1 ] && rm -f "$policy"
exit 0
