"""Sending: ``proxyproto send --udp`` and ``relay --udp`` in front of dnsdist ``setProxyProtocolACL``.

dnsdist 1.7 *receives* PROXY v2 over UDP from the sources ``setProxyProtocolACL`` lists: it
then requires a header in front of every datagram from them (a query without one is
dropped), takes the header's source as the client (its verbose log says "Got query for
NAME|TXT from ADDR"), and answers the datagram's real sender.  Behind it is the usual
backend of ``test_interop_dnsdist.py`` (``useProxyProtocol=true``: the library's UDP server,
answering each TXT query with the ``client_address`` its handler saw), so dnsdist's reading of
the CLI's header is checked three ways: its own log, the header it sends on (which carries the
client and the TLVs it received), and the answer that comes back through it to the CLI.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from interop_support import STARTED, ManagedProcess, require_ipv6, require_program, wait_until
from senders_support import (
    DNSBackend,
    Program,
    dns_query,
    dns_txt,
    dnsdist_config,
    free_ports,
    module_workdir,
    start_program,
    udp_dns,
)

from proxyproto import Command, Family, Protocol

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose proxyproto the CLI runs
CLI_TIMEOUT = 30.0

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def dnsdist() -> Iterator[tuple[Program, DNSBackend, int]]:
    """dnsdist on 127.0.0.1 and ::1 requiring PROXY headers from loopback, in front of the library's backend."""
    exe = require_program("dnsdist")
    require_ipv6()
    backend = DNSBackend()
    port = free_ports(1)[0]
    with module_workdir("dnsdist-cli") as d:
        conf = d / "dnsdist.conf"
        config = dnsdist_config([f"127.0.0.1:{port}", f"[::1]:{port}"], backend.address)
        conf.write_text(config + 'setProxyProtocolACL({"127.0.0.0/8", "::1/128"})\n')
        proc = start_program(
            "dnsdist", [exe, "--supervised", "--disable-syslog", "-v", "-C", str(conf)], d, udp_ports=[port]
        )
        try:
            backend.wait(1, lambda s: s.header is not None and s.header.command == Command.LOCAL)
            yield proc, backend, port
        finally:
            proc.stop()
            backend.close()


@pytest.fixture
def dd(dnsdist: tuple[Program, DNSBackend, int]) -> tuple[Program, DNSBackend, int]:
    dnsdist[1].clear()
    return dnsdist


def _qname(label: str) -> str:
    return f"{label}-{next(_ids)}.cli.example"  # no "tlv" in it: the config's TLV action stays out of the way


def _mine(qname: str) -> Any:
    return lambda s: s.extra["qname"] == qname


def _cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "proxyproto", *args],
        input=stdin,
        capture_output=True,
        timeout=CLI_TIMEOUT,
        cwd=ROOT,
        check=False,
    )


@contextlib.contextmanager
def _udp_relay(workdir: Path, listen: str, upstream: str) -> Iterator[tuple[ManagedProcess, int]]:
    """``python -m proxyproto relay --udp`` from this checkout; stopped by PID at exit."""
    out, err = workdir / "relay.stdout", workdir / "relay.stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        popen = subprocess.Popen(
            [sys.executable, "-m", "proxyproto", "relay", "--udp", "--listen", listen, "--upstream", upstream],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=ROOT,
        )
    proc = ManagedProcess("proxyproto-relay", popen, workdir, out, err)
    STARTED.append(proc)
    try:
        line = proc.wait_for_log(lambda line: "listening on" in line, timeout=CLI_TIMEOUT)
        yield proc, int(line.split(" (UDP)")[0].rsplit(":", 1)[1])
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("host", "source", "destination", "client", "family"),
    [
        ("127.0.0.1", "192.0.2.10:51234", "198.51.100.53:53", ("192.0.2.10", 51234), Family.INET),
        ("::1", "[2001:db8::7]:4242", "[2001:db8::53]:53", ("2001:db8::7", 4242), Family.INET6),
    ],
)
def test_dnsdist_takes_the_client_from_the_header_of_send_udp(
    dd: tuple[Program, DNSBackend, int], host: str, source: str, destination: str, client: Any, family: Family
) -> None:
    proc, backend, port = dd
    qname = _qname("send")
    result = _cli(
        "send", "--udp", host, str(port), "--source", source, "--destination", destination,
        "--tlv", "0xE1=636c69", stdin=dns_query(qname, ident=0x5151),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    address = (*client, 0, 0) if family is Family.INET6 else client  # as the socket module writes IPv6
    assert dns_txt(result.stdout) == (0x5151, 0, [repr(address)])  # the answer came back through dnsdist
    (seen,) = backend.wait(1, _mine(qname))
    assert seen.client_address == address
    h = seen.header
    assert h is not None and (h.protocol, h.family) == (Protocol.DGRAM, family)
    assert h.source == client
    assert h.tlv(0xE1) == b"cli"  # dnsdist passes on the TLVs of the header it received
    wait_until(lambda: f"Got query for {qname}|TXT from" in proc.output(), 5)
    where = f"[{client[0]}]:{client[1]}" if family is Family.INET6 else f"{client[0]}:{client[1]}"
    assert f"Got query for {qname}|TXT from {where}" in proc.output(), proc.output()


@pytest.mark.parametrize(("host", "bind"), [("127.0.0.1", "127.0.0.2"), ("::1", "::1")])
def test_dnsdist_behind_relay_udp_sees_and_answers_the_relays_clients(
    dd: tuple[Program, DNSBackend, int], host: str, bind: str
) -> None:
    proc, backend, port = dd
    upstream = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    listen = "[::1]:0" if ":" in host else "127.0.0.1:0"
    with module_workdir("relay") as workdir, _udp_relay(workdir, listen, upstream) as (relay, relay_port):
        names = [_qname("relay") for _ in range(2)]
        answers = [
            udp_dns((host, relay_port), dns_query(q, ident=0x600 + i), source=(bind, 0)) for i, q in enumerate(names)
        ]
        assert relay.alive(), relay.output()
    for index, ((own, response), qname) in enumerate(zip(answers, names)):
        assert dns_txt(response) == (0x600 + index, 0, [repr(own)])  # through dnsdist and the relay
        (seen,) = backend.wait(1, _mine(qname))
        assert seen.client_address == own
        assert seen.header is not None and seen.header.source == own[:2]
        assert f"Got query for {qname}|TXT from" in proc.output()
    assert "Traceback" not in relay.output()


def test_dnsdist_drops_a_query_without_a_header_from_a_proxy_source(dd: tuple[Program, DNSBackend, int]) -> None:
    """The ACL is in force: the queries above were answered because dnsdist read their headers."""
    _proc, backend, port = dd
    qname = _qname("bare")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        sock.sendto(dns_query(qname), ("127.0.0.1", port))
        with pytest.raises(socket.timeout):
            sock.recv(65535)
    assert not [s for s in backend.seen if s.extra.get("qname") == qname]
