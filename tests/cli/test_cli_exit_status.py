"""Exit status of ``python -m proxyproto``: what each ``--help`` promises, and one line for every usage error.

``--help`` of the program and of each command ends with "Exit status: 0 ...; 1 ...; 2 ...".
:func:`test_help_exit_status_is_what_the_commands_do` reads those lines back and runs, for
every code a help text names, commands that must end with it: a code documented but never
produced, or a case list that names a code the help does not, fails it.

Every usage error exits 2 with exactly one line on stderr that names the option at fault;
resolving a name that does not exist is one too (tested in-process, with ``getaddrinfo``
replaced, so no test sends a DNS query), while a temporary resolver failure stays 1.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_kit import VECTORS, cli, cli_background, udp_server
from support import free_port

from proxyproto import cli as cli_module

# -- usage errors ------------------------------------------------------------------------------

SEND = ["send", "127.0.0.1", "9"]
ADDRESSES = ["--source", "192.0.2.10:1", "--destination", "192.0.2.20:2"]
RELAY = ["relay", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"]

#: (arguments, what the one line must name)
USAGE_ERRORS: list[tuple[list[str], str]] = [
    ([], "COMMAND"),
    (["frobnicate"], "COMMAND"),
    # send: HOST PORT
    (["send", "127.0.0.1"], "PORT"),
    (["send", "127.0.0.1", "http"], "PORT"),
    (["send", "127.0.0.1", "70000"], "PORT"),
    (["send", "127.0.0.1", "0"], "PORT"),
    # send: endpoints of the header
    ([*SEND, "--source", "not-an-ip:1", "--destination", "127.0.0.1:2"], "--source"),
    ([*SEND, "--source", "1.2.3.4:70000", "--destination", "127.0.0.1:2"], "--source"),
    ([*SEND, "--source", "::1:5", "--destination", "[::1]:2"], "--source"),
    ([*SEND, "--source", "1.2.3.4:1", "--destination", "1.2.3.4"], "--destination"),
    ([*SEND, "--source", "1.2.3.4:1"], "--source"),
    ([*SEND, "--destination", "1.2.3.4:1"], "--destination"),
    ([*SEND, "--source", "[2001:db8::7]:1", "--destination", "192.0.2.1:2"], "--destination"),
    ([*SEND, "--source", "192.0.2.1:1", "--destination", "[2001:db8::7]:2"], "--source"),
    # send: TLVs
    ([*SEND, "--tlv", "0xE0"], "--tlv"),
    ([*SEND, "--tlv", "0x1FF=00"], "--tlv"),
    ([*SEND, "--tlv", "0xE0=zz"], "--tlv"),
    ([*SEND, "--tlv", "NOPE=00"], "--tlv"),
    ([*SEND, "--authority", "x" * 70000], "--authority"),
    # send: options that do not go together
    ([*SEND, "--v1", "--v2"], "--v1"),
    ([*SEND, "--v1", *ADDRESSES, "--tlv", "0xE0=00"], "--tlv"),
    ([*SEND, "--v1", "--local"], "--local"),
    ([*SEND, "--v1", "--authority", "example.com"], "--authority"),
    ([*SEND, "--v1", "--checksum"], "--checksum"),
    ([*SEND, "--local", *ADDRESSES], "--local"),
    ([*SEND, "--udp", "--v1"], "--udp"),
    # send: durations
    ([*SEND, "--timeout", "0"], "--timeout"),
    ([*SEND, "--timeout", "-1"], "--timeout"),
    ([*SEND, "--timeout", "nan"], "--timeout"),
    ([*SEND, "--timeout", "inf"], "--timeout"),
    ([*SEND, "--timeout", "soon"], "--timeout"),
    ([*SEND, "--nope"], "--nope"),
    # decode
    (["decode", "--nope"], "--nope"),
    (["decode", "a.bin", "b.bin"], "b.bin"),
    # relay: endpoints
    (["relay", "--listen", "127.0.0.1:0"], "--upstream"),
    (["relay", "--upstream", "127.0.0.1:9"], "--listen"),
    (["relay", "--listen", "127.0.0.1", "--upstream", "127.0.0.1:9"], "--listen"),
    (["relay", "--listen", "::1:0", "--upstream", "127.0.0.1:9"], "--listen"),
    (["relay", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:0"], "--upstream"),
    (["relay", "--listen", "192.0.2.1:0", "--upstream", "127.0.0.1:9"], "--listen"),  # not an address of this host
    (["relay", "--udp", "--listen", "192.0.2.1:0", "--upstream", "127.0.0.1:9"], "--listen"),
    # relay: options that do not go together
    ([*RELAY, "--once", "--max-connections", "2"], "--once"),
    ([*RELAY, "--max-connections", "0"], "--max-connections"),
    ([*RELAY, "--v1", "--checksum"], "--checksum"),
    ([*RELAY, "--v1", "--v2"], "--v1"),
    ([*RELAY, "--udp", "--v1"], "--udp"),
    ([*RELAY, "--udp", "--once"], "--once"),
    ([*RELAY, "--udp", "--max-connections", "3"], "--max-connections"),
    ([*RELAY, "--idle-timeout", "5"], "--idle-timeout"),
    ([*RELAY, "--max-clients", "5"], "--max-clients"),
    ([*RELAY, "--udp", "--idle-timeout", "0"], "--idle-timeout"),
    ([*RELAY, "--udp", "--max-clients", "0"], "--max-clients"),
]


def _one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text}"
    return lines[0]


@pytest.mark.parametrize(("args", "named"), USAGE_ERRORS, ids=[" ".join(a)[:60] or "-" for a, _ in USAGE_ERRORS])
def test_every_usage_error_exits_2_with_one_line_naming_the_option(args: list[str], named: str) -> None:
    result = cli(*args)
    line = _one_line(result.stderr)
    assert result.returncode == 2, line
    command = args[0] if args and args[0] in ("send", "decode", "relay") else None
    assert line.startswith(f"proxyproto {command}: error: " if command else "proxyproto: error: "), line
    assert named in line, line
    assert result.stdout == b""


def test_mixed_families_are_refused_with_what_to_write_instead() -> None:
    result = cli(*SEND, "--source", "[2001:db8::7]:4242", "--destination", "192.0.2.1:53")
    line = _one_line(result.stderr)
    assert result.returncode == 2
    assert "--source [2001:db8::7]:4242 is IPv6 but --destination 192.0.2.1:53 is IPv4" in line
    assert "give both in one family" in line and "[::ffff:192.0.2.1]:53" in line


@pytest.mark.parametrize(
    "args",
    [
        ["send", "no-such-host.test", "9"],
        ["send", "--udp", "no-such-host.test", "9"],
        ["relay", "--listen", "no-such-host.test:0", "--upstream", "127.0.0.1:9"],
        ["relay", "--listen", "127.0.0.1:0", "--upstream", "no-such-host.test:9"],
        ["relay", "--udp", "--listen", "127.0.0.1:0", "--upstream", "no-such-host.test:9"],
    ],
)
@pytest.mark.parametrize(("code", "status"), [(socket.EAI_NONAME, 2), (socket.EAI_AGAIN, 1)])
def test_a_name_that_does_not_exist_is_usage_a_resolver_failure_is_not(
    args: list[str], code: int, status: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: object, *rest: object, **kwargs: object) -> object:
        if host == "no-such-host.test":
            raise socket.gaierror(code, "stubbed")
        return real(host, *rest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert cli_module.main(args) == status
    line = _one_line(capsys.readouterr().err.encode())
    assert "no-such-host.test" in line and "cannot resolve it: stubbed" in line
    assert line.startswith(f"proxyproto {args[0]}: error: ")


def test_an_address_family_the_host_lacks_is_usage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_socket(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(socket, "socket", no_socket)
    assert cli_module.main(["relay", "--listen", "[::1]:0", "--upstream", "127.0.0.1:9"]) == 2
    assert "--listen [::1]:0: cannot listen there" in capsys.readouterr().err


# -- what --help promises ----------------------------------------------------------------------


def help_exit_codes(command: str) -> dict[int, str]:
    """``{code: meaning}`` from the "Exit status: ..." sentence of ``proxyproto [COMMAND] --help``."""
    result = cli(*([command] if command else []), "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.decode().split())
    match = re.search(r"Exit status: (.*?)\. ", text)
    assert match, f"{command or 'proxyproto'} --help says nothing of exit status:\n{text}"
    codes = {}
    for item in match.group(1).split("; "):
        code, meaning = re.fullmatch(r"(\d+) (.+)", item).groups()  # type: ignore[union-attr]
        codes[int(code)] = meaning
    return codes


Case = Callable[[Path], int]


def run(*args: str, stdin: bytes = b"") -> Case:
    return lambda _tmp: cli(*args, stdin=stdin).returncode


@contextlib.contextmanager
def _silent_udp_port() -> Iterator[int]:
    """A bound UDP socket that never answers (no ICMP either)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def send_udp_answered(_tmp: Path) -> int:
    with udp_server() as server:
        return cli("send", "--udp", "127.0.0.1", str(server.server_address[1]), *ADDRESSES, stdin=b"x").returncode


