"""The Unix-socket listener: accept VMMs, read their handshake, run one session each.

Every connection is its own task of one task group (:class:`uffdd.unixsock.UnixServer`): a
malformed handshake is answered with one JSON error line and closed, and nothing else notices.
Each connection is in the fd store from accept() on, its handshake read without consuming it
(uffdd.service.inflight), so that a successor finishes handshakes that were in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
from collections.abc import Awaitable, Callable

import structlog

from uffdd import handshake as hs_mod
from uffdd.config import Config
from uffdd.core import PageStates, Session, SessionStats
from uffdd.core.orphans import Orphans, vmm_pidfd
from uffdd.errors import HandshakeError, SourceError, UffddError
from uffdd.kernel import Userfaultfd
from uffdd.service.access import PeerCred, check_access, peer_cred
from uffdd.service.fdstore import FdStore, Inherited, RecordError, SessionRecord
from uffdd.service.inflight import AcceptStep, accept_at_once, peek_handshake
from uffdd.service.totals import Totals
from uffdd.sources import PageSource, source_class
from uffdd.unixsock import (
    UnixServer,
    bind_unix,
    close_fds,
    send_line,
    until_eof,
)

log = structlog.get_logger("uffdd.listener")


async def finish(aw: Awaitable[None]) -> None:
    """Await ``aw`` to its end even if we are cancelled meanwhile (then re-raise): a session is
    never left half-closed."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise


