"""uvicorn with ``--http proxyproto.uvicorn:H11`` / ``:HttpTools``: ``scope["client"]`` is the real client.

In-process (``uvicorn.Config`` + ``Server.serve`` in the test's loop, asyncio and uvloop) and
through uvicorn's real command line in a subprocess; HTTPS negotiated after the header;
keep-alive; a WebSocket echo; untrusted peers; a prompt shutdown with connections still
waiting for their header; behind a real haproxy ``send-proxy-v2``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from support import free_port, require_haproxy, require_module, run_on
from web_kit import (
    DEST_V4,
    DEST_V6,
    REAL_V4,
    REAL_V6,
    Certificate,
    command,
    connect,
    get,
    python,
    self_signed,
    uvicorn_serving,
    websocket,
    ws_receive,
    ws_send,
)

import proxyproto
from proxyproto.policy import TrustedNetworks
from proxyproto.settings import settings_from_environment

uvicorn: Any = require_module("uvicorn")

import proxyproto.uvicorn as ppu  # noqa: E402

V2 = proxyproto.encode_v2(REAL_V4, DEST_V4)
V1 = proxyproto.encode_v1(REAL_V4, DEST_V4)
V2_V6 = proxyproto.encode_v2(REAL_V6, DEST_V6)
LOCAL = proxyproto.encode_v2(command=proxyproto.Command.LOCAL)

HTTP_CLASSES = {"H11": ppu.H11, "HttpTools": ppu.HttpTools}


@pytest.fixture(params=["H11", "HttpTools"])
def http(request: pytest.FixtureRequest) -> str:
    if request.param == "HttpTools":
        require_module("httptools")
    return str(request.param)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def serving(http: Any, **config: Any) -> Any:
    """uvicorn serving ``web_kit.app`` in this loop; ``http`` a name of HTTP_CLASSES or a class."""
    return uvicorn_serving(HTTP_CLASSES.get(http, http) if isinstance(http, str) else http, **config)


@pytest.mark.parametrize(
    ("header", "client", "server"),
    [
        (V2, REAL_V4, DEST_V4),
        (V1, REAL_V4, DEST_V4),
        (V2_V6, REAL_V6, DEST_V6),
        (proxyproto.encode_v1(REAL_V6, DEST_V6), REAL_V6, DEST_V6),
    ],
    ids=["v2-ipv4", "v1-ipv4", "v2-ipv6", "v1-ipv6"],
)
def test_uvicorn_scope_client_is_the_header_source(
    http: str, loop: str, header: bytes, client: Any, server: Any
) -> None:
    async def scenario() -> None:
        async with serving(http) as address:
            status, seen = await get(address, header)
            assert status == 200
            assert seen["client"] == list(client) and seen["server"] == list(server)
            assert seen["scheme"] == "http"

    run_on(loop, scenario)


def test_uvicorn_local_header_keeps_the_socket_address(http: str) -> None:
    async def scenario() -> None:
        async with serving(http) as address:
            status, seen = await get(address, LOCAL)
            assert status == 200 and seen["client"][0] == "127.0.0.1"

    run_on("asyncio", scenario)


def test_uvicorn_keep_alive_serves_many_requests_on_one_connection(http: str, loop: str) -> None:
    async def scenario() -> None:
        async with serving(http) as address:
            conn = await connect(address, V2)
            try:
                for i in range(20):
                    status, seen = await conn.request(body=b"x" * i)
                    assert status == 200 and seen["client"] == list(REAL_V4)
            finally:
                await conn.close()

    run_on(loop, scenario)


def test_uvicorn_request_body_of_one_mebibyte_arrives_byte_exact(http: str) -> None:
    import hashlib
    import os

    body = os.urandom(1 << 20)

    async def scenario() -> None:
        async with serving(http) as address:
            conn = await connect(address, V2)
            try:
                status, seen = await conn.request(body=body)
            finally:
                await conn.close()
            assert status == 200 and seen["body"] == hashlib.sha256(body).hexdigest()

    run_on("asyncio", scenario)


def test_uvicorn_websocket_echo_sees_the_real_client(http: str, loop: str) -> None:
    require_module("websockets")

    async def scenario() -> None:
        async with serving(http, ws="auto") as address:
            conn = await connect(address, V2)
            try:
                seen = await websocket(conn)
                assert seen["client"] == list(REAL_V4)
                for text in ("hello", "again"):
                    ws_send(conn, text)
                    assert await ws_receive(conn) == text
            finally:
                await conn.close()

    run_on(loop, scenario)


def test_uvicorn_https_is_negotiated_after_the_header(http: str, loop: str, tmp_path: Path) -> None:
    cert = self_signed(tmp_path) or pytest.skip("openssl is not installed")
    assert isinstance(cert, Certificate)

    async def scenario() -> None:
        async with serving(http, ssl_certfile=str(cert.cert), ssl_keyfile=str(cert.key)) as address:
            tls = cert.client_context()
            status, seen = await get(address, V2, tls=tls)
            assert status == 200 and seen["scheme"] == "https" and seen["client"] == list(REAL_V4)
            conn = await connect(address, V1, tls=tls)  # keep-alive over TLS too
            try:
                for _ in range(3):
                    status, seen = await conn.request()
                    assert status == 200 and seen["client"] == list(REAL_V4)
            finally:
                await conn.close()

    run_on(loop, scenario)


def test_uvicorn_untrusted_peer_header_never_reaches_scope_client(http: str) -> None:
    async def scenario() -> None:
        async with serving(ppu.wrap(http.lower(), trusted="127.0.0.1")) as address:
            # From 127.0.0.3 the header is payload (SKIP): uvicorn answers 400, never the header's source.
            status, seen = await get(address, V2, local="127.0.0.3")
            assert status == 400 and "192.0.2.10" not in str(seen)
            # Without a header, the untrusted peer is served with its own address.
            status, seen = await get(address, b"", local="127.0.0.3")
            assert status == 200 and seen["client"][0] == "127.0.0.3"
            status, seen = await get(address, V2, local="127.0.0.1")
            assert status == 200 and seen["client"] == list(REAL_V4)
        async with serving(ppu.wrap(http.lower(), trusted="127.0.0.1", untrusted_policy="REJECT")) as address:
            conn = await connect(address, V2, local="127.0.0.3")
            conn.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await closed(conn)
            await conn.close()

    run_on("asyncio", scenario)


async def closed(conn: Any) -> bool:
    """Whether the server closed the connection without a byte (an RST counts)."""
    try:
        return await asyncio.wait_for(conn.reader.read(), 5) == b""
    except ConnectionResetError:
        return True


def test_uvicorn_require_closes_connections_without_a_header(http: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxyproto")

    async def scenario() -> None:
        async with serving(http) as address:
            conn = await connect(address)
            conn.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await closed(conn)
            await conn.close()

    run_on("asyncio", scenario)
    assert any(
        "closed: " in r.getMessage() and "not a PROXY protocol signature" in r.getMessage() for r in caplog.records
    )


def test_uvicorn_shutdown_with_connections_waiting_for_their_header_is_prompt(http: str, loop: str) -> None:
    async def scenario() -> None:
        silent = []
        async with serving(ppu.wrap(http.lower(), header_timeout=60.0)) as address:
            for _ in range(20):
                silent.append(await asyncio.open_connection(*address))
            await asyncio.sleep(0.2)  # accepted, waiting for their header
            start = time.monotonic()
        elapsed = time.monotonic() - start
        assert elapsed < 2.0, f"shutdown took {elapsed:.2f} s with connections waiting for their header"
        for reader, writer in silent:
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    run_on(loop, scenario)


def test_uvicorn_slow_and_silent_clients_never_delay_a_good_one(http: str) -> None:
    async def scenario() -> None:
        async with serving(ppu.wrap(http.lower(), header_timeout=5.0)) as address:
            silent = [await asyncio.open_connection(*address) for _ in range(20)]
            slow = await connect(address)
            slow.writer.write(V2[:5])
            start = time.monotonic()
            status, seen = await get(address, V2)
            assert status == 200 and seen["client"] == list(REAL_V4)
            assert time.monotonic() - start < 0.5
            await slow.close()
            for _, writer in silent:
                writer.close()

    run_on("asyncio", scenario)


# -- settings from the environment ---------------------------------------------------------


def test_uvicorn_environment_defaults_trust_loopback_only() -> None:
    settings = settings_from_environment({})
    assert settings.policy is proxyproto.Policy.REQUIRE
    assert settings.untrusted_policy is proxyproto.Policy.SKIP
    assert settings.trusted == TrustedNetworks("127.0.0.1,::1")
    assert settings.header_timeout == 10.0 and settings.max_pending == 256


def test_uvicorn_environment_values_are_read_in_any_case() -> None:
    settings = settings_from_environment(
        {
            "PROXYPROTO_POLICY": "use",
            "PROXYPROTO_ALLOW_IPS": "10.0.0.0/8, 192.168.1.1",
            "PROXYPROTO_UNTRUSTED_POLICY": "Reject",
            "PROXYPROTO_HEADER_TIMEOUT": "2.5",
            "PROXYPROTO_MAX_PENDING": "64",
            "PROXYPROTO_LOG_RATE": "none",
            "PROXYPROTO_VERIFY_CHECKSUM": "Off",
            "PROXYPROTO_ALLOW_V4_IN_TCP6": "YES",
        }
    )
    assert settings.policy is proxyproto.Policy.USE and settings.untrusted_policy is proxyproto.Policy.REJECT
    assert settings.header_timeout == 2.5 and settings.max_pending == 64 and settings.log_rate is None
    assert settings.trusted == TrustedNetworks(["10.0.0.0/8", "192.168.1.1"])
    assert settings.verify_checksum is False and settings.allow_v4_in_tcp6 is True


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PROXYPROTO_POLICY", "v2"),
        ("PROXYPROTO_UNTRUSTED_POLICY", "USE"),
        ("PROXYPROTO_ALLOW_IPS", "10.0.0.0/33"),
        ("PROXYPROTO_HEADER_TIMEOUT", "soon"),
        ("PROXYPROTO_MAX_PENDING", "0"),
        ("PROXYPROTO_VERIFY_CHECKSUM", "maybe"),
    ],
)
def test_uvicorn_environment_refuses_bad_values_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}={value!r}: "):
        settings_from_environment({name: value})


def other_http_classes() -> list[Any]:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Custom(H11Protocol):  # a user's own class: not ours, even though it derives from uvicorn's
        pass

    classes: list[Any] = ["h11", H11Protocol, Custom]
    try:
        import httptools  # noqa: F401
    except ImportError:
        pass
    else:
        classes.append("httptools")
    return classes


def test_uvicorn_config_ssl_is_untouched_for_other_http_classes(tmp_path: Path) -> None:
    cert = self_signed(tmp_path) or pytest.skip("openssl is not installed")
    assert isinstance(cert, Certificate)
    from web_kit import app

    for http in other_http_classes():
        plain = uvicorn.Config(app, http=http, ssl_certfile=str(cert.cert), ssl_keyfile=str(cert.key))
        plain.load()
        assert plain.ssl is not None and plain.ssl is vars(plain)["ssl"], http
        plain.ssl = None  # writes go where a plain attribute's would
        assert plain.ssl is None and vars(plain)["ssl"] is None
        no_tls = uvicorn.Config(app, http=http)
        no_tls.load()
        assert no_tls.ssl is None
    for http in (ppu.H11, ppu.HttpTools, ppu.wrap("h11", header_timeout=5.0)):
        wrapped = uvicorn.Config(app, http=http, ssl_certfile=str(cert.cert), ssl_keyfile=str(cert.key))
        wrapped.load()
        assert wrapped.ssl is None and vars(wrapped)["ssl"] is not None


def test_uvicorn_importing_the_adapter_changes_nothing_outside_it() -> None:
    """Importing (and reloading) proxyproto.uvicorn, even with a bad PROXYPROTO_* value in the
    environment, leaves uvicorn's classes and modules as they were and never exits; only the
    config whose load() meets one of its classes with TLS is prepared, and no other."""
    import subprocess
    import sys

    from web_kit import HERE, ROOT

    code = """if True:
        import importlib, sys
        import uvicorn.config, uvicorn.server, uvicorn.main
        watched = (uvicorn.config.Config, uvicorn.server.Server, uvicorn.server.ServerState,
                   uvicorn.config, uvicorn.server, uvicorn.main, sys)
        before = [dict(vars(thing)) for thing in watched]
        import proxyproto.uvicorn as ppu
        importlib.reload(ppu)
        after = [dict(vars(thing)) for thing in watched]
        for thing, old, new in zip(watched, before, after):
            changed = {k for k in old.keys() | new.keys() if old.get(k) is not new.get(k)}
            changed -= {"modules", "path_importer_cache"} if thing is sys else set()
            assert not changed, (thing, changed)
        print("ok")
    """
    res = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{HERE}", "PROXYPROTO_POLICY": "sometimes"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_uvicorn_tls_takeover_is_per_config(tmp_path: Path) -> None:
    """A config loaded with a proxyproto class and TLS hides its context from create_server; a
    config loaded before or after it with uvicorn's own class keeps uvicorn's behaviour."""
    cert = self_signed(tmp_path) or pytest.skip("openssl is not installed")
    assert isinstance(cert, Certificate)
    from web_kit import app

    tls = {"ssl_certfile": str(cert.cert), "ssl_keyfile": str(cert.key)}
    configs = [uvicorn.Config(app, http=http, **tls) for http in ("h11", ppu.H11, "h11")]
    for config in configs:
        config.load()
    before, ours, after = configs
    assert type(before) is uvicorn.Config and type(after) is uvicorn.Config
    assert before.ssl is not None and after.ssl is not None
    assert isinstance(ours, uvicorn.Config) and type(ours) is not uvicorn.Config
    assert ours.ssl is None and vars(ours)["ssl"] is not None
    assert "ssl" not in vars(uvicorn.Config)


def test_uvicorn_tls_context_that_reaches_create_server_closes_every_connection_with_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Should uvicorn hand a proxyproto config's context to create_server after all (here: set
    after load(), as a uvicorn that no longer asks the class for alpn_protocols would), no
    connection is served (TLS would come before the header) and one ERROR line says why."""
    cert = self_signed(tmp_path) or pytest.skip("openssl is not installed")
    assert isinstance(cert, Certificate)
    from web_kit import app

    async def scenario() -> None:
        config = uvicorn.Config(app, http=ppu.H11, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
        config.load()
        config.ssl = cert.server_context()
        server = uvicorn.Server(config)
        task = asyncio.ensure_future(server.serve())
        while not server.started:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
        address = server.servers[0].sockets[0].getsockname()[:2]
        try:
            for _ in range(3):
                reader, writer = await asyncio.open_connection(*address)
                writer.write(V2 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    assert await asyncio.wait_for(reader.read(), 10) == b""
                except ConnectionResetError:
                    pass
                writer.close()
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)

    run_on("asyncio", scenario)
    # uvicorn's own logging (its handler, not propagated): one line on stderr for three connections.
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "before the PROXY header" in line]
    assert len(errors) == 1 and errors[0].startswith("ERROR:"), err


