"""Spread keep-alive connections evenly over uvicorn's worker processes.

With `workers > 1` every process accepts from one shared listening socket and keeps each
connection it wins for the connection's life. The race is not load-aware: 32 keep-alive
clients split 21/11 and stayed so (bench/PROFILE.md), and with one HSM session per process
the larger share queues behind its session while the other process idles. That split, not
slow requests, set p99.

So each process publishes its open-connection count in a small shared table (an mmap'd file,
one slot per process, the slot held by a POSIX record lock so that a dead process's slot is
ignored) and leaves a waiting connection to a peer while it holds more connections than the
least loaded live peer. A connection is never refused: after `MAX_DEFER` seconds the process
that saw it accepts it anyway, so a peer that stopped accepting costs a short delay at most.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, cast

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import multiprocess

from hsmscep.web import affinity, orphans, scrape

log = logging.getLogger(__name__)

TABLE_ENV = "HSMSCEP_CONNECTION_TABLE"
MAX_DEFER = 0.05  # seconds a process leaves a waiting connection to its peers
RECHECK = 0.005  # seconds between looks at the table while deferring
ACCEPT_ERROR_PAUSE = 0.5  # out of file descriptors and the like: retry after this
READY_TIMEOUT = 60.0  # seconds a restarted worker may take to start serving
_SLOT = struct.Struct("=q")
_NOT_ACCEPTING = -1


class ConnectionTable:
    """One process's view of the shared table: its own slot, and its peers' counts."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(self._fd).st_size
            self._slots = size // _SLOT.size
            self._map = mmap.mmap(self._fd, size)
            self.slot = self._claim()
        except BaseException:
            os.close(self._fd)
            raise

    @staticmethod
    @contextmanager
    def created(slots: int) -> Iterator[str]:
        """A fresh table file for `slots` processes, removed again on exit."""
        fd, path = tempfile.mkstemp(prefix="hsmscep-connections-")
        try:
            os.write(fd, _SLOT.pack(_NOT_ACCEPTING) * slots)
            os.close(fd)
            yield path
        finally:
            os.unlink(path)

    def publish(self, count: int) -> None:
        """Tell the peers how many connections this process holds (-1: not accepting)."""
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, count)

    def least_loaded_peer(self) -> int | None:
        """The smallest connection count of a live, accepting peer; None without one."""
        least: int | None = None
        for slot in range(self._slots):
            if slot == self.slot:
                continue
            (count,) = _SLOT.unpack_from(self._map, slot * _SLOT.size)
            if count >= 0 and (least is None or count < least) and self._held(slot):
                least = count
        return least

    def close(self) -> None:
        self.publish(_NOT_ACCEPTING)
        self._map.close()
        os.close(self._fd)  # also releases the slot's lock

    def _claim(self) -> int:
        # A slot is owned by whoever holds the lock on its byte; the kernel drops the lock when
        # its process dies, so a replacement worker finds a free slot without any cleanup.
        for slot in range(self._slots):
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    continue
                raise
            # Claimed before the process can accept (its slot also picks its CPU): peers must
            # not leave connections to it until its listener publishes a count.
            _SLOT.pack_into(self._map, slot * _SLOT.size, _NOT_ACCEPTING)
            return slot
        raise OSError(f"no free slot in the connection table ({self._slots} slots)")

    def _held(self, slot: int) -> bool:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, slot)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return True
            raise
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, slot)
        return False