class Listener:
    """Accepts VMMs on the configured Unix socket and runs their sessions.

    With an :class:`FdStore` every session's descriptors are kept by the service manager while
    it lives (see uffdd.service.fdstore), and :meth:`resume` takes over the sessions of a
    predecessor that died or handed them over.
    """

    def __init__(self, config: Config, *, sock: socket.socket | None = None, owns_path: bool | None = None,
                 store: FdStore | None = None, accept: AcceptStep = accept_at_once,
                 on_connections: Callable[[int], None] | None = None) -> None:
        """``accept`` and ``on_connections`` let a worker balance new VMMs against its siblings."""
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
        self._accept = accept
        self.server = UnixServer(self._serve_connection, name="listener", accept=self._accept_durably,
                                 on_count=on_connections)
        """Runs every connection (and every resumed session) in one task group."""
        self._ids = itertools.count(1)
        self._accepted: dict[socket.socket, str] = {}
        """Connections accepted (and stored) whose handler has not started yet -> session id."""
        self.handshakes_resumed = 0
        self.sessions_total = 0
        self.sessions_resumed = 0
        self.ended_totals = SessionStats()
        self.totals = Totals()
        self.handshakes_refused = 0
        self.handshakes_pending = 0
        """Connections whose handshake is being read or checked now (``handshake.max_pending``)."""
        self._charged: dict[str, int] = {}
        """Guest bytes of every session admitted (live, resumed or being set up), by session id:
        what ``limits`` counts."""
        self.resume_failures = 0
        self.store_failures = 0
        self.handing_over = False
        self.orphans = Orphans()
        """Userfaultfds of VMMs that hung up early, read until those VMMs exit."""
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

    @property
    def accept_failures(self) -> int:
        """accept() calls on the VMM socket that failed."""
        return self.server.accept_failures

    @property
    def accept_error(self) -> str | None:
        """Why accept() on the VMM socket fails now (out of fds or buffers); None while it works."""
        return self.server.accept_error

    @property
    def connections(self) -> int:
        """VMM connections open now (each live, resumed or completed session has one)."""
        return self.server.connections

    @property
    def handshakes_in_flight(self) -> int:
        return self.server.connections - len(self.sessions) - len(self.waiting_complete)

    async def start(self) -> None:
        await self.server.start(self.bind())

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def stop_accepting(self) -> None:
        await self.server.stop_accepting()
        sock, self._sock = self._sock, None
        if sock is not None:
            if not self.handing_over:
                self.store.remove_listener()
            sock.close()
            if self._owns_path and not self.handing_over:
                with contextlib.suppress(OSError):
                    os.unlink(self.config.listen)

    async def close(self) -> None:
        """Stop accepting and end every session now (their VMMs lose their handler)."""
        await self.stop_accepting()
        await self.server.close()
        self.orphans.close()
        for fds in self.unresumed.values():
            close_fds(fds.values())
        self.unresumed.clear()

    async def hand_over(self) -> None:
        """Stop serving but leave every session in the fd store, for a successor to resume."""
        self.handing_over = True
        await self.close()

    async def wait_sessions(self) -> None:
        """Wait until every connection (and so every session) has ended."""
        await self.server.wait_idle()

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

    async def _accept_durably(self, sock: socket.socket) -> socket.socket:
        """Accept, and store the connection before anything else runs: from now on a successor
        finishes its handshake if we die (see uffdd.service.inflight)."""
        return await self._accept(sock, self._store_at_once)

    def _store_at_once(self, conn: socket.socket) -> None:
        sid = self._accepted[conn] = f"s{next(self._ids)}"
        if self.store.enabled and not self.store.store_conn(sid, conn.fileno()):
            self.store_failures += 1
            log.error("fd_store_failed", session=sid, hint="a restart now loses this VMM")

    @property
    def mapped_bytes(self) -> int:
        """Guest memory under management: the regions of every admitted session."""
        return sum(self._charged.values())

    async def _serve_connection(self, conn: socket.socket) -> None:
        await self._serve_handshake(conn, self._accepted.pop(conn, "") or f"s{next(self._ids)}")

    async def _serve_handshake(self, conn: socket.socket, session_id: str) -> None:
        """Handshake, then the session; a refused VMM gets the error line (and leaves the store)."""
        cred = peer_cred(conn)
        limit = self.config.handshake.max_pending
        if self.handshakes_pending >= limit:
            await self._refuse(conn, session_id, cred, HandshakeError(
                f"too many handshakes in progress: {self.handshakes_pending}, the limit "
                f"(handshake.max_pending = {limit}); try again later"))
            return
        self.handshakes_pending += 1
        try:
            session, uffd_fd = await self._handshake(conn, session_id, cred)
        except (UffddError, OSError) as exc:  # KernelError is an OSError: all get the error line
            await self._refuse(conn, session_id, cred, exc)
            return
        except BaseException:
            if not self.handing_over:
                self.store.remove(session_id, ("conn",))
            conn.close()
            raise
        finally:
            self.handshakes_pending -= 1
        record = SessionRecord(session_id=session_id, handshake=session.handshake,
                               preinitialized=session.preinitialized, features=session.features,
                               anonymous=session.memfd is None)
        self._store(session, uffd_fd, conn, record)
        await self._run_session(session, conn, record)

    async def _refuse(self, conn: socket.socket, session_id: str, cred: PeerCred, exc: Exception) -> None:
        """One error line, then the connection is closed (and leaves the store)."""
        self.handshakes_refused += 1
        log.warning("handshake_refused", session=session_id, error=str(exc), **cred.fields())
        self.store.remove(session_id, ("conn",))
        await send_line(conn, {"error": str(exc)})
        conn.close()

    def _admit(self, session_id: str, hs: hs_mod.Handshake) -> None:
        """Charge the session to ``limits`` (HandshakeError naming the setting it would pass)."""
        limits = self.config.limits
        if limits.max_sessions is not None and len(self._charged) >= limits.max_sessions:
            raise HandshakeError(f"limits.max_sessions: {len(self._charged)} sessions are served already, the most "
                                 f"this process takes ({limits.max_sessions}); try again later")
        mapped = self.mapped_bytes
        if limits.max_mapped_bytes is not None and mapped + hs.total_bytes > limits.max_mapped_bytes:
            raise HandshakeError(f"limits.max_mapped_bytes: this guest's {hs.total_bytes} bytes on top of the "
                                 f"{mapped} under management would pass the limit ({int(limits.max_mapped_bytes)})")
        self._charged[session_id] = hs.total_bytes

    async def _handshake(self, conn: socket.socket, session_id: str, cred: PeerCred) -> tuple[Session, int]:
        """Read and check the handshake (and whether ``cred`` may claim its vm_id), open its source,
        set up the session (and return it with its userfaultfd); on error every received fd is closed."""
        fds: list[int] = []
        try:
            body, fds = await peek_handshake(
                conn, max_bytes=self.config.handshake.max_bytes, timeout=self.config.handshake.timeout)
            hs = hs_mod.parse(body)
            check_access(self.config.access, hs.vm_id, cred)
            if len(fds) not in (1, 2):
                raise HandshakeError(
                    f"expected the file descriptors [uffd, memfd] (shared memory) or [uffd] "
                    f"(anonymous memory) with the handshake, got {len(fds)}")
            self._admit(session_id, hs)
            source = await self._open_source(hs)
            try:
                session = Session.create(session_id=session_id, handshake=hs, uffd_fd=fds[0],
                                         memfd=fds[1] if len(fds) == 2 else None, source=source,
                                         config=self.config.session)
                session.peer = cred.fields()
            except BaseException:
                await source.aclose()
                raise
        except BaseException:
            self._charged.pop(session_id, None)
            close_fds(fds)
            raise
        return session, fds[0]

    def _store(self, session: Session, uffd_fd: int, conn: socket.socket, record: SessionRecord) -> None:
        """Put the session's descriptors into the service manager's store (when there is one)."""
        if not self.store.enabled:
            return
        try:
            record.create()
            kept = {"uffd": uffd_fd, "state": session.states.fd, "desc": record.fd}  # conn: since accept
            if session.memfd is not None:
                kept["mem"] = session.memfd
            if not self.store.store_session(session.id, kept):
                self.store_failures += 1
                log.error("fd_store_failed", session=session.id,
                          hint="this session does not survive a restart of the daemon")
        except OSError as exc:
            self.store_failures += 1
            log.error("fd_store_failed", session=session.id, error=str(exc))

    async def _run_session(self, session: Session, conn: socket.socket, record: SessionRecord) -> None:
        """Serve ``session`` until its VMM hangs up or it fails; then drop it from the store."""
        sid = session.id
        self.sessions[sid] = session
        self.sessions_total += 1
        session.on_complete = lambda s: self._completed(s, conn, record)

        def regions_changed(s: Session) -> None:
            with contextlib.suppress(OSError):
                record.update(handshake=s.current_handshake())  # a successor must see the new layout

        session.on_regions_changed = regions_changed
        session.orphans, session.vmm_pidfd = self.orphans, vmm_pidfd(peer_cred(conn).pid)
        try:
            if not record.ready_sent:
                # "ready" goes out before anything else can be sent; faults queue meanwhile.
                await send_line(conn, {"status": "ready", "session": sid, "pages": session.stats.pages_total})
                with contextlib.suppress(OSError):
                    record.update(ready_sent=True)
            session.start()
            self._changed()
            await self._until_eof_or_done(conn, session)
            if session.failure is not None:  # the VMM learns why its guest is no longer served
                await send_line(conn, {"event": "failed", "session": sid, "error": str(session.failure)})
        finally:
            if not self.handing_over:
                self.store.remove(sid)
            await finish(session.close("handed over" if self.handing_over else "vmm disconnected"))
            self._charged.pop(sid, None)
            if self.sessions.pop(sid, None) is not None:
                self.ended_totals.add(session.stats)
                self.totals.add(session, self.source_kind(session))
            conn.close()
            record.close()
            self._changed()

    def _completed(self, session: Session, conn: socket.socket, record: SessionRecord) -> None:
        """Every page is in: tell the VMM (once, even across restarts)."""
        if not record.complete:
            line = json.dumps({"event": "complete", "session": session.id, "pages": session.stats.pages_total,
                               "bytes": session.stats.bytes_filled}) + "\n"
            with contextlib.suppress(OSError):
                conn.send(line.encode())  # one short line: fits the socket buffer
            with contextlib.suppress(OSError):
                record.update(complete=True)
        # The ranges are unregistered: only the connection is still worth keeping.
        self.store.remove(session.id, ("uffd", "mem", "state"))
        self._changed()

    @staticmethod
    async def _until_eof_or_done(conn: socket.socket, session: Session) -> None:
        async with asyncio.TaskGroup() as tg:
            eof = tg.create_task(until_eof(conn))
            done = tg.create_task(session.done.wait())
            await asyncio.wait({eof, done}, return_when=asyncio.FIRST_COMPLETED)
            eof.cancel()
            done.cancel()

    # --- taking over from a predecessor ---------------------------------------------------
    async def resume(self, inherited: Inherited) -> None:
        """Take over the sessions found in the fd store; new session ids continue after theirs."""
        self._ids = itertools.count(inherited.last_session_number + 1)
        await self.server.open()  # resumed sessions run in the same task group as new ones
        for sid in sorted(inherited.sessions, key=lambda s: int(s[1:])):
            await self._resume_one(sid, inherited.sessions[sid])

    async def retry_unresumed(self) -> None:
        """After a reload: try again the sessions that could not be resumed."""
        for sid in list(self.unresumed):
            await self._resume_one(sid, self.unresumed.pop(sid))

    def _drop_stored(self, sid: str, fds: dict[str, int]) -> None:
        close_fds(fds.values())
        self.store.remove(sid)

    async def _resume_one(self, sid: str, fds: dict[str, int]) -> None:
        slog = log.bind(session=sid)
        if "desc" not in fds and "conn" in fds:
            self._resume_handshake(sid, fds)
            return
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
                    close_fds([fds[kind]])
                    self.store.remove(sid, (kind,))
            self.server.spawn(self._watch_completed, sid, conn, record)
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
        with contextlib.suppress(OSError):
            session.peer = peer_cred(conn).fields()
        self.sessions_resumed += 1
        self._charged[sid] = hs.total_bytes  # counted, never refused: its guest runs already
        slog.info("session_resumed", vm_id=hs.vm_id, pages_total=session.stats.pages_total)
        self.server.spawn(self._run_session, session, conn, record)

    def _resume_handshake(self, sid: str, fds: dict[str, int]) -> None:
        """A connection without a session record: its handshake was in flight (still queued on
        it, uffdd.service.inflight) and no fault was served. Drop what was stored of it and run
        the handshake again from the start."""
        partial = tuple(k for k in fds if k != "conn")
        close_fds(fds[k] for k in partial)
        self.store.remove(sid, partial)
        conn = socket.socket(fileno=fds["conn"])
        conn.setblocking(False)
        self.handshakes_resumed += 1
        log.info("handshake_resumed", session=sid, dropped=sorted(partial))
        self.server.spawn(self._serve_handshake, conn, sid)

    def _unresumable(self, sid: str, fds: dict[str, int], why: str) -> None:
        """Leave the descriptors in the store (the guest waits rather than read wrong bytes)."""
        self.resume_failures += 1
        log.error("resume_failed", session=sid, error=why,
                  hint="the guest waits; fix the configuration and reload (SIGHUP) to try again")
        self.unresumed[sid] = fds

    async def _watch_completed(self, sid: str, conn: socket.socket, record: SessionRecord) -> None:
        self.waiting_complete.add(sid)
        try:
            await until_eof(conn)
        finally:
            self.waiting_complete.discard(sid)
            if not self.handing_over:
                self.store.remove(sid, ("desc", "conn"))
            conn.close()
            record.close()