@pytest.mark.parametrize("policy", ["USE", "IGNORE", "REJECT"])
def test_uvicorn_wrap_with_an_opt_in_policy_and_ssl_is_refused_when_the_config_loads(
    policy: str, tmp_path: Path
) -> None:
    cert = self_signed(tmp_path) or pytest.skip("openssl is not installed")
    assert isinstance(cert, Certificate)
    from web_kit import app

    http = ppu.wrap("h11", policy=policy)  # fine without TLS
    config = uvicorn.Config(app, http=http, ssl_certfile=str(cert.cert), ssl_keyfile=str(cert.key))
    with pytest.raises(ValueError) as refused:  # an exception, never an exit from inside uvicorn
        config.load()
    line = str(refused.value)
    assert f"wrap(policy='{policy}')" in line and "--ssl-*" in line and "use REQUIRE (or SKIP)" in line
    assert type(config) is uvicorn.Config  # nothing was changed on the refused config
    plain = uvicorn.Config(app, http=http)
    plain.load()  # without TLS the same class is fine
    required = uvicorn.Config(app, http=ppu.wrap("h11"), ssl_certfile=str(cert.cert), ssl_keyfile=str(cert.key))
    required.load()  # REQUIRE and TLS are fine


# -- the real command line -------------------------------------------------------------------


