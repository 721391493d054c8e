"""The README works as a newcomer would use it, and stays a README.

* the quick start: ``hello.py`` is saved and run, and the ``printf ... | nc``
  probe prints what the README shows;
* the demo's hand-made header through ``nc``, against ``demo_echo_server.py``;
* the ``proxyproto decode`` session;
* the doctests, and every other Python block (servers are built on loopback,
  then closed; the handler fragment runs against real parsed headers, with
  and without an SSL TLV);
* under 15 KB, no docutils warning, no link to a missing file.

The haproxy walk-through is run by tests/interop/test_interop_readme_walkthrough.py.
"""

from __future__ import annotations

import re
import shutil
import socketserver
import ssl
import struct
import subprocess
import threading
import types
from pathlib import Path

import pytest
from doc_examples import (
    README,
    Background,
    Session,
    assert_output,
    background,  # noqa: F401  (fixture)
    code_blocks,
    exec_block,
    missing_link_targets,
    rendering_warnings,
    require_nc,
    run_doctests,
    run_foreground,
    substitute_ports,
    wait_for,
)
from support import free_port

import proxyproto

MAX_README_BYTES = 15_000


def test_readme_is_under_15_kb() -> None:
    """Reference material lives in docs/; the README stays a README."""
    size = len(README.read_bytes())
    assert size < MAX_README_BYTES, f"README.rst is {size} bytes"


def test_readme_renders_without_docutils_warnings() -> None:
    """As PyPI renders long_description: no warning, no error."""
    assert rendering_warnings(README) == ""


def test_readme_links_point_to_existing_files() -> None:
    assert missing_link_targets(README) == []


def test_readme_doctests_pass() -> None:
    """Every ``>>>`` example in the README gives the output shown."""
    failures, attempted = run_doctests(README)
    assert attempted >= 5
    assert failures == 0


# --- the quick start -------------------------------------------------------------------


def quick_start() -> tuple[str, Session]:
    """The quick start's script and the console session right after it."""
    blocks = code_blocks(README)
    script = next(i for i, b in enumerate(blocks) if b.kind == "python")
    assert blocks[script + 1].kind == "console"
    return blocks[script].source, Session.parse(blocks[script + 1].source)


def test_install_comes_first_then_a_short_quick_start_then_the_integrations() -> None:
    text = README.read_text()
    script, session = quick_start()
    assert text.index("\nInstall\n===") < text.index("\nQuick start\n===") < text.index("\nIntegrations\n===")
    assert len([line for line in script.splitlines() if line.strip()]) <= 12
    assert "ThreadingProxyTCPServer" in script and "proxy_trusted" in script and "serve_forever()" in script
    assert session.steps[0][0] == "python3 hello.py &"


def test_quick_start_answers_the_nc_probe(tmp_path: Path, background: Background) -> None:  # noqa: F811
    """Save hello.py, run it, send the README's probe: the answer is the one shown."""
    require_nc()
    script, session = quick_start()
    ports = {8000: free_port()}
    (tmp_path / "hello.py").write_text(substitute_ports(script, ports))
    background.cwd = tmp_path
    (start, _), *probes = session.steps
    background.start(start, listen=ports[8000])
    assert probes
    for command, expected in probes:
        assert_output(command, expected, run_foreground(command, ports, cwd=tmp_path), ports)

    # "A connection from 127.0.0.1 without a header is now closed": REQUIRE for a trusted peer.
    assert run_foreground("printf 'hello\\n' | nc -N 127.0.0.1 8000", ports) == ""


# --- the demo, by hand ---------------------------------------------------------------


def test_demo_answers_the_articles_header_through_nc(background: Background) -> None:  # noqa: F811
    """The demo section's first session: the article's header, typed by hand."""
    require_nc()
    block = next(b for b in code_blocks(README, "console") if "demo_echo_server.py" in b.source)
    (start, _), (command, expected) = Session.parse(block.source).steps
    assert start == "python3 demo_echo_server.py &"
    ports = {7654: free_port()}
    background.start(f"{start[:-2]} --port {ports[7654]}", listen=ports[7654])
    assert_output(command, expected, run_foreground(command, ports), ports)
    # "... and the server logs" the two lines the README quotes.
    quoted = re.findall(r"``(handling connection from [^`]+|client sent [^`]+)``", README.read_text())[:2]
    assert quoted[0].startswith("handling connection from 192.168.1.12") and quoted[1].startswith("client sent 6")
    for line in quoted:
        assert wait_for(lambda line=line: line in background.log(0)), background.log(0)


