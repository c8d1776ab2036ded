"""One-node rendezvous on the loopback address only.

The engine's own single-node store listens on every interface (`*:port`, whatever host it is given).
Here fastlaunch binds the socket itself, on 127.0.0.1, before anything starts, and hands it to the store
(TCPStore's master_listen_fd): nothing of the job listens outside this machine, a busy --port is an
error at once, and port 0 lets the kernel pick a free port with no probe-then-bind race between jobs.
"""
from __future__ import annotations

import errno
import socket
from datetime import timedelta

from torch.distributed import PrefixStore, TCPStore
from torch.distributed.elastic.rendezvous import (RendezvousHandler, RendezvousInfo, RendezvousParameters,
                                                  rendezvous_handler_registry)
from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo

from ..errors import UsageError

__all__ = ["bind_loopback", "LoopbackRendezvous", "BACKEND", "register", "hand_over"]

BACKEND = "fastlaunch-loopback"
_STORE_TIMEOUT = timedelta(minutes=30)
_listener: socket.socket | None = None  # bound by the launcher, handed to the handler the engine creates


def bind_loopback(port: int | None) -> socket.socket:
    """A listening socket on 127.0.0.1 (port 0: a free one); a busy port is a UsageError."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port or 0))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UsageError("--port is already in use on 127.0.0.1", port,
                             "leave --port out (a free port is taken), or pick another") from None
        raise UsageError("cannot listen on 127.0.0.1", f"port {port}: {err.strerror}",
                         "leave --port out, or pick a port from 1024 to 65535") from None
    sock.listen(128)
    return sock


class LoopbackRendezvous(RendezvousHandler):
    """The single node is rank 0 of 1; the store is served from the socket fastlaunch bound."""

    def __init__(self, params: RendezvousParameters, listener: socket.socket):
        self._run_id, self._listener = params.run_id, listener
        self._port = listener.getsockname()[1]
        self._store: TCPStore | None = None
        self._round, self._closed = 0, False

    def get_backend(self) -> str:
        return BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True  # the ranks use this store too (MASTER_ADDR/MASTER_PORT point at it)

    def next_rendezvous(self) -> RendezvousInfo:
        if self._store is None:
            self._store = TCPStore("127.0.0.1", self._port, None, True, timeout=_STORE_TIMEOUT,
                                   wait_for_workers=False, master_listen_fd=self._listener.detach())
        self._round += 1
        store = PrefixStore(f"fastlaunch.launcher.rendezvous.{self._run_id}.{self._round}", self._store)
        return RendezvousInfo(store, rank=0, world_size=1,
                              bootstrap_store_info=RendezvousStoreInfo("127.0.0.1", self._port))

    def is_closed(self) -> bool:
        return self._closed

    def set_closed(self) -> None:
        self._closed = True

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self._run_id

    def shutdown(self) -> bool:
        self._closed = True
        return True


def _create(params: RendezvousParameters) -> RendezvousHandler:
    if _listener is None:
        raise RuntimeError("the loopback rendezvous needs a socket bound by fastlaunch first")
    return LoopbackRendezvous(params, _listener)


def register() -> None:
    """Make the handler known to the engine (once per process)."""
    try:
        rendezvous_handler_registry.register(BACKEND, _create)
    except ValueError:
        pass  # already registered


def hand_over(listener: socket.socket) -> None:
    """The socket the next loopback rendezvous serves its store from."""
    global _listener
    _listener = listener