@pytest.mark.parametrize("http_class", ["H11", "HttpTools"])
def test_uvicorn_cli_serves_the_real_client(http_class: str, tmp_path: Path) -> None:
    if http_class == "HttpTools":
        require_module("httptools")
    port = free_port()
    args = python("-m", "uvicorn", "web_kit:app", "--port", str(port), "--http", f"proxyproto.uvicorn:{http_class}")
    with command(args, port, workdir=tmp_path):

        async def scenario() -> None:
            status, seen = await get(("127.0.0.1", port), V2)
            assert status == 200 and seen["client"] == list(REAL_V4)
            status, seen = await get(("127.0.0.1", port), V1)
            assert status == 200 and seen["client"] == list(REAL_V4)

        run_on("asyncio", scenario)


@pytest.mark.parametrize("server_loop", ["asyncio", "uvloop"])
def test_uvicorn_cli_https_after_the_header_and_allow_ips_from_the_environment(
    server_loop: str, tmp_path: Path
) -> None:
    """Across processes, on both loops: 20 handshakes after a header and 20 from an untrusted
    peer (SKIP: the ClientHello first), none reset (uvloop reads once more before start_tls)."""
    if server_loop == "uvloop":
        require_module("uvloop")
    cert = self_signed(tmp_path) or pytest.skip("openssl is not installed")
    assert isinstance(cert, Certificate)
    port = free_port()
    args = python(
        "-m", "uvicorn", "web_kit:app", "--port", str(port), "--http", "proxyproto.uvicorn:H11",
        "--ssl-certfile", str(cert.cert), "--ssl-keyfile", str(cert.key), "--loop", server_loop,
    )  # fmt: skip
    with command(args, port, env={"PROXYPROTO_ALLOW_IPS": "127.0.0.1"}, workdir=tmp_path):

        async def scenario() -> None:
            tls = cert.client_context()
            for _ in range(20):
                status, seen = await get(("127.0.0.1", port), V2, tls=tls)
                assert status == 200 and seen["scheme"] == "https" and seen["client"] == list(REAL_V4)
                # 127.0.0.2 is not in PROXYPROTO_ALLOW_IPS: served without looking for a header.
                status, seen = await get(("127.0.0.1", port), b"", tls=tls, local="127.0.0.2")
                assert status == 200 and seen["client"][0] == "127.0.0.2"

        run_on("asyncio", scenario)


