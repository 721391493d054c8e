"""The knobs' bounds, refused at start with the knob's name in every adapter and environment variable.

``max_header_size`` lies in 16..65551 (a v2 header's fixed part .. the protocol's maximum);
``header_timeout`` is a number of seconds in 0.001..3600 (never nan or inf); ``log_rate`` is
None or a finite number >= 0; ``max_pending`` an integer >= 1.  Each bad value is refused
with a ``ValueError`` naming the knob as that adapter spells it (``proxy_max_header_size`` on
the socketserver mixins, ``max_header_size`` as a keyword argument,
``PROXYPROTO_MAX_HEADER_SIZE`` in uvicorn's environment), before anything is bound; each
bound itself is accepted.
"""

from __future__ import annotations

import asyncio
import math
import socketserver
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from support import free_port, require_module

import proxyproto
from proxyproto import aio, udp
from proxyproto.aio_protocol import wrap_protocol_factory
from proxyproto.settings import settings_from_environment

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: knob -> values refused
BAD: dict[str, list[Any]] = {
    "max_header_size": [15, 65552, 10**9, 4096.0, True, "4096"],
    "header_timeout": [0, 0.0009, 1e-9, -1, 3600.5, math.inf, math.nan, True, "10"],
    "log_rate": [-1, math.nan, math.inf, -math.inf, True, "20"],
    "max_pending": [0, -1, 1.5, True, "256"],
}
#: knob -> the bounds themselves (and other good values), accepted
GOOD: dict[str, list[Any]] = {
    "max_header_size": [16, 65551, 4096],
    "header_timeout": [0.001, 3600, 0.2, 10],
    "log_rate": [None, 0, 0.5, 20],
    "max_pending": [1, 256, 100_000],
}
#: The knobs each kind of adapter takes (the UDP mixin has no header deadline and no parking).
UDP_KNOBS = ("max_header_size", "log_rate")


