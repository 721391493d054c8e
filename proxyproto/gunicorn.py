"""gunicorn workers that read the PROXY header first: ``gunicorn -k proxyproto.gunicorn.SyncWorker app:app``.

Four worker classes, each gunicorn's own (or uvicorn's) with the header read
by this library before anything else touches the connection (TLS included)::

    gunicorn -k proxyproto.gunicorn.SyncWorker app:app           # WSGI, one connection at a time
    gunicorn -k proxyproto.gunicorn.ThreadWorker app:app         # WSGI, gthread (--threads N)
    gunicorn -k proxyproto.gunicorn.UvicornWorker app:app        # ASGI, uvicorn's httptools protocol
    gunicorn -k proxyproto.gunicorn.UvicornH11Worker app:app     # ASGI, uvicorn's h11 protocol

Settings (docs/gunicorn.rst): gunicorn's ``--proxy-allow-from`` is the trust
list, ``--proxy-protocol`` chooses the policy (:data:`PROXY_PROTOCOL_POLICIES`),
and the ``PROXYPROTO_*`` environment variables
(:func:`proxyproto.settings.settings_from_environment`) give the rest; a flag
and its variable that disagree stop gunicorn at start, naming both
(:func:`settings_from_gunicorn`).  gunicorn's own PROXY parsing is turned off
in these workers, so a header is never read twice.  Each worker logs one
line at start naming the policy and the trusted peers.

What the application sees: the WSGI workers put the real client in
``REMOTE_ADDR`` and ``REMOTE_PORT`` and a trusted peer's parsed header
(TLVs included) in ``environ["proxyproto.header"]``; the uvicorn workers
are :mod:`proxyproto.uvicorn`'s classes (``scope["client"]``, and the header
at ``scope["extensions"]["proxyproto"]["header"]``).  With gunicorn's
``--certfile``/``--keyfile``, TLS is negotiated after the header.

Importing this module imports gunicorn (its users' only); the uvicorn
workers import uvicorn when first used.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping
from typing import Any, ClassVar

from .logs import show_through
from .policy import Policy, TrustedNetworks
from .settings import VARIABLES, Settings, settings_from_environment

__all__ = [
    "UvicornH11Worker",
    "UvicornWorker",
    "settings_from_gunicorn",
]

logger = logging.getLogger("proxyproto")

#: The WSGI environ key holding a trusted peer's parsed :class:`~proxyproto.ProxyHeader` (or None).
ENVIRON_KEY = "proxyproto.header"

#: gunicorn's ``--proxy-protocol`` values (as its validator normalises them) and the policy each means
#: for trusted peers.  ``off`` (gunicorn's default, which cannot be told from an absent flag) leaves the
#: policy to ``PROXYPROTO_POLICY`` (default REQUIRE): these workers exist to read the header.
PROXY_PROTOCOL_POLICIES: Mapping[str, Policy | None] = {
    "off": None,
    "v1": Policy.REQUIRE,
    "v2": Policy.REQUIRE,
    "auto": Policy.USE,
}

_FLAGS = {"trusted": "--proxy-allow-from", "policy": "--proxy-protocol"}


class GunicornSettings(Settings):
    """:class:`~proxyproto.settings.Settings` whose log lines name gunicorn's flag for the knobs a flag gave."""

    __slots__ = ("flags",)
    flags: frozenset[str]

    def name_of(self, knob: str) -> str:
        if knob in self.flags:
            return _FLAGS[knob]
        return VARIABLES.get(knob, knob)