@pytest.mark.parametrize("server_loop", ["asyncio", "uvloop"])
def test_uvicorn_cli_stalled_tls_handshakes_are_closed_at_the_header_timeout(server_loop: str, tmp_path: Path) -> None:
    """--ssl-* and PROXYPROTO_HEADER_TIMEOUT=0.5: a trusted client that sends its header and then
    no ClientHello, and an untrusted one (SKIP) that sends nothing, are closed in about half a
    second, not after asyncio's 60 s handshake timeout."""
    if server_loop == "uvloop":
        require_module("uvloop")
    cert = self_signed(tmp_path) or pytest.skip("openssl is not installed")
    assert isinstance(cert, Certificate)
    port = free_port()
    args = python(
        "-m", "uvicorn", "web_kit:app", "--port", str(port), "--http", "proxyproto.uvicorn:H11",
        "--ssl-certfile", str(cert.cert), "--ssl-keyfile", str(cert.key), "--loop", server_loop,
    )  # fmt: skip
    env = {"PROXYPROTO_ALLOW_IPS": "127.0.0.1", "PROXYPROTO_HEADER_TIMEOUT": "0.5"}
    held: list[float] = []
    with command(args, port, env=env, workdir=tmp_path):

        async def stalled(head: bytes, local: str) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))
            writer.write(head)
            began = time.monotonic()
            try:
                while await asyncio.wait_for(reader.read(65536), 10):
                    pass
            except ConnectionResetError:
                pass
            held.append(time.monotonic() - began)
            writer.close()

        async def scenario() -> None:  # both at once: each is timed from its own start
            await asyncio.gather(stalled(V2, "127.0.0.1"), stalled(b"", "127.0.0.2"))

        run_on("asyncio", scenario)
    assert all(0.3 < seconds < 5.0 for seconds in held), held


