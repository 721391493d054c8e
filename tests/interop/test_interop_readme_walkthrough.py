"""The README's haproxy walk-through, as a reader runs it, against a real haproxy.

The README's own ``sh`` block writes ``haproxy.cfg`` (run through bash in a
temporary directory), haproxy is started on it as the README says
(``haproxy -f haproxy.cfg -db``), the demo is started as the README starts it,
and the README's ``for`` loop (``nc -s 127.0.0.2``) must print the README's
three answers: the client (127.0.0.2) for the direct and ``send-proxy``
connections, haproxy (127.0.0.1) for the plain listener; the client's ports,
which the README cannot know, match any port.  Then the demo is restarted with
``--policy SKIP`` and must log the header as payload, as the README's line
shows.  The README's fixed ports (7654, 17654, 27654) are replaced by free ones.

Skipped when haproxy or nc is missing; a failure under ``CI=true``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from doc_examples import (
    README,
    Background,
    Session,
    assert_output,
    background,  # noqa: F401  (fixture)
    code_blocks,
    literal_blocks,
    require_nc,
    run_foreground,
    substitute_ports,
    wait_for,
)
from interop_support import ProcessRunner
from support import free_port, require_haproxy


def walkthrough() -> tuple[str, str, Session]:
    """The demo's start command, the sh block writing haproxy.cfg, the for-loop session."""
    demo = next(b for b in code_blocks(README, "console") if "demo_echo_server.py &" in b.source)
    start = Session.parse(demo.source).steps[0][0]
    (setup,) = [b.source for b in code_blocks(README, "sh") if "haproxy.cfg" in b.source]
    (loop,) = [b.source for b in code_blocks(README, "console") if "for port in" in b.source]
    return start, setup, Session.parse(loop)


def test_readme_walkthrough_uses_loopback_and_the_documented_haproxy_command() -> None:
    start, setup, loop = walkthrough()
    assert start == "python3 demo_echo_server.py &"
    assert setup.rstrip().splitlines()[-1] == "haproxy -f haproxy.cfg -db &"
    assert "bind *" not in setup and "bind 127.0.0.1:" in setup
    ((command, expected),) = loop.steps
    assert "nc -N -s 127.0.0.2 127.0.0.1" in command and len(expected.splitlines()) == 3


def test_readme_haproxy_walkthrough(workdir: Path, procs: ProcessRunner, background: Background) -> None:  # noqa: F811
    require_haproxy()
    require_nc()
    start, setup, loop = walkthrough()
    ports = {7654: free_port(), 17654: free_port(), 27654: free_port()}

    # The README's sh block: write haproxy.cfg (as the reader's shell does), then start haproxy on it.
    write, _, _ = substitute_ports(setup, ports).rpartition("haproxy -f haproxy.cfg -db &")
    subprocess.run(["bash", "-c", write], cwd=workdir, check=True, timeout=30)
    config = (workdir / "haproxy.cfg").read_text()
    assert f"bind 127.0.0.1:{ports[27654]}" in config
    demo = background.start(f"{start[:-2]} --port {ports[7654]}", listen=ports[7654])
    procs.haproxy(config, [("127.0.0.1", ports[17654]), ("127.0.0.1", ports[27654])])

    ((command, expected),) = loop.steps
    assert_output(command, expected, run_foreground(command, ports), ports)
    assert wait_for(lambda: background.log(0).count('client sent 6 bytes: "inkel\\n"') == 3), background.log(0)

    # "restart the demo (kill %1) as python3 demo_echo_server.py --policy SKIP &".
    text = README.read_text()
    skip = re.search(r"``(python3\s+demo_echo_server\.py --policy SKIP) &``", text)
    assert skip is not None
    background.stop_one(demo)
    background.start(f"{' '.join(skip.group(1).split())} --port {ports[7654]}", listen=ports[7654])
    answers = run_foreground(command, ports).splitlines()
    assert answers[0].startswith("Your remote address is 127.0.0.2:")
    assert [a.startswith("Your remote address is 127.0.0.1:") for a in answers[1:]] == [True, True]

    # The README's log line: 50 bytes on loopback (with 5-digit ports), the header read as payload.
    (shown,) = [b.strip() for b in literal_blocks(README) if b.startswith("client sent ")]
    size, client_port, destination = re.fullmatch(
        r'client sent (\d+) bytes: "PROXY TCP4 127\.0\.0\.2 127\.0\.0\.1 (\d+) (\d+)\\r\\ninkel\\n"', shown
    ).groups()  # type: ignore[union-attr]
    assert int(destination) == 27654
    assert int(size) == len(f"PROXY TCP4 127.0.0.2 127.0.0.1 {client_port} {destination}\r\ninkel\n") == 50
    assert len("PROXY TCP4 192.168.1.12 192.168.1.20 58472 27654\r\ninkel\n") == 56  # "56 with the article's"
    pattern = re.compile(
        r'client sent (\d+) bytes: "PROXY TCP4 127\.0\.0\.2 127\.0\.0\.1 (\d+) '
        + str(ports[27654])
        + r'\\r\\ninkel\\n"'
    )
    assert wait_for(lambda: pattern.search(background.log(1)) is not None), background.log(1)
    logged = pattern.search(background.log(1))
    assert logged is not None
    assert int(logged.group(1)) == int(size) + len(logged.group(2)) - 5 + len(str(ports[27654])) - 5
