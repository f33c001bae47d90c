"""`uffdd serve`'s server against real TCP clients: hostile frames, authentication, TLS,
limits, pipelining, and a fuzzed live server that must only ever drop the offending connection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from uffdd.configbase import join_hostport
from uffdd.errors import SourceError, SourceUnavailable
from uffdd.peer import protocol as p
from uffdd.peer.client import ClientOptions, PeerClient, PeerRefused
from uffdd.peer.config import ClientTls, PeerLinkConfig, ServeLimits, ServerTls
from uffdd.peer.image import Image
from uffdd.peer.relay import Relay
from uffdd.peer.server import PeerServer
from uffdd.peer.testing import TlsFiles, make_tls_files
from uffdd.testing.waiting import eventually

BS = p.BLOCK_SIZE
SECRET = b"uffdd test secret: 9c2F!k7Q#vL0pX4r&Wm8"
WAIT = 10.0


@contextlib.asynccontextmanager
async def serving(snapshot: Path, limits: ServeLimits | None = None, *, secret: bytes | None = None,
                  ssl_context: ssl.SSLContext | None = None, native: bool = True,
                  **images: Path) -> AsyncIterator[PeerServer]:
    imgs = {"default": Image.from_file("default", str(snapshot))}
    imgs.update({k: Image.from_file(k, str(v)) for k, v in images.items()})
    server = PeerServer(imgs, limits, secret=secret, ssl_context=ssl_context, native=native)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


def client_opts(server: PeerServer, *, secret: bytes | None = None, host: str | None = None, port: int | None = None,
                **kw: Any) -> ClientOptions:
    """The client's options from its validated config, as the peer source builds them."""
    settings: dict[str, Any] = {"open_timeout": 3.0, "connect_timeout": 1.0, "deadline": 5.0, **kw}
    config = PeerLinkConfig(address=join_hostport(host or server.address[0], port or server.address[1]),
                            secret=secret.decode() if secret is not None else None, **settings)
    return ClientOptions.from_config(config)


async def read_frame(r: asyncio.StreamReader) -> tuple[p.FrameType, int, int, bytes]:
    """(type, id, aux, payload) of the next frame; DATA payloads are returned whole."""
    hdr = await asyncio.wait_for(r.readexactly(p.HEADER_SIZE), WAIT)
    t, _, _, rid, _, length, aux = p.HEADER.unpack(hdr)
    payload = await asyncio.wait_for(r.readexactly(length), WAIT)
    return p.FrameType(t), rid, aux, payload