@pytest.mark.parametrize(
    ("variable", "value"),
    [("PROXYPROTO_POLICY", "use"), ("PROXYPROTO_POLICY", "IGNORE"), ("PROXYPROTO_UNTRUSTED_POLICY", "reject")],
)
def test_uvicorn_cli_refuses_an_opt_in_policy_with_ssl_at_start_in_one_line(
    variable: str, value: str, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from web_kit import HERE, ROOT

    cert = self_signed(tmp_path) or pytest.skip("openssl is not installed")
    assert isinstance(cert, Certificate)
    res = subprocess.run(
        [sys.executable, "-m", "uvicorn", "web_kit:app", "--port", str(free_port()),
         "--http", "proxyproto.uvicorn:H11", "--ssl-certfile", str(cert.cert), "--ssl-keyfile", str(cert.key)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{HERE}", variable: value},
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == 3, res.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("ERROR:") and f"{variable}={value.upper()}" in lines[0] and "--ssl-*" in lines[0]


def test_uvicorn_cli_refuses_a_bad_environment_value_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from web_kit import HERE, ROOT

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "web_kit:app",
            "--port",
            str(free_port()),
            "--http",
            "proxyproto.uvicorn:H11",
        ],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{HERE}", "PROXYPROTO_POLICY": "sometimes"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == 3, res.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("ERROR:") and "PROXYPROTO_POLICY='sometimes'" in lines[0]


def test_uvicorn_cli_with_httptools_missing_stops_at_start_naming_it(tmp_path: Path) -> None:
    """``--http proxyproto.uvicorn:HttpTools`` where httptools cannot be imported: one ERROR line, exit 3."""
    import subprocess
    import sys

    from web_kit import HERE, ROOT

    no_httptools = "import sys; sys.modules['httptools'] = None; from uvicorn.main import main; main()"
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            no_httptools,
            "web_kit:app",
            "--port",
            str(free_port()),
            "--http",
            "proxyproto.uvicorn:HttpTools",
        ],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{HERE}"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == 3, res.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("ERROR:") and "needs httptools" in lines[0] and "proxyproto.uvicorn:H11" in lines[0]


def test_uvicorn_cli_default_logging_shows_proxyproto_lines_with_a_level_and_the_policy_at_start(
    tmp_path: Path,
) -> None:
    """Under uvicorn's own logging setup: the INFO policy line at start, a refusal as a WARNING, "proxyproto" once."""
    import contextlib
    import signal
    import socket

    port = free_port()
    args = python("-m", "uvicorn", "web_kit:app", "--port", str(port), "--http", "proxyproto.uvicorn:H11")
    with command(args, port, workdir=tmp_path) as proc:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # a trusted peer (loopback) without a header
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):  # closed with the request unread: a reset
                while sock.recv(4096):
                    pass
        # An untrusted peer (127.0.0.2 is outside the default list) that sends a header anyway.
        with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)) as sock:
            sock.sendall(proxyproto.encode_v1(REAL_V4, DEST_V4) + b"GET / HTTP/1.0\r\n\r\n")
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(4096):
                    pass
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    lines = (tmp_path / f"server-{port}.out").read_text().splitlines()
    ours = [line for line in lines if "proxyproto" in line]
    assert any(
        line.startswith("INFO:") and "proxyproto: PROXY header policy REQUIRE for 127.0.0.1/32, ::1/128" in line
        for line in ours
    ), lines
    refusals = [line for line in ours if "send-proxy" in line]
    assert len(refusals) == 1 and refusals[0].startswith("WARNING:"), lines
    assert refusals[0].count("proxyproto") == 1, refusals[0]
    assert "proxyproto: 127.0.0.1:" in refusals[0] and "PROXYPROTO_ALLOW_IPS is 127.0.0.1/32, ::1/128" in refusals[0]
    untrusted = [line for line in ours if "sent a PROXY header but is not trusted" in line]
    assert len(untrusted) == 1 and untrusted[0].startswith("WARNING:"), lines
    assert "proxyproto: 127.0.0.2:" in untrusted[0] and "add its address to PROXYPROTO_ALLOW_IPS" in untrusted[0]


def test_uvicorn_cli_behind_real_haproxy_send_proxy_v2(tmp_path: Path) -> None:
    exe = require_haproxy()
    backend, front = free_port(), free_port()
    args = python("-m", "uvicorn", "web_kit:app", "--port", str(backend), "--http", "proxyproto.uvicorn:HttpTools")
    require_module("httptools")
    config = (
        "global\n    nbthread 1\ndefaults\n    mode tcp\n    timeout connect 2s\n"
        "    timeout client 5s\n    timeout server 5s\n\n"
        f"listen fe\n    bind 127.0.0.1:{front}\n    server app 127.0.0.1:{backend} send-proxy-v2\n"
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config)
    with command(args, backend, workdir=tmp_path), command([exe, "-f", str(cfg), "-db"], front, workdir=tmp_path):

        async def scenario() -> None:
            conn = await connect(("127.0.0.1", front), local="127.0.0.2")
            own = conn.writer.get_extra_info("sockname")
            try:
                for _ in range(3):  # keep-alive through haproxy
                    status, seen = await conn.request()
                    assert status == 200 and seen["client"] == [own[0], own[1]]
            finally:
                await conn.close()

        run_on("asyncio", scenario)
