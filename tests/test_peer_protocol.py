"""The peer wire protocol without sockets: codecs, limits, and property-based fuzzing of the
frame decoders on both sides (the server's FrameDecoder, the client's ResponseReader)."""

from __future__ import annotations

import contextlib
import itertools
import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uffdd.peer import protocol as p

BS = p.BLOCK_SIZE
GUARD = 64
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def page(kind: str, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "zero":
        return bytes(BS)
    if kind == "text":  # compresses well
        return (b"uffdd page %d " % seed * (BS // 8))[:BS]
    if kind == "sparse":  # zero but for a few bytes: must not be mistaken for a zero page
        b = bytearray(BS)
        b[rng.randrange(BS)] = rng.randrange(1, 256)
        return bytes(b)
    return rng.randbytes(BS)


PAGES = st.lists(st.tuples(st.sampled_from(["random", "zero", "text", "sparse"]), st.integers(0, 2**32)),
                 min_size=1, max_size=12).map(lambda ks: b"".join(page(k, s) for k, s in ks))


@dataclass
class Target:
    offset: int
    count: int
    dest: memoryview | None
    pos: int = 0


@dataclass
class Handler:
    """Stands in for the client's connection: a table of pending requests."""

    targets: dict[int, Target] = field(default_factory=dict)
    frames: list[p.Frame] = field(default_factory=list)
    delivered: list[tuple[int, int, bool]] = field(default_factory=list)

    def lookup(self, req_id: int) -> Target | None:
        t = self.targets.get(req_id)
        return t if t is not None and t.pos < t.count else None

    def on_frame(self, frame: p.Frame) -> None:
        self.frames.append(frame)

    def on_data(self, target: p.Target, blocks: int, ok: bool) -> None:
        assert isinstance(target, Target)
        first = target.pos
        target.pos += blocks
        rid = next(k for k, v in self.targets.items() if v is target)
        self.delivered.append((rid, first, ok))


def guarded(n: int) -> tuple[bytearray, memoryview]:
    """A destination with guard bytes on both sides, to catch any write outside it."""
    buf = bytearray(b"\xee" * (n + 2 * GUARD))
    return buf, memoryview(buf)[GUARD : GUARD + n]


def guards_intact(buf: bytearray) -> bool:
    return buf[:GUARD] == b"\xee" * GUARD and buf[-GUARD:] == b"\xee" * GUARD


def data_frame(req_id: int, offset: int, data: bytes, lz4: bool = True) -> bytes:
    return b"".join(bytes(x) for x in p.encode_data(req_id, offset, memoryview(data), p.Compressor(lz4)))


def test_header_and_descriptor_sizes_match_the_documented_layout() -> None:
    assert p.HEADER_SIZE == 24
    assert p.DESC_SIZE == 8
    assert p.HELLO.size == 42 and p.CHALLENGE.size == 72 and p.WELCOME.size == 40
    hdr = p.encode_read(7, 0x3000, 2)
    assert hdr == struct.pack("<BBHIQII", 0x10, 0, 2, 7, 0x3000, 0, 0)


def test_zero_random_and_compressible_blocks_get_their_own_encodings() -> None:
    data = page("zero", 0) + page("random", 1) + page("text", 2) + page("sparse", 3)
    counts = p.BlockCounts()
    pieces = p.encode_data(9, 0, memoryview(data), p.Compressor(True), counts)
    raw = b"".join(bytes(x) for x in pieces)
    descs = [p.DESC.unpack_from(raw, p.HEADER_SIZE + i * p.DESC_SIZE) for i in range(4)]
    assert [d[2] for d in descs] == [p.Encoding.ZERO, p.Encoding.RAW, p.Encoding.LZ4, p.Encoding.LZ4]
    assert descs[0][1] == 0  # a zero page carries no payload
    assert descs[2][1] < BS // 8
    assert (counts.zero, counts.raw, counts.lz4) == (1, 1, 2)
    assert len(raw) == p.HEADER_SIZE + 4 * p.DESC_SIZE + counts.payload_bytes


def test_without_lz4_negotiated_every_nonzero_block_is_raw() -> None:
    data = page("text", 1) + page("zero", 0)
    raw = data_frame(1, 0, data, lz4=False)
    assert [p.DESC.unpack_from(raw, p.HEADER_SIZE + i * 8)[2] for i in range(2)] == [p.Encoding.RAW, p.Encoding.ZERO]


class CountingCompressor(p.Compressor):
    __slots__ = ("calls",)

    def __init__(self) -> None:
        super().__init__(True)
        self.calls = 0

    def try_compress(self, block: memoryview) -> bytes | None:
        self.calls += 1
        return super().try_compress(block)


def test_compressor_only_probes_once_per_frame_after_incompressible_blocks() -> None:
    comp = CountingCompressor()
    rnd = b"".join(page("random", i) for i in range(64))
    p.encode_data(1, 0, memoryview(rnd), comp)
    assert comp.probing
    comp.calls = 0
    p.encode_data(1, 0, memoryview(rnd), comp)
    assert comp.calls == 1  # random memory costs one lz4 attempt per frame, not one per block
    p.encode_data(1, 0, memoryview(page("text", 5) * 4), comp)
    assert not comp.probing  # a compressible frame ends the probing


@given(data=PAGES, chunks=st.lists(st.integers(1, 9000), min_size=1, max_size=40), lz4=st.booleans())
@FUZZ
def test_data_frames_deliver_exact_bytes_whatever_the_read_sizes(data: bytes, chunks: list[int], lz4: bool) -> None:
    n = len(data) // BS
    buf, dest = guarded(len(data))
    h = Handler({5: Target(0x10000, n, dest)})
    reader = p.ResponseReader(h, lz4=lz4, max_blocks=64)
    # The server may split one request into several frames.
    stream = b""
    pos = 0
    cut = max(1, n // 2)
    for lo, hi in ((0, cut), (cut, n)):
        if lo < hi:
            stream += data_frame(5, 0x10000 + lo * BS, data[lo * BS : hi * BS], lz4)
            pos += 1
    it = itertools.cycle(chunks)
    p.feed_reader(reader, stream, lambda n_: next(it))
    assert bytes(dest) == data
    assert guards_intact(buf)
    assert all(ok for _, _, ok in h.delivered)
    assert sum(1 for _ in h.delivered) == pos


@pytest.mark.parametrize("kind", ["random", "text", "zero"])
def test_a_flipped_payload_or_crc_is_reported_as_bad_never_as_good(kind: str) -> None:
    data = page("random", 1) + page(kind, 2)
    frame = bytearray(data_frame(3, 0, data))
    if kind == "zero":
        frame[p.HEADER_SIZE + p.DESC_SIZE] ^= 1  # the zero block's crc
    else:
        frame[-10] ^= 0x40  # inside the second block's payload
    _, dest = guarded(len(data))
    h = Handler({3: Target(0, 2, dest)})
    p.feed_reader(p.ResponseReader(h, lz4=True, max_blocks=8), bytes(frame))
    assert h.delivered == [(3, 0, False)]


BAD_RESPONSES: list[tuple[str, bytes, p.ErrorCode]] = [
    ("unknown-type", struct.pack("<BBHIQII", 0x55, 0, 0, 0, 0, 0, 0), p.ErrorCode.UNKNOWN_TYPE),
    ("undefined-flag", struct.pack("<BBHIQII", p.FrameType.PONG, 2, 0, 0, 0, 0, 0), p.ErrorCode.BAD_FRAME),
    ("tagged-without-room", struct.pack("<BBHIQII", p.FrameType.PONG, 1, 0, 0, 0, 0, 0), p.ErrorCode.BAD_LENGTH),
    ("tagged-without-keys", struct.pack("<BBHIQII", p.FrameType.PONG, 1, 0, 0, 0, 16, 0) + bytes(16),
     p.ErrorCode.BAD_FRAME),
    ("oversized-control", struct.pack("<BBHIQII", p.FrameType.ERROR, 0, 0, 0, 0, 1 << 30, 1), p.ErrorCode.BAD_LENGTH),
    ("wrong-id", p.header(p.FrameType.DATA, id=99, offset=0, count=1, length=8 + BS), p.ErrorCode.BAD_ID),
    ("wrong-offset", p.header(p.FrameType.DATA, id=1, offset=BS, count=1, length=8 + BS), p.ErrorCode.OUT_OF_RANGE),
    ("too-many-blocks", p.header(p.FrameType.DATA, id=1, offset=0, count=3, length=3 * (8 + BS)),
     p.ErrorCode.OUT_OF_RANGE),
    ("count-over-limit", p.header(p.FrameType.DATA, id=1, offset=0, count=9, length=9 * 8),
     p.ErrorCode.OUT_OF_RANGE),
    ("length-too-big", p.header(p.FrameType.DATA, id=1, offset=0, count=1, length=8 + BS + 1), p.ErrorCode.BAD_LENGTH),
    ("length-lies", p.header(p.FrameType.DATA, id=1, offset=0, count=2, length=16 + BS)
     + p.DESC.pack(0, BS, 0, 0) * 2, p.ErrorCode.BAD_LENGTH),
    ("raw-short", p.header(p.FrameType.DATA, id=1, offset=0, count=1, length=8 + 100)
     + p.DESC.pack(0, 100, p.Encoding.RAW, 0), p.ErrorCode.BAD_LENGTH),
    ("unknown-encoding", p.header(p.FrameType.DATA, id=1, offset=0, count=1, length=8)
     + p.DESC.pack(0, 0, 9, 0), p.ErrorCode.BAD_FRAME),
    ("reserved-set", p.header(p.FrameType.DATA, id=1, offset=0, count=1, length=8)
     + p.DESC.pack(p.ZERO_CRC, 0, p.Encoding.ZERO, 1), p.ErrorCode.BAD_FRAME),
    ("read-to-client", p.encode_read(1, 0, 1), p.ErrorCode.BAD_STATE),
]


@pytest.mark.parametrize(("name", "stream", "code"), BAD_RESPONSES, ids=[b[0] for b in BAD_RESPONSES])
def test_client_reader_refuses_malformed_frames_with_the_right_code(
        name: str, stream: bytes, code: p.ErrorCode) -> None:
    _, dest = guarded(2 * BS)
    reader = p.ResponseReader(Handler({1: Target(0, 2, dest)}), lz4=False, max_blocks=8)
    with pytest.raises(p.ProtocolError) as err:
        p.feed_reader(reader, stream)
    assert err.value.code == code, err.value
    with pytest.raises(p.ProtocolError):  # and it stays refused: the connection is dropped
        reader.buffer_updated(0)


def test_lz4_block_is_refused_when_lz4_was_not_negotiated() -> None:
    frame = data_frame(1, 0, page("text", 1), lz4=True)
    _, dest = guarded(BS)
    reader = p.ResponseReader(Handler({1: Target(0, 1, dest)}), lz4=False, max_blocks=8)
    with pytest.raises(p.ProtocolError, match="not negotiated"):
        p.feed_reader(reader, frame)


def test_bytes_for_an_abandoned_request_are_discarded_not_written() -> None:
    data = page("random", 4) * 3
    t = Target(0, 3, None)
    h = Handler({1: t})
    p.feed_reader(p.ResponseReader(h, lz4=True, max_blocks=8), data_frame(1, 0, data))
    assert h.delivered == [(1, 0, True)] and t.pos == 3


SERVER_BAD: list[tuple[str, bytes, p.ErrorCode]] = [
    ("unknown-type", struct.pack("<BBHIQII", 0x66, 0, 0, 0, 0, 0, 0), p.ErrorCode.UNKNOWN_TYPE),
    ("data-to-server", p.header(p.FrameType.DATA, id=1, count=1, length=8), p.ErrorCode.BAD_STATE),
    ("read-with-payload", struct.pack("<BBHIQII", p.FrameType.READ, 0, 1, 1, 0, 4, 0), p.ErrorCode.BAD_LENGTH),
    ("read-id-0", p.encode_read(0, 0, 1), p.ErrorCode.BAD_ID),
    ("read-unaligned", p.encode_read(1, 100, 1), p.ErrorCode.OUT_OF_RANGE),
    ("read-too-big", p.encode_read(1, 0, 2000), p.ErrorCode.OUT_OF_RANGE),
    ("read-zero-blocks", p.encode_read(1, 0, 0), p.ErrorCode.OUT_OF_RANGE),
    ("hello-too-long", struct.pack("<BBHIQII", p.FrameType.HELLO, 0, 0, 0, 0, 100000, 0), p.ErrorCode.BAD_LENGTH),
    ("ping-with-offset", struct.pack("<BBHIQII", p.FrameType.PING, 0, 0, 0, 8, 0, 0), p.ErrorCode.BAD_FRAME),
    ("aux-on-read", struct.pack("<BBHIQII", p.FrameType.READ, 0, 1, 1, 0, 0, 7), p.ErrorCode.BAD_FRAME),
]


@pytest.mark.parametrize(("name", "stream", "code"), SERVER_BAD, ids=[b[0] for b in SERVER_BAD])
def test_server_decoder_refuses_malformed_frames_with_the_right_code(
        name: str, stream: bytes, code: p.ErrorCode) -> None:
    dec = p.FrameDecoder(p.SERVER_ACCEPTS, p.Limits(max_blocks=1024))
    with pytest.raises(p.ProtocolError) as err:
        dec.feed(stream)
    assert err.value.code == code
    with pytest.raises(p.ProtocolError):
        dec.feed(p.encode_read(1, 0, 1))  # nothing more is decoded after a protocol error


@given(frames=st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(0, 2**40), st.integers(1, 64)), max_size=20),
       cuts=st.lists(st.integers(1, 50), min_size=1, max_size=10))
@FUZZ
def test_server_decoder_yields_every_read_whatever_the_segmentation(
        frames: list[tuple[int, int, int]], cuts: list[int]) -> None:
    stream = b"".join(p.encode_read(i, o * BS, c) for i, o, c in frames) + p.header(p.FrameType.PING, id=3)
    dec = p.FrameDecoder(p.SERVER_ACCEPTS, p.Limits(max_blocks=64))
    out: list[p.Frame] = []
    pos = 0
    k = 0
    while pos < len(stream):
        n = cuts[k % len(cuts)]
        k += 1
        out += dec.feed(stream[pos : pos + n])
        pos += n
    assert [(f.id, f.offset, f.count) for f in out[:-1]] == [(i, o * BS, c) for i, o, c in frames]
    assert out[-1].type is p.FrameType.PING


@given(junk=st.binary(max_size=4000), cuts=st.lists(st.integers(1, 600), min_size=1, max_size=8))
@FUZZ
def test_server_decoder_fuzz_arbitrary_bytes_only_ever_raise_protocol_error(junk: bytes, cuts: list[int]) -> None:
    dec = p.FrameDecoder(p.SERVER_ACCEPTS, p.Limits(max_blocks=1024))
    pos = k = 0
    try:
        while pos < len(junk):
            n = cuts[k % len(cuts)]
            k += 1
            for f in dec.feed(junk[pos : pos + n]):
                assert f.type in p.SERVER_ACCEPTS
                assert len(f.payload) <= p.MAX_CONTROL_PAYLOAD
            pos += n
            assert len(dec._buf) <= max(p.HEADER_SIZE, p.MAX_CONTROL_PAYLOAD)  # never holds what a peer claims
    except p.ProtocolError:
        pass


@given(prefix=st.binary(max_size=200), junk=st.binary(max_size=6000),
       cuts=st.lists(st.integers(1, 5000), min_size=1, max_size=8))
@FUZZ
def test_client_reader_fuzz_arbitrary_bytes_never_write_outside_dest(
        prefix: bytes, junk: bytes, cuts: list[int]) -> None:
    bufs = [guarded(n * BS) for n in (1, 2, 4)]
    h = Handler({i + 1: Target(i * 0x100000, n, bufs[i][1]) for i, n in enumerate((1, 2, 4))})
    reader = p.ResponseReader(h, lz4=True, max_blocks=4)
    stream = prefix + junk
    it = itertools.cycle(cuts)
    with contextlib.suppress(p.ProtocolError):
        p.feed_reader(reader, stream, lambda n: next(it))
    assert all(guards_intact(b) for b, _ in bufs)
    for rid, _, _ in h.delivered:
        assert rid in (1, 2, 3)


@given(data=PAGES, flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
       cuts=st.lists(st.integers(1, 5000), min_size=1, max_size=6))
@FUZZ
def test_client_reader_fuzz_corrupted_stream_never_reports_a_wrong_page_as_good(
        data: bytes, flips: list[tuple[int, int]], cuts: list[int]) -> None:
    """The property the guest relies on: a frame reported ok=True carries exactly the source's bytes."""
    n = len(data) // BS
    stream = bytearray(data_frame(1, 0, data) + p.header(p.FrameType.PONG, id=1))
    for pos, x in flips:
        stream[pos % len(stream)] ^= x
    buf, dest = guarded(len(data))
    h = Handler({1: Target(0, n, dest)})
    it = itertools.cycle(cuts)
    with contextlib.suppress(p.ProtocolError):
        p.feed_reader(p.ResponseReader(h, lz4=True, max_blocks=16), bytes(stream), lambda k: next(it))
    assert guards_intact(buf)
    for _, _, ok in h.delivered:
        if ok:
            assert bytes(dest) == data


def test_hello_challenge_welcome_round_trip_and_reject_garbage() -> None:
    h = p.Hello(p.Role.BULK, p.FEATURE_LZ4, b"n" * 32, "vm-7")
    assert p.Hello.decode(h.encode()) == h
    with pytest.raises(p.ProtocolError, match="magic"):
        p.Hello.decode(b"XXXX" + h.encode()[4:])
    with pytest.raises(p.ProtocolError, match="version"):
        p.Hello.decode(p.HELLO.pack(p.MAGIC, 9, 0, 0, b"n" * 32, 0))
    with pytest.raises(p.ProtocolError, match="name length"):
        p.Hello.decode(h.encode() + b"x")
    w = p.Welcome(1 << 30, BS, 1024, 256, 0, b"i" * 16)
    assert p.Welcome.decode(w.encode()) == w
    with pytest.raises(p.ProtocolError, match="block size"):
        p.Welcome.decode(p.Welcome(1, 8192, 1, 1, 0, b"i" * 16).encode())
    c = p.Challenge(p.AuthMethod.HMAC_SHA256, b"s" * 32, b"p" * 32)
    assert p.Challenge.decode(c.encode()) == c
    assert c.core() == c.encode()[: -p.PROOF_SIZE]


def test_proofs_depend_on_secret_nonces_and_direction() -> None:
    hello = p.Hello(p.Role.URGENT, 0, b"a" * 32, "x").encode()
    core = p.Challenge(p.AuthMethod.HMAC_SHA256, b"b" * 32, p.NO_PROOF).core()
    good = p.client_proof(b"s" * 16, hello, core)
    assert p.proofs_equal(good, p.client_proof(b"s" * 16, hello, core))
    assert not p.proofs_equal(good, p.client_proof(b"t" * 16, hello, core))
    assert not p.proofs_equal(good, p.server_proof(b"s" * 16, hello, core))  # no reflection
    other = p.Challenge(p.AuthMethod.HMAC_SHA256, b"c" * 32, p.NO_PROOF).core()
    assert not p.proofs_equal(good, p.client_proof(b"s" * 16, hello, other))  # no replay