async def raw_client(server: PeerServer, *, role: p.Role = p.Role.URGENT, image: str = "default",
                     secret: bytes | None = None, handshake: bool = True, wrong_proof: bool = False,
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection(*server.address)
    if handshake:
        hello = p.Hello(role, 0, os.urandom(32), image).encode()
        w.write(p.encode_frame(p.FrameType.HELLO, hello))
        t, _, _, payload = await read_frame(r)
        assert t is p.FrameType.CHALLENGE
        ch = p.Challenge.decode(payload)
        proof = p.client_proof(secret, hello, ch.core()) if secret else p.NO_PROOF
        if wrong_proof:
            proof = bytes(b ^ 1 for b in proof)
        w.write(p.encode_frame(p.FrameType.AUTH, proof))
        if not wrong_proof and (secret or not server.secret):
            t, _, aux, payload = await read_frame(r)
            assert t is p.FrameType.WELCOME, (t, aux, payload)
    return r, w


async def expect_dropped(r: asyncio.StreamReader, code: p.ErrorCode | None) -> str:
    """Read until the server's ERROR (checking its code) and then EOF: the connection is gone."""
    msg = ""
    while True:
        try:
            t, rid, aux, payload = await read_frame(r)
        except asyncio.IncompleteReadError:
            assert code is None, f"connection closed without the expected {code}"
            return msg
        if t is p.FrameType.ERROR and rid == 0:
            assert aux == code, (p.error_code(aux), payload)
            msg = payload.decode()
            break
    assert await asyncio.wait_for(r.read(), WAIT) == b""
    return msg


HOSTILE: list[tuple[str, bytes, bool, p.ErrorCode | None]] = [
    # name, bytes sent, after a complete handshake?, expected error (None: plain close)
    ("short-header-then-close", p.encode_read(1, 0, 1)[:10], True, None),
    ("oversized-hello", struct.pack("<BBHIQII", p.FrameType.HELLO, 0, 0, 0, 0, 1 << 31, 0), False,
     p.ErrorCode.BAD_LENGTH),
    ("unknown-type", struct.pack("<BBHIQII", 0x42, 0, 0, 0, 0, 0, 0), True, p.ErrorCode.UNKNOWN_TYPE),
    ("read-id-zero", p.encode_read(0, 0, 1), True, p.ErrorCode.BAD_ID),
    ("duplicate-id-in-flight", p.encode_read(5, 0, 1024) + p.encode_read(5, 0, 1024), True, p.ErrorCode.BAD_ID),
    ("length-lies-on-read", struct.pack("<BBHIQII", p.FrameType.READ, 0, 1, 1, 0, 64, 0) + bytes(64), True,
     p.ErrorCode.BAD_LENGTH),
    ("read-past-image", p.encode_read(1, 1 << 40, 1), True, p.ErrorCode.OUT_OF_RANGE),
    ("read-offset-wraps", p.encode_read(1, (1 << 64) - BS, 2), True, p.ErrorCode.OUT_OF_RANGE),
    ("read-more-than-negotiated", p.encode_read(1, 0, 5000), True, p.ErrorCode.OUT_OF_RANGE),
    ("read-before-handshake", p.encode_read(1, 0, 1), False, p.ErrorCode.BAD_STATE),
    ("bad-magic", p.encode_frame(p.FrameType.HELLO, b"HTTP" + bytes(38)), False, p.ErrorCode.VERSION),
    ("hello-twice", p.encode_frame(p.FrameType.HELLO, p.Hello(p.Role.URGENT, 0, bytes(32), "default").encode()),
     True, p.ErrorCode.BAD_STATE),
    ("http-request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, p.ErrorCode.UNKNOWN_TYPE),
    ("too-many-in-flight", b"".join(p.encode_read(i, 0, 1024) for i in range(1, 40)), True,
     p.ErrorCode.TOO_MANY_REQUESTS),
]


@pytest.fixture(params=[True, False], ids=["c-server", "python-server"])
def native(request: pytest.FixtureRequest) -> bool:
    """The server's connections answered in C (urgent on the event loop, bulk on a thread), or in
    Python: the same checks, codes and limits."""
    return bool(request.param)


@pytest.mark.parametrize("role", [p.Role.URGENT, p.Role.BULK], ids=["urgent", "bulk"])
async def test_hostile_frames_each_drop_only_their_own_connection(snapshot_4k: Path, native: bool,
                                                                  role: p.Role) -> None:
    data = snapshot_4k.read_bytes()
    async with serving(snapshot_4k, ServeLimits(max_inflight=32), native=native) as server:
        healthy = PeerClient(client_opts(server))
        await healthy.open()
        stop = asyncio.Event()
        fetched = 0

        async def keep_fetching() -> None:
            nonlocal fetched
            buf = bytearray(16 * BS)
            while not stop.is_set():
                off = (fetched * 16 * BS) % (len(data) - len(buf))
                await healthy.fill(off, memoryview(buf))
                assert buf == data[off : off + len(buf)]
                fetched += 1

        worker = asyncio.create_task(keep_fetching())
        try:
            for name, payload, after_handshake, code in HOSTILE:
                r, w = await raw_client(server, handshake=after_handshake, role=role)
                w.write(payload)
                if name == "short-header-then-close":
                    w.write_eof()
                await expect_dropped(r, code)
                w.close()
            before = fetched
            await eventually(lambda: fetched > before, what="the healthy client fetching on")  # it never noticed
        finally:
            stop.set()
            await asyncio.wait_for(worker, WAIT)
        assert healthy.stats.link_losses == 0 and healthy.stats.reconnects == 0
        errors = server.collect().protocol_errors
        assert sum(errors.values()) == sum(1 for h in HOSTILE if h[3] is not None)
        await healthy.aclose()


async def test_wrong_client_proof_is_refused_with_auth_failed(snapshot_4k: Path) -> None:
    async with serving(snapshot_4k, secret=SECRET) as server:
        r, _ = await raw_client(server, secret=SECRET, wrong_proof=True)
        await expect_dropped(r, p.ErrorCode.AUTH_FAILED)
        r, _ = await raw_client(server, secret=None)
        await expect_dropped(r, p.ErrorCode.AUTH_REQUIRED)
        assert server.stats.auth_failures == 2
        # ... and with the right secret, pages flow.
        c = PeerClient(client_opts(server, secret=SECRET))
        await c.open()
        buf = bytearray(BS)
        await c.fill(BS, memoryview(buf))
        assert buf == snapshot_4k.read_bytes()[BS : 2 * BS]
        await c.aclose()


@pytest.mark.parametrize(("client_secret", "server_secret", "needle"), [
    (b"not the right secret at all: Rj4#Wk9@Qm2!Xz7&", SECRET, "does not know our shared secret"),
    (None, SECRET, "requires a shared secret"),
    (SECRET, None, "does not authenticate"),
], ids=["wrong-secret", "no-secret", "server-without-auth"])
async def test_peer_client_refuses_to_open_without_mutual_authentication(
        snapshot_4k: Path, client_secret: bytes | None, server_secret: bytes | None, needle: str) -> None:
    async with serving(snapshot_4k, secret=server_secret) as server:
        c = PeerClient(client_opts(server, secret=client_secret))
        with pytest.raises(PeerRefused, match=needle):
            await c.open()
        assert server.stats.handshakes_ok == 0


async def test_unknown_image_is_refused_after_authentication(snapshot_4k: Path) -> None:
    async with serving(snapshot_4k) as server:
        c = PeerClient(client_opts(server, image="nope"))
        with pytest.raises(PeerRefused, match="no image 'nope'"):
            await c.open()


async def test_silent_client_is_dropped_after_the_handshake_timeout(snapshot_4k: Path) -> None:
    async with serving(snapshot_4k, ServeLimits(handshake_timeout=0.3)) as server:
        r, _ = await raw_client(server, handshake=False)
        msg = await expect_dropped(r, p.ErrorCode.TIMEOUT)
        assert "handshake" in msg


async def test_authenticated_connections_past_the_limit_are_refused_busy_when_they_authenticate(
        snapshot_4k: Path) -> None:
    async with serving(snapshot_4k, ServeLimits(max_connections=2)) as server:
        held = [await raw_client(server) for _ in range(2)]
        idle, idle_w = await raw_client(server, handshake=False)  # not refused: it is not authenticated
        r, w = await asyncio.open_connection(*server.address)
        hello = p.Hello(p.Role.URGENT, 0, os.urandom(32), "default").encode()
        w.write(p.encode_frame(p.FrameType.HELLO, hello))
        assert (await read_frame(r))[0] is p.FrameType.CHALLENGE
        w.write(p.encode_frame(p.FrameType.AUTH, p.NO_PROOF))
        assert "limit 2" in await expect_dropped(r, p.ErrorCode.BUSY)
        for _, hw in held:
            hw.close()
        await eventually(lambda: len(server.connections) == 1, what="the held connections closed")
        await raw_client(server)  # room again
        assert not idle.at_eof()
        idle_w.close()


async def test_idle_unauthenticated_connections_cannot_keep_an_authenticated_client_out(snapshot_4k: Path) -> None:
    """Past max_unauthenticated the oldest of them (first those that never sent HELLO) make room."""
    async with serving(snapshot_4k, ServeLimits(max_unauthenticated=4), secret=SECRET) as server:
        silent = [await raw_client(server, handshake=False) for _ in range(3)]
        said_hello, hello_writer = await asyncio.open_connection(*server.address)
        hello_writer.write(p.encode_frame(p.FrameType.HELLO, p.Hello(p.Role.URGENT, 0, os.urandom(32),
                                                                     "default").encode()))
        assert (await read_frame(said_hello))[0] is p.FrameType.CHALLENGE
        more = [await raw_client(server, handshake=False) for _ in range(2)]
        for r, _ in silent[:2]:
            await expect_dropped(r, p.ErrorCode.BUSY)
        _, w = await raw_client(server, secret=SECRET)  # drops the third silent one, then is welcomed
        await expect_dropped(silent[2][0], p.ErrorCode.BUSY)
        assert server.stats.handshakes_ok == 1
        assert not said_hello.at_eof() and server.admission.refused == {"BUSY": 3}
        for _, cw in [*more, *silent, (said_hello, hello_writer), (None, w)]:
            cw.close()


async def test_connections_dropped_to_make_room_never_count_against_authenticated_ones(snapshot_4k: Path) -> None:
    """Right after a burst of drops (their transports still closing) the authenticated slots are all free."""
    async with serving(snapshot_4k, ServeLimits(max_connections=2, max_unauthenticated=4)) as server:
        burst = [await raw_client(server, handshake=False) for _ in range(40)]
        welcomed = [await raw_client(server) for _ in range(2)]  # raw_client asserts WELCOME
        assert len(server.admission.authenticated) == 2 and server.admission.refused == {"BUSY": 37}
        for _, w in [*burst, *welcomed]:
            w.close()


async def test_small_requests_overtake_a_large_one_on_the_same_connection(snapshot_4k: Path, native: bool) -> None:
    async with serving(snapshot_4k, native=native) as server:
        r, w = await raw_client(server, role=p.Role.BULK)
        w.write(p.encode_read(1, 0, 1024) + p.encode_read(2, 8 << 20, 1) + p.encode_read(3, 9 << 20, 2))
        done: list[int] = []
        got = {1: 0, 2: 0, 3: 0}
        want = {1: 1024, 2: 1, 3: 2}
        while len(done) < 3:
            hdr = await asyncio.wait_for(r.readexactly(p.HEADER_SIZE), WAIT)
            t, _, count, rid, _, length, _ = p.HEADER.unpack(hdr)
            await r.readexactly(length)
            assert t == p.FrameType.DATA
            got[rid] += count
            if got[rid] == want[rid]:
                done.append(rid)
        assert done.index(2) < done.index(1) and done.index(3) < done.index(1)  # answered out of order, by id
        w.close()


@pytest.mark.parametrize("role", [p.Role.URGENT, p.Role.BULK], ids=["urgent", "bulk"])
async def test_a_request_id_is_free_again_once_its_answer_is_written(snapshot_4k: Path, native: bool,
                                                                     role: p.Role) -> None:
    """Clients reuse an id once its answer is in (after a checksum failure, the same id asks
    again), and the in-flight limit counts only requests not answered yet."""
    data = snapshot_4k.read_bytes()
    async with serving(snapshot_4k, ServeLimits(max_inflight=2), native=native) as server:
        r, w = await raw_client(server, role=role)
        for round_ in range(5):
            w.write(p.encode_read(5, round_ * BS, 1))
            t, rid, _, payload = await read_frame(r)
            assert (t, rid) == (p.FrameType.DATA, 5), payload[:100]
            assert payload[p.DESC_SIZE:] == data[round_ * BS : (round_ + 1) * BS]
        assert server.stats.protocol_errors == {}
        w.close()


async def test_truncated_image_answers_io_error_and_fill_raises_never_zeros(tmp_path: Path, snapshot_4k: Path) -> None:
    snap = tmp_path / "short.mem"
    snap.write_bytes(snapshot_4k.read_bytes()[: 4 << 20])
    async with serving(snapshot_4k, img=snap) as server:
        c = PeerClient(client_opts(server, image="img"))
        await c.open()
        os.truncate(snap, 1 << 20)
        buf = bytearray(b"\xab" * BS)
        with pytest.raises(SourceError, match="IO_ERROR"):
            await c.fill(2 << 20, memoryview(buf))
        await c.fill(0, memoryview(buf))  # the connection survives a failed request
        assert buf == snapshot_4k.read_bytes()[:BS]
        assert server.collect().read_errors == 1
        await c.aclose()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def server_ctx(tls: TlsFiles, client_certs: bool = False) -> ssl.SSLContext:
    return ServerTls(cert=str(tls.server_cert), key=str(tls.server_key),
                     client_ca=str(tls.ca) if client_certs else None).context()


def client_tls(ca: Path, cert: tuple[Path, Path] | None = None) -> ClientTls:
    return ClientTls(ca=str(ca), cert=str(cert[0]) if cert else None, key=str(cert[1]) if cert else None,
                     server_name="localhost")


async def test_tls_with_secret_serves_correct_pages(snapshot_4k: Path, tls: TlsFiles) -> None:
    async with serving(snapshot_4k, secret=SECRET, ssl_context=server_ctx(tls)) as server:
        c = PeerClient(client_opts(server, secret=SECRET, tls=client_tls(tls.ca)))
        await c.open()
        buf = bytearray(64 * BS)
        await c.fill(1 << 20, memoryview(buf))
        await c.prefetch(2 << 20, memoryview(buf))
        assert buf == snapshot_4k.read_bytes()[2 << 20 : (2 << 20) + len(buf)]
        await c.aclose()


async def test_plaintext_client_is_refused_when_tls_is_required(snapshot_4k: Path, tls: TlsFiles) -> None:
    async with serving(snapshot_4k, ssl_context=server_ctx(tls)) as server:
        c = PeerClient(client_opts(server, open_timeout=1.5))
        with pytest.raises(SourceUnavailable, match="not reachable"):
            await c.open()
        assert server.stats.handshakes_ok == 0
        good = PeerClient(client_opts(server, tls=client_tls(tls.ca)))
        await good.open()  # the server is unharmed
        await good.aclose()


async def test_tls_client_refuses_an_untrusted_or_plaintext_server(snapshot_4k: Path, tls: TlsFiles) -> None:
    async with serving(snapshot_4k, ssl_context=server_ctx(tls)) as server:
        c = PeerClient(client_opts(server, tls=client_tls(tls.other_ca),
                                   open_timeout=1.5))
        with pytest.raises(SourceUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await c.open()
    async with serving(snapshot_4k) as plain:
        c = PeerClient(client_opts(plain, tls=client_tls(tls.ca),
                                   open_timeout=1.5))
        with pytest.raises(SourceUnavailable, match="not reachable"):
            await c.open()


async def test_client_certificate_is_required_when_configured(snapshot_4k: Path, tls: TlsFiles) -> None:
    async with serving(snapshot_4k, ssl_context=server_ctx(tls, client_certs=True)) as server:
        anon = PeerClient(client_opts(server, tls=client_tls(tls.ca), open_timeout=1.5))
        with pytest.raises(SourceUnavailable):
            await anon.open()
        ok = PeerClient(client_opts(server, tls=client_tls(tls.ca, (tls.client_cert, tls.client_key))))
        await ok.open()
        buf = bytearray(BS)
        await ok.fill(0, memoryview(buf))
        assert buf == snapshot_4k.read_bytes()[:BS]
        await ok.aclose()


FRAME = st.one_of(
    st.builds(p.encode_read, st.integers(0, 8), st.sampled_from([0, BS, 100, 1 << 40, 31 << 20]),
              st.integers(0, 2000)),
    st.builds(lambda i: p.header(p.FrameType.PING, id=i), st.integers(0, 2**32 - 1)),
    st.builds(lambda t, f, c, i, o, n, a: struct.pack("<BBHIQII", t, f, c, i, o, n, a),
              st.integers(0, 255), st.integers(0, 3), st.integers(0, 3000), st.integers(0, 9),
              st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 3)),
    st.binary(min_size=1, max_size=64),
)


@given(frames=st.lists(FRAME, min_size=1, max_size=12), handshake=st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_frame_sequences_only_ever_cost_the_sender_its_connection(
        snapshot_4k: Path, frames: list[bytes], handshake: bool) -> None:
    data = snapshot_4k.read_bytes()

    async def scenario() -> None:
        async with serving(snapshot_4k, ServeLimits(max_inflight=8, handshake_timeout=1.0)) as server:
            good = PeerClient(client_opts(server))
            await good.open()
            r, w = await raw_client(server, handshake=handshake)
            w.write(b"".join(frames))
            with contextlib.suppress(ConnectionError):
                await w.drain()
            # Whatever it sent, the server answers or drops it; never hangs, never dies.
            async def drain() -> None:
                while True:
                    t, _, _, _ = await read_frame(r)
                    if t is p.FrameType.ERROR:
                        return

            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                await asyncio.wait_for(drain(), 1.5)
            w.close()
            buf = bytearray(8 * BS)
            await asyncio.wait_for(good.fill(3 << 20, memoryview(buf)), WAIT)
            assert buf == data[3 << 20 : (3 << 20) + len(buf)]
            assert good.stats.link_losses == 0
            await good.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 30))


class SwallowAfterHandshake:
    """Relay editors, one per connection in order: connection number ``stall`` gets its CHALLENGE and
    WELCOME, then nothing more (its server seems to hang); the others pass untouched."""

    def __init__(self, stall: int) -> None:
        self.stall = stall
        self.made = 0

    def factory(self) -> Callable[[bytes], bytes]:
        self.made += 1
        if self.made != self.stall:
            return lambda data: data
        passed = bytearray()

        def edit(data: bytes) -> bytes:
            limit = 2 * p.HEADER_SIZE + p.CHALLENGE.size + p.WELCOME.size
            keep = data[: max(0, limit - len(passed))]
            passed.extend(keep)
            return bytes(keep)

        return edit


async def test_demand_fills_never_wait_behind_a_stalled_bulk_connection(snapshot_4k: Path) -> None:
    data = snapshot_4k.read_bytes()
    async with serving(snapshot_4k) as server:
        stall = SwallowAfterHandshake(stall=2)  # the bulk connection is opened second
        relay = Relay(*server.address, downstream_editor=stall.factory)
        addr = await relay.start()
        c = PeerClient(client_opts(server, host=addr[0], port=addr[1], io_timeout=30.0))
        try:
            await c.open()
            big = bytearray(8 << 20)
            prefetch = asyncio.create_task(c.prefetch(0, memoryview(big)))
            await eventually(lambda: c.bulk is not None and c.bulk.inflight > 0, what="prefetch sent into the stall")
            buf = bytearray(BS)
            t0 = asyncio.get_running_loop().time()
            for i in range(200):
                await asyncio.wait_for(c.fill(i * 7 * BS, memoryview(buf)), 2)
                assert buf == data[i * 7 * BS : i * 7 * BS + BS]
            assert asyncio.get_running_loop().time() - t0 < 5
            assert not prefetch.done()  # the bulk bytes are still stuck: the fills went around them
            prefetch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prefetch
        finally:
            await c.aclose()
            await relay.close()


async def test_bulk_bytes_are_rationed_while_a_demand_fill_waits_and_never_starved(snapshot_4k: Path) -> None:
    from uffdd.peer.client.connection import BULK_SLICE, HOLD_SLICE_S

    async with serving(snapshot_4k) as server:
        stall = SwallowAfterHandshake(stall=1)  # the urgent connection hangs after its handshake
        relay = Relay(*server.address, downstream_editor=stall.factory)
        addr = await relay.start()
        c = PeerClient(client_opts(server, host=addr[0], port=addr[1], io_timeout=30.0))
        try:
            await c.open()
            big = bytearray(8 << 20)
            await c.prefetch(0, memoryview(big))  # warm: both connections up
            fill = asyncio.create_task(c.fill(0, memoryview(bytearray(BS))))
            await eventually(lambda: c.urgent.busy, what="a demand fill waiting")
            assert c.bulk is not None and c.bulk.held  # the bulk side is held now
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.wait_for(c.prefetch(8 << 20, memoryview(big)), 30)  # rationed, yet it completes
            held_for = loop.time() - t0
            assert held_for >= 0.7 * (len(big) // BULK_SLICE - 1) * HOLD_SLICE_S, held_for
            assert big == snapshot_4k.read_bytes()[8 << 20 : 16 << 20]
            assert not fill.done()
            fill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fill
            # Nobody waits: the bulk side is let go (not timed against the rationed transfer: an
            # in-process relay on a busy machine may itself be that slow).
            assert not c.urgent.busy and not c.bulk.held
            await asyncio.wait_for(c.prefetch(16 << 20, memoryview(big)), 30)
            assert big == snapshot_4k.read_bytes()[16 << 20 : 24 << 20]
        finally:
            await c.aclose()
            await relay.close()


@pytest.mark.parametrize(("secret", "why"), [
    ("0123456789abcdef0123", "bytes"),
    ("passwordpasswordpasswordpassword", "different characters"),
    ("correct horse battery staple, correct horse", "different characters"),
], ids=["short", "repeated-word", "padded-phrase"])
def test_weak_shared_secrets_are_refused_with_the_reason(tmp_path: Path, secret: str, why: str) -> None:
    from uffdd.errors import ConfigError
    from uffdd.peer.config import PeerLinkConfig, read_secret

    with pytest.raises(ValidationError, match=f"secret: the shared secret is too weak: .*{why}.*uffdd secret"):
        PeerLinkConfig(address="10.0.0.5:7447", secret=secret)
    path = tmp_path / "secret"
    path.write_text(secret + "\n")
    with pytest.raises(ConfigError, match=f"sources.x.secret_file: the shared secret is too weak: .*{why}"):
        read_secret(None, str(path), "sources.x")


def test_uffdd_secret_makes_secrets_that_pass_the_check_and_are_never_the_same(tmp_path: Path) -> None:
    from uffdd.peer.config import read_secret

    made = [subprocess.run([sys.executable, "-m", "uffdd", "secret"], check=True, capture_output=True,
                           text=True).stdout.strip() for _ in range(3)]
    assert len(set(made)) == 3
    out = tmp_path / "s"
    subprocess.run([sys.executable, "-m", "uffdd", "secret", "-o", str(out)], check=True)
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert read_secret(None, str(out), "serve") == out.read_bytes().strip()
    again = subprocess.run([sys.executable, "-m", "uffdd", "secret", "-o", str(out)], capture_output=True)
    assert again.returncode == 1  # an existing file is never overwritten
