"""The Unix-socket listener: accept VMMs, read their handshake, run one session each.

Every connection is its own task: a malformed handshake is answered with one JSON error
line and closed, and nothing else notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
from collections.abc import Callable, Iterable

import structlog

from uffdd import ancillary
from uffdd import handshake as hs_mod
from uffdd.config import Config
from uffdd.core import PageStates, Session, SessionStats
from uffdd.errors import HandshakeError, SourceError, UffddError
from uffdd.kernel import Userfaultfd
from uffdd.service.fdstore import FdStore, Inherited, RecordError, SessionRecord
from uffdd.service.metrics import Totals
from uffdd.sources import PageSource, source_class
from uffdd.unixsock import bind_unix

log = structlog.get_logger("uffdd.listener")

MAX_FDS = 2


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def receive_handshake(
    sock: socket.socket, *, max_bytes: int, timeout: float
) -> tuple[bytes, list[int]]:
    """Read one handshake: a JSON body that may span several reads, plus SCM_RIGHTS fds.

    On error every received fd is closed and HandshakeError says what was wrong.
    """
    loop = asyncio.get_running_loop()
    body = bytearray()
    fds: list[int] = []
    try:
        async with asyncio.timeout(timeout):
            while not hs_mod.body_complete(bytes(body)):
                await _wait_readable(loop, sock)
                try:
                    data, anc, flags, _ = sock.recvmsg(65536, ancillary.space(MAX_FDS))
                except (BlockingIOError, InterruptedError):
                    continue
                fds.extend(ancillary.parse(anc)[0])
                if flags & socket.MSG_CTRUNC:
                    raise HandshakeError(f"too many file descriptors: send [uffd, memfd] (at most {MAX_FDS})")
                if not data:
                    raise HandshakeError(
                        "connection closed before the handshake was complete"
                        if body else "connection closed without a handshake")
                body += data
                if len(body) > max_bytes:
                    raise HandshakeError(f"handshake longer than {max_bytes} bytes")
    except TimeoutError:
        _close_fds(fds)
        raise HandshakeError(
            f"no complete handshake within {timeout:g}s (got {len(body)} bytes)") from None
    except BaseException:
        _close_fds(fds)
        raise
    return bytes(body), fds


class Listener:
    """Accepts VMMs on the configured Unix socket and runs their sessions.

    With an :class:`FdStore` every session's descriptors are kept by the service manager while
    it lives (see uffdd.service.fdstore), and :meth:`resume` takes over the sessions of a
    predecessor that died or handed them over.
    """

    def __init__(self, config: Config, *, sock: socket.socket | None = None, owns_path: bool | None = None,
                 store: FdStore | None = None) -> None:
        self.config = config
        self._sock = sock
        self._owns_path = sock is None if owns_path is None else owns_path
        self.store = store if store is not None else FdStore(enabled=False)
        self.sessions: dict[str, Session] = {}
        self.waiting_complete: set[str] = set()
        """Sessions a predecessor completed: only their VMM's EOF is awaited."""
        self.unresumed: dict[str, dict[str, int]] = {}
        """Stored sessions that could not be resumed (e.g. their source is no longer configured);
        their descriptors stay in the store and are tried again on reload."""
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self.sessions_total = 0
        self.sessions_resumed = 0
        self.ended_totals = SessionStats()
        self.totals = Totals()
        self.handshakes_refused = 0
        self.resume_failures = 0
        self.store_failures = 0
        self.handing_over = False
        self.on_change: Callable[[], None] | None = None
        """Called when a session starts or ends (the daemon updates its STATUS= line)."""

    @property
    def path(self) -> str:
        return self.config.listen

    def bind(self) -> socket.socket:
        """Bind the listening socket (replacing a stale socket file, never another file)."""
        if self._sock is not None:
            return self._sock
        sock = bind_unix(self.config.listen, backlog=128, key="listen")
        self._sock = sock
        self.store.store_listener(sock.fileno())
        return sock

    async def start(self) -> None:
        sock = self.bind()
        sock.setblocking(False)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            self._track(loop.create_task(self._serve_connection(conn)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._sock is not None:
            if not self.handing_over:
                self.store.remove_listener()
            self._sock.close()
            if self._owns_path and not self.handing_over:
                with contextlib.suppress(OSError):
                    os.unlink(self.config.listen)

    async def close(self) -> None:
        """Stop accepting and end every session now (their VMMs lose their handler)."""
        await self.stop_accepting()
        for t in list(self._conn_tasks):
            t.cancel()
        if self._conn_tasks:
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        for fds in self.unresumed.values():
            _close_fds(fds.values())
        self.unresumed.clear()

    async def hand_over(self) -> None:
        """Stop serving but leave every session in the fd store, for a successor to resume."""
        self.handing_over = True
        await self.close()

    async def wait_sessions(self) -> None:
        """Wait until every connection (and so every session) has ended."""
        while self._conn_tasks:
            await asyncio.gather(*list(self._conn_tasks), return_exceptions=True)

    async def _open_source(self, hs: hs_mod.Handshake) -> PageSource:
        spec = self.config.sources.get(hs.source)
        if spec is None:
            known = ", ".join(sorted(self.config.sources)) or "none configured"
            raise HandshakeError(f"source: {hs.source!r} is not a configured source (known: {known})")
        cls = source_class(spec.kind)
        try:
            return await cls.open(spec, vm_id=hs.vm_id)
        except SourceError as exc:
            raise HandshakeError(f"source {hs.source!r}: {exc}") from None

    def source_kind(self, session: Session) -> str:
        spec = self.config.sources.get(session.handshake.source)
        return spec.kind if spec is not None else "unknown"

    async def _serve_connection(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        session_id = f"s{next(self._ids)}"
        clog = log.bind(session=session_id)
        session: Session | None = None
        fds: list[int] = []
        try:
            body, fds = await receive_handshake(
                conn, max_bytes=self.config.handshake.max_bytes, timeout=self.config.handshake.timeout)
            hs = hs_mod.parse(body)
            if len(fds) not in (1, 2):
                raise HandshakeError(
                    f"expected the file descriptors [uffd, memfd] (shared memory) or [uffd] "
                    f"(anonymous memory) with the handshake, got {len(fds)}")
            source = await self._open_source(hs)
            try:
                session = Session.create(
                    session_id=session_id, handshake=hs, uffd_fd=fds[0],
                    memfd=fds[1] if len(fds) == 2 else None, source=source, config=self.config.session)
            except BaseException:
                await source.aclose()
                raise
        except (UffddError, OSError) as exc:  # KernelError is an OSError: all get the error line
            _close_fds(fds)
            self.handshakes_refused += 1
            clog.warning("handshake_refused", error=str(exc))
            with contextlib.suppress(OSError):
                await loop.sock_sendall(conn, (json.dumps({"error": str(exc)}) + "\n").encode())
            conn.close()
            return
        except BaseException:
            _close_fds(fds)
            conn.close()
            raise
        record = SessionRecord(session_id=session_id, handshake=hs, preinitialized=session.preinitialized,
                               features=session.features, anonymous=session.memfd is None)
        try:
            if self.store.enabled:
                record.create()
                kept = {"uffd": fds[0], "state": session.states.fd, "conn": conn.fileno(), "desc": record.fd}
                if session.memfd is not None:
                    kept["mem"] = session.memfd
                stored = self.store.store_session(session_id, kept)
                if not stored:
                    self.store_failures += 1
                    clog.error("fd_store_failed", hint="this session does not survive a restart of the daemon")
        except OSError as exc:
            self.store_failures += 1
            clog.error("fd_store_failed", error=str(exc))
        await self._run_session(session, conn, record)

    async def _run_session(self, session: Session, conn: socket.socket, record: SessionRecord) -> None:
        """Serve ``session`` until its VMM hangs up or it fails; then drop it from the store."""
        loop = asyncio.get_running_loop()
        sid = session.id
        self.sessions[sid] = session
        self.sessions_total += 1

        def completed(s: Session) -> None:
            if not record.complete:
                line = json.dumps({"event": "complete", "session": s.id, "pages": s.stats.pages_total,
                                   "bytes": s.stats.bytes_filled}) + "\n"
                with contextlib.suppress(OSError):
                    conn.send(line.encode())  # one short line: fits the socket buffer
                with contextlib.suppress(OSError):
                    record.update(complete=True)
            # The ranges are unregistered: only the connection is still worth keeping.
            self.store.remove(sid, ("uffd", "mem", "state"))
            self._changed()

        session.on_complete = completed

        def regions_changed(s: Session) -> None:
            with contextlib.suppress(OSError):
                record.update(handshake=s.current_handshake())  # a successor must see the new layout

        session.on_regions_changed = regions_changed
        try:
            if not record.ready_sent:
                # "ready" goes out before anything else can be sent; faults queue meanwhile.
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(conn, (json.dumps(
                        {"status": "ready", "session": sid, "pages": session.stats.pages_total}) + "\n").encode())
                with contextlib.suppress(OSError):
                    record.update(ready_sent=True)
            session.start()
            self._changed()
            await self._until_eof_or_done(conn, session)
        finally:
            if not self.handing_over:
                self.store.remove(sid)
            await asyncio.shield(session.close("handed over" if self.handing_over else "vmm disconnected"))
            if self.sessions.pop(sid, None) is not None:
                self.ended_totals.add(session.stats)
                self.totals.add(session, self.source_kind(session))
            conn.close()
            record.close()
            self._changed()

    async def _until_eof_or_done(self, conn: socket.socket, session: Session) -> None:
        loop = asyncio.get_running_loop()
        eof = loop.create_task(self._read_until_eof(conn))
        done = loop.create_task(session.done.wait())
        try:
            await asyncio.wait({eof, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (eof, done):
                t.cancel()

    @staticmethod
    async def _read_until_eof(conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(conn, 4096)
            except (ConnectionResetError, BrokenPipeError):
                return
            if not data:
                return

    # --- taking over from a predecessor ---------------------------------------------------
    async def resume(self, inherited: Inherited) -> None:
        """Take over the sessions found in the fd store; new session ids continue after theirs."""
        self._ids = itertools.count(inherited.last_session_number + 1)
        for sid in sorted(inherited.sessions, key=lambda s: int(s[1:])):
            await self._resume_one(sid, inherited.sessions[sid])

    async def retry_unresumed(self) -> None:
        """After a reload: try again the sessions that could not be resumed."""
        pending, self.unresumed = self.unresumed, {}
        for sid, fds in pending.items():
            await self._resume_one(sid, fds)

    def _drop_stored(self, sid: str, fds: dict[str, int]) -> None:
        _close_fds(fds.values())
        self.store.remove(sid)

    async def _resume_one(self, sid: str, fds: dict[str, int]) -> None:
        slog = log.bind(session=sid)
        if "desc" not in fds:
            # Stored half-way when the predecessor died: that session never served a fault.
            slog.warning("stored_session_incomplete", kinds=sorted(fds))
            self._drop_stored(sid, fds)
            return
        try:
            record = SessionRecord.read(fds["desc"])
        except RecordError as exc:
            self._unresumable(sid, fds, str(exc))
            return
        if "conn" not in fds:
            slog.info("stored_session_vmm_gone", vm_id=record.handshake.vm_id)
            self._drop_stored(sid, fds)
            return
        conn = socket.socket(fileno=fds["conn"])
        conn.setblocking(False)
        if record.complete:
            for kind in ("uffd", "mem", "state"):
                if kind in fds:
                    _close_fds([fds[kind]])
                    self.store.remove(sid, (kind,))
            self._track(asyncio.get_running_loop().create_task(self._watch_completed(sid, conn, record)))
            return
        missing = [k for k in ("uffd", "state") if k not in fds]
        if not record.anonymous and "mem" not in fds:
            missing.append("mem")
        if missing:
            conn.detach()
            self._unresumable(sid, fds, f"descriptors missing from the store: {missing}")
            return
        hs = record.handshake
        try:
            source = await self._open_source(hs)
        except HandshakeError as exc:
            conn.detach()
            self._unresumable(sid, fds, str(exc))
            return
        try:
            states = PageStates(sum(r.pages for r in hs.regions), fd=fds["state"])
            session = Session(session_id=sid, handshake=hs, uffd=Userfaultfd(fds["uffd"]),
                              memfd=None if record.anonymous else fds["mem"], source=source,
                              config=self.config.session, preinitialized=record.preinitialized,
                              features=record.features, states=states, resumed=True)
        except (OSError, ValueError) as exc:
            await source.aclose()
            conn.detach()
            self._unresumable(sid, fds, f"cannot map the stored session: {exc}")
            return
        self.sessions_resumed += 1
        slog.info("session_resumed", vm_id=hs.vm_id, pages_total=session.stats.pages_total)
        self._track(asyncio.get_running_loop().create_task(self._run_session(session, conn, record)))

    def _unresumable(self, sid: str, fds: dict[str, int], why: str) -> None:
        """Leave the descriptors in the store (the guest waits rather than read wrong bytes)."""
        self.resume_failures += 1
        log.error("resume_failed", session=sid, error=why,
                  hint="the guest waits; fix the configuration and reload (SIGHUP) to try again")
        self.unresumed[sid] = fds

    async def _watch_completed(self, sid: str, conn: socket.socket, record: SessionRecord) -> None:
        self.waiting_complete.add(sid)
        try:
            await self._read_until_eof(conn)
        finally:
            self.waiting_complete.discard(sid)
            if not self.handing_over:
                self.store.remove(sid, ("desc", "conn"))
            conn.close()
            record.close()