def test_readme_decode_session_prints_what_the_page_shows() -> None:
    blocks = [b for b in code_blocks(README, "console") if "proxyproto decode" in b.source]
    assert blocks
    for block in blocks:
        for command, expected in Session.parse(block.source).steps:
            assert run_foreground(command, {}) == expected


# --- the other Python blocks --------------------------------------------------------------


def other_python_blocks() -> list[str]:
    """Every Python block but the quick start's (which serves forever) and the doctests."""
    blocks = code_blocks(README, "python")[1:]
    return [b.source for b in blocks if not b.source.startswith(">>>") and "self.request" not in b.source]


@pytest.mark.parametrize("index", range(len(other_python_blocks())))
def test_readme_python_block_runs(index: int) -> None:
    """Each block executes (servers are built on loopback with port 0, then closed)."""
    source = re.sub(r'\("127\.0\.0\.1", \d+\)', '("127.0.0.1", 0)', other_python_blocks()[index])
    exec_block(source, f"README.rst python block {index}")


def header_fragment() -> str:
    (block,) = [b.source for b in code_blocks(README, "python") if "self.request.proxy_header" in b.source]
    return block


def ssl_tlv() -> tuple[int, bytes]:
    """A PP2_TYPE_SSL value: client sent a verified certificate over TLSv1.3, CN "alice"."""
    subs = b"".join(struct.pack("!BH", t, len(v)) + v for t, v in ((0x21, b"TLSv1.3"), (0x22, b"alice")))
    return 0x20, struct.pack("!BI", 0x07, 0) + subs


HEADERS = {
    "no header": None,
    "v1": b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 8000\r\n",
    "v2 without TLVs": proxyproto.encode_v2(("203.0.113.7", 51234), ("192.0.2.1", 443)),
    "v2 with an SSL TLV": proxyproto.encode_v2(
        ("2001:db8::7", 51234),
        ("2001:db8::1", 443),
        tlvs=[(proxyproto.TLVType.ALPN, b"h2"), (proxyproto.TLVType.AUTHORITY, b"example.com"), ssl_tlv()],
    ),
    "v2 LOCAL": proxyproto.encode_v2(command=proxyproto.Command.LOCAL),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_readme_header_fragment_runs_in_a_handler(case: str) -> None:
    """The TLV fragment runs as a handler body for each kind of header, None and no SSL TLV included."""
    fragment = header_fragment()
    assert "header.ssl is not None" in fragment  # the None case is shown
    source = "def handle(self):\n" + "\n".join("    " + line for line in fragment.splitlines()) + "\n"
    namespace = exec_block(source, "README.rst header fragment")
    data = HEADERS[case]
    header = None if data is None else proxyproto.parse(data)
    handler = types.SimpleNamespace(request=types.SimpleNamespace(proxy_header=header))
    namespace["handle"](handler)  # type: ignore[operator]
    if case == "v2 with an SSL TLV":
        assert header is not None and header.ssl is not None
        assert (header.ssl.verified, header.ssl.cn, header.ssl.version) == (True, "alice", "TLSv1.3")
        assert (header.alpn, header.authority) == (b"h2", "example.com")


def test_readme_tls_example_serves_https(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The TLS block's ``serve_https`` serves HTTPS after a header, and logs the real client."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    (block,) = [b.source for b in code_blocks(README, "python") if "serve_https" in b.source]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    port = free_port()
    namespace = exec_block(block.replace("8443", str(port)), "README.rst TLS block")
    servers: list[socketserver.BaseServer] = []

    class Recorded(namespace["Server"]):  # type: ignore[misc, name-defined]
        def service_actions(self) -> None:
            if self not in servers:
                servers.append(self)
            super().service_actions()

    namespace["Server"] = Recorded
    thread = threading.Thread(target=namespace["serve_https"], args=(str(cert), str(key)), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: bool(servers))
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        raw = proxyproto.create_connection(
            ("127.0.0.1", port), source=("203.0.113.7", 51234), destination=("127.0.0.1", port), timeout=10
        )
        with client.wrap_socket(raw) as tls:
            tls.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        thread.join(5)
    assert "203.0.113.7 - - " in capsys.readouterr().err  # the request log shows the real client