class Nothing(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        pass


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


# -- one way to pass a knob per adapter: each raises ValueError (or builds and closes its server) --


def mixin_attribute(knob: str, value: Any) -> None:
    server = proxyproto.ThreadingProxyTCPServer(("127.0.0.1", 0), Nothing)
    try:
        setattr(server, f"proxy_{knob}", value)
    finally:
        server.server_close()


def mixin_class_attribute(knob: str, value: Any) -> None:
    cls = type("Configured", (proxyproto.ThreadingProxyTCPServer,), {f"proxy_{knob}": value})
    cls(("127.0.0.1", 0), Nothing).server_close()


def udp_attribute(knob: str, value: Any) -> None:
    server = udp.ProxyUDPServer(("127.0.0.1", 0), Nothing)
    try:
        setattr(server, f"proxy_{knob}", value)
    finally:
        server.server_close()


def udp_class_attribute(knob: str, value: Any) -> None:
    cls = type("Configured", (udp.ProxyUDPServer,), {f"proxy_{knob}": value})
    cls(("127.0.0.1", 0), Nothing).server_close()


def aio_start_server(knob: str, value: Any) -> None:
    async def start() -> None:
        server = await aio.start_server(lambda r, w: None, "127.0.0.1", 0, **{knob: value})
        server.close()
        await server.wait_closed()

    run(start())


def protocol_factory(knob: str, value: Any) -> None:
    wrap_protocol_factory(asyncio.Protocol, **{knob: value})


def uvicorn_wrap(knob: str, value: Any) -> None:
    require_module("uvicorn")
    import proxyproto.uvicorn as ppu

    ppu.wrap("h11", **{knob: value})


def aiohttp_site(knob: str, value: Any) -> None:
    require_module("aiohttp")
    from aiohttp import web

    from proxyproto.aiohttp import ProxyTCPSite

    async def build() -> None:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        try:
            ProxyTCPSite(runner, "127.0.0.1", 0, **{knob: value})
        finally:
            await runner.cleanup()

    run(build())


def aiohttp_run_app(knob: str, value: Any) -> None:
    """``run_app`` with the knob; with a value it accepts, the application stops once it listens."""
    require_module("aiohttp")
    from aiohttp import web

    from proxyproto.aiohttp import run_app

    def graceful_exit() -> None:
        raise web.GracefulExit()  # what aiohttp's SIGTERM handler raises

    def started(line: str) -> None:
        asyncio.get_running_loop().call_soon(graceful_exit)

    run_app(web.Application(), host="127.0.0.1", port=0, print=started, handle_signals=False, **{knob: value})


def hypercorn_serve(knob: str, value: Any) -> None:
    require_module("hypercorn")
    from hypercorn.config import Config

    from proxyproto.hypercorn import serve

    config = Config()
    config.bind = [f"127.0.0.1:{free_port()}"]

    async def stop_at_once() -> None:
        pass

    run(serve(lambda *a: None, config, shutdown_trigger=stop_at_once, **{knob: value}))


def waitress_server(knob: str, value: Any) -> None:
    require_module("waitress")
    from proxyproto.waitress import create_server

    server = create_server(lambda e, s: [], listen="127.0.0.1:0", **{knob: value})
    server.close()


ADAPTERS: dict[str, tuple[Callable[[str, Any], None], str]] = {
    # name -> (set the knob, how the error names it: {knob} is replaced)
    "socketserver-mixin-instance": (mixin_attribute, "proxy_{knob}"),
    "socketserver-mixin-class": (mixin_class_attribute, "proxy_{knob}"),
    "udp-mixin-instance": (udp_attribute, "proxy_{knob}"),
    "udp-mixin-class": (udp_class_attribute, "proxy_{knob}"),
    "aio.start_server": (aio_start_server, "{knob}"),
    "wrap_protocol_factory": (protocol_factory, "{knob}"),
    "uvicorn.wrap": (uvicorn_wrap, "{knob}"),
    "aiohttp.ProxyTCPSite": (aiohttp_site, "{knob}"),
    "aiohttp.run_app": (aiohttp_run_app, "{knob}"),
    "hypercorn.serve": (hypercorn_serve, "{knob}"),
    "waitress.create_server": (waitress_server, "{knob}"),
}


def cases(table: dict[str, list[Any]]) -> list[Any]:
    return [
        pytest.param(adapter, knob, value, id=f"{adapter}-{knob}={value!r}")
        for adapter in ADAPTERS
        for knob, values in table.items()
        for value in values
        if knob in UDP_KNOBS or not adapter.startswith("udp")
    ]


@pytest.mark.parametrize(("adapter", "knob", "value"), cases(BAD))
def test_a_knob_out_of_bounds_is_refused_at_start_naming_the_knob(adapter: str, knob: str, value: Any) -> None:
    apply, spelling = ADAPTERS[adapter]
    name = spelling.format(knob=knob)
    with pytest.raises(ValueError, match=rf"(^|\W){name}\b") as refused:
        apply(knob, value)
    if not name.startswith("proxy_"):  # the adapter spells it without the mixin's prefix
        assert f"proxy_{knob}" not in str(refused.value)


@pytest.mark.parametrize(("adapter", "knob", "value"), cases(GOOD))
def test_a_knob_at_its_bounds_is_accepted(adapter: str, knob: str, value: Any) -> None:
    apply, _ = ADAPTERS[adapter]
    apply(knob, value)


# -- uvicorn's environment --------------------------------------------------------------------

ENV_BAD = [
    ("PROXYPROTO_MAX_HEADER_SIZE", "15"),
    ("PROXYPROTO_MAX_HEADER_SIZE", "65552"),
    ("PROXYPROTO_MAX_HEADER_SIZE", "8000000"),
    ("PROXYPROTO_HEADER_TIMEOUT", "0"),
    ("PROXYPROTO_HEADER_TIMEOUT", "1e-9"),
    ("PROXYPROTO_HEADER_TIMEOUT", "inf"),
    ("PROXYPROTO_HEADER_TIMEOUT", "nan"),
    ("PROXYPROTO_HEADER_TIMEOUT", "86400"),
    ("PROXYPROTO_LOG_RATE", "nan"),
    ("PROXYPROTO_LOG_RATE", "inf"),
    ("PROXYPROTO_LOG_RATE", "-1"),
    ("PROXYPROTO_MAX_PENDING", "0"),
    ("PROXYPROTO_MAX_PENDING", "-5"),
]


@pytest.mark.parametrize(("variable", "text"), ENV_BAD)
def test_an_environment_value_out_of_bounds_is_refused_naming_the_variable(variable: str, text: str) -> None:
    with pytest.raises(ValueError, match=rf"^{variable}={text!r}: "):
        settings_from_environment({variable: text})


@pytest.mark.parametrize(
    ("variable", "text", "value"),
    [
        ("PROXYPROTO_MAX_HEADER_SIZE", "16", 16),
        ("PROXYPROTO_MAX_HEADER_SIZE", "65551", 65551),
        ("PROXYPROTO_HEADER_TIMEOUT", "0.001", 0.001),
        ("PROXYPROTO_HEADER_TIMEOUT", "3600", 3600.0),
        ("PROXYPROTO_LOG_RATE", "0", 0.0),
        ("PROXYPROTO_LOG_RATE", "none", None),
        ("PROXYPROTO_MAX_PENDING", "1", 1),
    ],
)
def test_an_environment_value_at_its_bounds_is_accepted(variable: str, text: str, value: Any) -> None:
    settings = settings_from_environment({variable: text})
    assert getattr(settings, variable.removeprefix("PROXYPROTO_").lower()) == value


UVICORN_H11 = [sys.executable, "-m", "uvicorn", "web_kit:app", "--http", "proxyproto.uvicorn:H11", "--port", "0"]


def test_uvicorn_command_line_with_a_header_size_above_the_protocols_maximum_stops_at_start() -> None:
    require_module("uvicorn")
    res = subprocess.run(
        UVICORN_H11,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{ROOT}:{HERE / 'web'}",
            "PROXYPROTO_MAX_HEADER_SIZE": "8000000",
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode != 0 and "PROXYPROTO_MAX_HEADER_SIZE" in res.stderr and "65551" in res.stderr