class BalancedListener:
    """Accepts from a shared listening socket, deferring to less loaded peer processes.

    Stands in for the asyncio Server that uvicorn keeps in `Server.servers` (close and
    wait_closed are all it uses).
    """

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        table: ConnectionTable,
        connections: Sized,
    ) -> None:
        self._sock = sock
        self._factory = protocol_factory
        self._table = table
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._starting: set[asyncio.Task[Any]] = set()
        self._deferred_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        sock.setblocking(False)
        self.publish()
        self._loop.add_reader(sock.fileno(), self._readable)

    def count(self) -> int:
        """Open connections, counting accepted ones whose protocol is not set up yet."""
        return len(self._connections) + len(self._starting)

    def publish(self) -> None:
        if not self._closed:
            self._table.publish(self.count())

    def close(self) -> None:
        """Stop accepting; connections already accepted are uvicorn's to drain."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._table.publish(_NOT_ACCEPTING)

    async def wait_closed(self) -> None:
        if self._starting:
            await asyncio.wait(self._starting)

    def _readable(self) -> None:
        count = self.count()
        self._table.publish(count)
        if self._defer(count):
            self._pause(RECHECK)
            return
        self._deferred_since = None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return  # a peer took it
        except OSError as exc:
            # EMFILE, ENFILE, ENOBUFS: the connection stays in the backlog; do not spin on it.
            log.error("accept failed: %s", exc)
            self._pause(ACCEPT_ERROR_PAUSE)
            return
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
        self._starting.add(task)
        task.add_done_callback(self._started)
        self.publish()

    def _defer(self, count: int) -> bool:
        least = self._table.least_loaded_peer()
        if least is None or count <= least:
            return False
        now = self._loop.time()
        if self._deferred_since is None:
            self._deferred_since = now
        return now - self._deferred_since < MAX_DEFER

    def _pause(self, delay: float) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._timer = self._loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if self._closed:
            return
        if not self._poll.poll(0):
            self._deferred_since = None  # a peer took the connection we left
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def _started(self, task: asyncio.Task[Any]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("accepted connection failed to start: %s", task.exception())
        self.publish()


class BalancedServer(uvicorn.Server):
    """uvicorn's Server, accepting through a BalancedListener when the table is set."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._table: ConnectionTable | None = None
        self._listeners: list[BalancedListener] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        path = os.environ.get(TABLE_ENV)
        if sockets is None or path is None:
            await super().startup(sockets)
            return
        # The supervisor owns SIGHUP (a graceful restart); a terminal's hangup, sent to the
        # whole process group, must not kill the workers under it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._table = ConnectionTable(path)
        pinned = os.environ.get(affinity.ENV)
        if pinned:
            # Before the lifespan starts the signing, store and HSM threads: they inherit it.
            cpus = [int(cpu) for cpu in pinned.split(",")]
            affinity.pin_process(affinity.cpu_for(self._table.slot, cpus))
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config
        state = self.server_state

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state=self.lifespan.state
            )

        self._listeners = [
            BalancedListener(sock, create_protocol, self._table, state.connections)
            for sock in sockets
        ]
        self.servers = cast(list[asyncio.base_events.Server], self._listeners)
        self.started = True

    async def on_tick(self, counter: int) -> bool:
        # Closed connections lower the count between accepts: keep the peers' view fresh.
        for listener in self._listeners:
            listener.publish()
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self._table is not None:
            self._table.close()


class _BalancedProcess(multiprocess.Process):
    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        self._supervisor = os.getpid()  # in the supervisor: the child gets it pickled
        super().__init__(config, sockets)

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # in the worker
        orphans.exit_with_parent(self._supervisor)
        super().target(sockets)

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = BalancedServer(config=self.config)
        return self._server

    def join(self) -> None:
        super().join()
        scrape.process_exited(self.pid)  # restarts and SIGHUP: its live gauges leave the sums

    def wait_until_ready(self, timeout: float, should_exit: threading.Event | None = None) -> bool:
        # A SIGHUP replacement logs into the HSM and warms its pool first: on a loaded host
        # that takes longer than the health-check timeout, which must stay short, as a dead
        # worker is only noticed when a ping of that length times out.
        return bool(super().wait_until_ready(max(timeout, READY_TIMEOUT), should_exit))


class _Supervisor(multiprocess.Multiprocess):
    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], check: Callable[[], bool]
    ) -> None:
        super().__init__(config, sockets)
        self._check = check

    def handle_hup(self) -> None:
        # A broken configuration must not replace working workers with failing ones.
        if self._check():
            super().handle_hup()

    @property
    def startup_failed(self) -> bool:
        return any(process.exitcode == STARTUP_FAILURE for process in self.processes)


def serve(config: uvicorn.Config, before_restart: Callable[[], bool] = lambda: True) -> int:
    """Run `config.workers` uvicorn processes that share their connections evenly.

    SIGHUP replaces each worker by a fresh one, ready before its predecessor stops, if
    `before_restart()` agrees. Returns STARTUP_FAILURE if a worker failed to start, else 0.
    """
    sock = config.bind_socket()
    sock.listen(config.backlog)  # uvicorn leaves this to create_server, which we do not call
    # Multiprocess builds its workers from this module-level name, at start and on every
    # restart; this process does nothing but supervise them.
    multiprocess.Process = _BalancedProcess  # type: ignore[misc]
    # Spare slots: a restart brings a replacement up before its predecessor exits.
    with ConnectionTable.created(2 * config.workers) as path:
        os.environ[TABLE_ENV] = path
        supervisor = _Supervisor(config, [sock], before_restart)
        try:
            supervisor.run()
        finally:
            del os.environ[TABLE_ENV]
            sock.close()
    return STARTUP_FAILURE if supervisor.startup_failed else 0