def settings_from_gunicorn(cfg: Any, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings of a worker: gunicorn's flags in ``cfg``, the ``PROXYPROTO_*`` variables of ``environ``.

    * ``trusted``: ``--proxy-allow-from`` when it is not gunicorn's default
      (``127.0.0.1,::1``, also proxyproto's), else ``PROXYPROTO_ALLOW_IPS``.
    * ``policy``: ``--proxy-protocol`` as :data:`PROXY_PROTOCOL_POLICIES`
      maps it, else ``PROXYPROTO_POLICY``.
    * everything else: the ``PROXYPROTO_*`` variables.

    A flag and its variable both given with different meanings raise
    ``ValueError`` naming both (which of them should win is the operator's
    call, not a guess); so does any invalid variable.  ``environ`` defaults to
    ``os.environ`` (in a worker, gunicorn's ``--env`` values are there too).
    """
    env = os.environ if environ is None else environ
    settings = settings_from_environment(env)
    changes: dict[str, Any] = {}
    flags = set()
    allow = ",".join(cfg.proxy_allow_ips)
    if TrustedNetworks(allow) != TrustedNetworks(cfg.settings["proxy_allow_ips"].default):
        variable = env.get(VARIABLES["trusted"])
        if variable is not None and settings.trusted != TrustedNetworks(allow):
            raise ValueError(
                f"--proxy-allow-from {allow} and {VARIABLES['trusted']}={variable.strip()} disagree: "
                "give the peers trusted to send a PROXY header once"
            )
        changes["trusted"] = allow
        flags.add("trusted")
    mode = cfg.proxy_protocol
    policy = PROXY_PROTOCOL_POLICIES.get(mode)
    if policy is not None:
        variable = env.get(VARIABLES["policy"])
        if variable is not None and settings.policy is not policy:
            raise ValueError(
                f"--proxy-protocol {mode} (policy {policy.name}) and {VARIABLES['policy']}={variable.strip()} "
                "disagree: give the policy once"
            )
        changes["policy"] = policy
        flags.add("policy")
    made = GunicornSettings(**{**settings.values(), **changes})
    object.__setattr__(made, "flags", frozenset(flags))
    return made


def _startup_check(cfg: Any, *, tls_after_header_async: bool = False) -> Settings:
    """The settings for ``cfg`` in the arbiter's environment (with ``--env``); RuntimeError naming what is wrong.

    gunicorn's arbiter calls a worker class's ``check_config`` before it
    forks any worker, and shows a ``RuntimeError`` as one ``Error:`` line
    before exiting with status 1: a misconfiguration stops gunicorn at start.
    """
    try:
        settings = settings_from_gunicorn(cfg, {**os.environ, **cfg.env})
        if tls_after_header_async and cfg.is_ssl:
            from .aio_protocol import ProxyProtocolFactory

            ProxyProtocolFactory(_no_protocol, ssl=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), settings=settings)
    except ValueError as exc:
        raise RuntimeError(f"proxyproto.gunicorn: {exc}") from None
    return settings


def _no_protocol() -> Any:  # pragma: no cover - only checked, never called
    raise RuntimeError("never called")


def _log_policy(settings: Settings, tls: bool) -> None:
    """The INFO line a WSGI worker writes at start: its policy, the trusted peers, where they come from, TLS.

    (The uvicorn workers write :mod:`proxyproto.uvicorn`'s line, from the settings made here.)
    """
    show_through("gunicorn.error")  # under gunicorn's logging, proxyproto's lines show with its format
    after = "; TLS is negotiated after the header" if tls else ""
    logger.info(
        "PROXY header policy %s for %s, %s for other peers (policy from %s, trusted peers from %s; "
        "gunicorn's own PROXY parsing is off)%s",
        settings.policy.name,
        settings.trusted.describe(),
        settings.untrusted_policy.name,
        settings.name_of("policy"),
        settings.name_of("trusted"),
        after,
    )


# -- uvicorn's workers --------------------------------------------------------------------------


def _uvicorn_worker_base() -> type:
    """uvicorn's gunicorn worker: the ``uvicorn-worker`` package's, else ``uvicorn.workers``' (deprecated there)."""
    try:
        from uvicorn_worker import UvicornWorker as base  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from uvicorn.workers import UvicornWorker as base  # type: ignore[import-untyped,import-not-found,unused-ignore]
    made: type = base
    return made


#: Made on first use by the module's ``__getattr__`` (uvicorn is imported then).
UvicornWorker: type
UvicornH11Worker: type


def __getattr__(name: str) -> Any:
    """``UvicornWorker`` and ``UvicornH11Worker``, made on first use (uvicorn is imported then, not before)."""
    if name in ("UvicornWorker", "UvicornH11Worker"):
        made = _UVICORN.get(name)
        if made is None:
            made = _UVICORN[name] = _make_uvicorn_worker(name)
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_UVICORN: dict[str, type] = {}


def _make_uvicorn_worker(name: str) -> type:
    base = _uvicorn_worker_base()
    http = "httptools" if name == "UvicornWorker" else "h11"
    loop = "auto" if name == "UvicornWorker" else "asyncio"

    class ProxyUvicornWorker(base):  # type: ignore[valid-type,misc]
        """uvicorn's gunicorn worker serving through :mod:`proxyproto.uvicorn`'s HTTP class (``http``)."""

        CONFIG_KWARGS: ClassVar[dict[str, Any]] = {**getattr(base, "CONFIG_KWARGS", {}), "loop": loop, "http": http}

        @classmethod
        def check_config(cls, cfg: Any, log: Any) -> None:
            checked = getattr(super(), "check_config", None)
            if checked is not None:
                checked(cfg, log)
            _startup_check(cfg, tls_after_header_async=True)

        def run(self) -> Any:
            from . import uvicorn as proxy_uvicorn

            settings = settings_from_gunicorn(self.cfg)  # its INFO line comes from proxyproto.uvicorn
            self.config.http = proxy_uvicorn.wrap(http, settings=settings)
            allowed = self.config.forwarded_allow_ips
            if isinstance(allowed, list):  # gunicorn's list: as uvicorn's own text, so its default is seen as such
                self.config.forwarded_allow_ips = ",".join(allowed)
            return super().run()

    ProxyUvicornWorker.__name__ = ProxyUvicornWorker.__qualname__ = name
    ProxyUvicornWorker.__module__ = __name__
    ProxyUvicornWorker.__doc__ = (
        f"``gunicorn -k {__name__}.{name}``: uvicorn's worker with uvicorn's {http} protocol after the PROXY header."
    )
    return ProxyUvicornWorker
