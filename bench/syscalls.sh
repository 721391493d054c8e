#!/bin/sh
# System calls per connection, plain socketserver vs the proxyproto mixin.
#
# Attaches `strace -f -c` to each warmed-up server process (threading and
# sync pairs by default), drives N connections over loopback (header and
# payload in one write, as haproxy sends them), and prints the calls per
# connection for plain, v1 and v2, with the difference by syscall name.
#
#   bench/syscalls.sh            # 500 connections per server
#   bench/syscalls.sh 1000 sync,threading,forking
#
# Needs strace and the right to ptrace one's own children (root, or
# kernel.yama.ptrace_scope <= 1).  Bounded: N connections, 60 s per server.
set -eu
N="${1:-500}"
PAIRS="${2:-sync,threading}"
command -v strace >/dev/null 2>&1 || { echo "strace not found" >&2; exit 2; }
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/conn.py --syscalls "$N" --pairs "$PAIRS"
