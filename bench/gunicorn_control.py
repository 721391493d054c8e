"""A control for the gunicorn benchmarks: gunicorn's own sync worker serving with the settings as this library's do.

``proxyproto.gunicorn``'s WSGI workers serve their connections with gunicorn's settings read once into
plain attributes (``_ServedConfig``), where gunicorn's ``Config`` answers each of the twenty or so
reads of a request through ``__getattr__`` (on CPython 3.11 after a failed lookup whose
``AttributeError`` message is formatted: about 460 ns each).  That saving is not the header's: any
worker could make it.  :class:`SyncServedSettings` is gunicorn's sync worker with the same settings
object and nothing else changed, so with it as the baseline (and as gunicorn's own PROXY row, which
is the same class with ``--proxy-protocol``) the comparison isolates what the header costs::

    python bench/gunicorn_pair.py --pin --clients 4 --only sync,sync-gunicorn-proxy,sync-proxyproto \\
        --sync gunicorn_control.SyncServedSettings
    python bench/instructions.py gunicorn --gunicorn served,served-gunicorn-proxy,sync-proxyproto

Importable by a gunicorn worker with ``bench/`` on its path (the scripts put it there).
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.sync import SyncWorker  # type: ignore[import-untyped,import-not-found,unused-ignore]

from proxyproto.gunicorn import _ServedConfig


class SyncServedSettings(SyncWorker):  # type: ignore[misc]
    """gunicorn's sync worker, its connections served with ``proxyproto.gunicorn``'s settings object."""

    def run(self) -> Any:
        self.cfg = _ServedConfig(self.cfg)
        return super().run()