def send_udp_unanswered(_tmp: Path) -> int:
    with _silent_udp_port() as port:
        return cli("send", "--udp", "127.0.0.1", str(port), "--timeout", "0.3", stdin=b"x").returncode


def relay_once(tmp: Path) -> int:
    """``relay --once``: one client (whose upstream is down), then the relay ends by itself."""
    args = ["relay", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{free_port()}", "--once"]
    with cli_background(tmp, *args) as (proc, port):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        return proc.popen.wait(10)


def relay_on_a_busy_port(_tmp: Path) -> int:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        return cli("relay", "--listen", f"127.0.0.1:{busy.getsockname()[1]}", "--upstream", "127.0.0.1:9").returncode


NOT_A_HEADER = b"GET / HTTP/1.1\r\n\r\n"
CASES: dict[str, dict[int, list[Case]]] = {
    "": {
        0: [run("--version")],
        1: [run("decode", stdin=NOT_A_HEADER), run("send", "127.0.0.1", str(free_port()))],
        2: [run(), run("--nope")],  # the commands' usage errors are all above
    },
    "send": {
        0: [send_udp_answered],
        1: [run("send", "127.0.0.1", str(free_port())), send_udp_unanswered],
        2: [run(*args) for args, _ in USAGE_ERRORS if args[:1] == ["send"]][:3],
    },
    "decode": {
        0: [run("decode", str(VECTORS / "haproxy_v2_tcp4.bin"))],
        1: [run("decode", stdin=NOT_A_HEADER), run("decode", "/nonexistent/capture.bin")],
        2: [run(*args) for args, _ in USAGE_ERRORS if args[:1] == ["decode"]][:3],
    },
    "relay": {
        0: [relay_once],
        1: [relay_on_a_busy_port],
        2: [run(*args) for args, _ in USAGE_ERRORS if args[:1] == ["relay"]][:3],
    },
}


@pytest.mark.parametrize("command", list(CASES), ids=lambda c: c or "proxyproto")
def test_help_exit_status_is_what_the_commands_do(command: str, tmp_path: Path) -> None:
    documented = help_exit_codes(command)
    assert set(documented) == set(CASES[command]), (
        f"{command or 'proxyproto'} --help documents {documented}; this test has cases for {sorted(CASES[command])}"
    )
    for code, cases in CASES[command].items():
        assert cases, f"no case for exit status {code} ({documented[code]})"
        for case in cases:
            assert case(tmp_path) == code, f"{command or 'proxyproto'}: expected {code} ({documented[code]})"


def test_help_says_what_bad_usage_means() -> None:
    for command in CASES:
        assert help_exit_codes(command)[2] == "bad usage"
        text = " ".join(cli(*([command] if command else []), "--help").stdout.decode().split())
        assert "one line on stderr names the option" in text


def test_help_and_version_still_exit_0_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_module.main(["send", "--help"])
    assert exited.value.code == 0
    assert "Exit status:" in capsys.readouterr().out
