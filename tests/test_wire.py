"""uffdd.peer._wire over uffdd/csrc/wire.h: RFC 8439's vectors, and the same crc32c as the crc32c
package and the same ChaCha20-Poly1305 tags (empty plaintext) as cryptography on random inputs,
so the C fast paths and the Python side of the peer protocol agree on every byte."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import crc32c as crc32c_pkg
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from uffdd.peer import _wire  # ./scripts/test builds it; its absence is a failure here

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 4096
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

P1305 = (1 << 130) - 5
SEEDED = st.builds(random.Random, st.integers(0, 2**64))
"""Random bytes from a drawn seed: large inputs without spending Hypothesis's own entropy on them."""


def poly1305_formula(key: bytes, msg: bytes) -> bytes:
    """RFC 8439 2.5 with Python's integers: an oracle that shares no code with the C."""
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(key[16:], "little")
    acc = 0
    for i in range(0, len(msg), 16):
        acc = (acc + int.from_bytes(msg[i : i + 16] + b"\x01", "little")) * r % P1305
    return ((acc + s) % (1 << 128)).to_bytes(16, "little")


def pad16(b: bytes) -> bytes:
    return bytes(-len(b) % 16)


def cut(data: bytes, rnd: random.Random, pieces: int) -> list[bytes]:
    """data in `pieces` pieces at random offsets (some may be empty)."""
    cuts = sorted(rnd.randint(0, len(data)) for _ in range(pieces - 1))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# ---- RFC 8439 vectors ----


def test_chacha20_block_is_rfc8439_2_3_2() -> None:
    out = _wire.chacha20_block(bytes(range(32)), 1, bytes.fromhex("000000090000004a00000000"))
    assert out == bytes.fromhex(
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")


def test_poly1305_is_rfc8439_2_5_2() -> None:
    key = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
    tag = _wire.poly1305(key, b"Cryptographic Forum Research Group")
    assert tag == bytes.fromhex("a8061dc1305136c6c22b8baf0c0127a9")


def test_poly1305_key_generation_is_rfc8439_2_6_2() -> None:
    block = _wire.chacha20_block(bytes(range(0x80, 0xA0)), 0, bytes.fromhex("000000000001020304050607"))
    assert block[:32] == bytes.fromhex("8ad5a08b905f81cc815040274ab29471a833b637e3fd0da508dbb8e2fdd1a646")


def test_aead_of_rfc8439_2_8_2_gives_its_tag() -> None:
    """The vector has a plaintext: encrypt it with the key stream, build the MAC input by hand."""
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future,"
                 b" sunscreen would be it.")
    stream = b"".join(_wire.chacha20_block(key, counter, nonce) for counter in (1, 2))
    ciphertext = bytes(p ^ k for p, k in zip(plaintext, stream, strict=False))
    assert ciphertext[:16] == bytes.fromhex("d31a8d34648e60db7b86afbc53ef7ec2")
    otk = _wire.chacha20_block(key, 0, nonce)[:32]
    mac_data = aad + pad16(aad) + ciphertext + pad16(ciphertext) + struct.pack("<QQ", len(aad), len(ciphertext))
    tag = _wire.poly1305(otk, mac_data)
    assert tag == bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")
    assert ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad) == ciphertext + tag


# ---- Poly1305 against the formula ----

ALL_ONES = b"\xff" * 32
SMALL_R = b"\x02" + bytes(15)


@FUZZ
@given(key=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=300))
@example(key=ALL_ONES, msg=b"\xff" * 256)  # h near its largest, every carry taken
@example(key=SMALL_R + bytes(16), msg=b"\xff" * 16)  # h lands just above p: the final subtraction
@example(key=SMALL_R + ALL_ONES[:16], msg=b"\x02" + bytes(15))  # (h + s) wraps past 2^128
@example(key=b"\x01" + bytes(31), msg=b"\xfb" + b"\xff" * 15 + b"\xfe" * 16 + b"\x01" * 16)
@example(key=ALL_ONES, msg=b"")
def test_poly1305_is_the_rfc_formula(key: bytes, msg: bytes) -> None:
    assert _wire.poly1305(key, msg) == poly1305_formula(key, msg)


# ---- crc32c ----


def test_crc32c_check_value_and_chaining() -> None:
    assert _wire.crc32c(b"123456789") == 0xE3069283
    assert _wire.crc32c(b"56789", value=_wire.crc32c(b"1234")) == 0xE3069283
    assert _wire.crc32c(b"", 0x12345678) == 0x12345678


@FUZZ
@given(n=st.integers(0, 20000), value=st.integers(0, 2**32 - 1), rnd=SEEDED)
@example(n=70000, value=0, rnd=random.Random(1))  # long enough to run without the GIL
def test_crc32c_is_the_crc32c_package(n: int, value: int, rnd: random.Random) -> None:
    data = rnd.randbytes(n)
    want = crc32c_pkg.crc32c(data, value)
    assert _wire.crc32c(data, value) == want
    assert _wire.crc32c(bytearray(data), value=value) == want
    if value == 0:
        assert _wire.crc32c_portable(data) == want


def test_crc32c_at_every_offset_and_length_around_the_stream_steps() -> None:
    """Lengths around the three-stream steps (3 x 256, 3 x 1360) at each alignment, both paths."""
    data = random.Random(7).randbytes(3 * 1360 * 2 + 64)
    lengths = sorted({n + d for n in (0, 8, 768, 1536, 4080, 4096, 8160) for d in range(-9, 10) if n + d >= 0})
    view = memoryview(data)
    for off in range(8):
        for n in lengths:
            chunk = view[off : off + n]
            want = crc32c_pkg.crc32c(chunk)
            assert _wire.crc32c(chunk) == want, (off, n)
            assert _wire.crc32c_portable(chunk) == want, (off, n)


@FUZZ
@given(blocks=st.integers(0, 24), rnd=SEEDED)
def test_crc32c_blocks_is_each_blocks_crc32c_little_endian(blocks: int, rnd: random.Random) -> None:
    data = rnd.randbytes(blocks * BLOCK)
    want = struct.pack(f"<{blocks}I", *(crc32c_pkg.crc32c(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK)))
    assert _wire.crc32c_blocks(data) == want
    assert _wire.check_blocks(data, want) == -1


@FUZZ
@given(blocks=st.integers(1, 24), data=st.data())
def test_check_blocks_finds_a_flipped_bit_in_any_block(blocks: int, data: st.DataObject) -> None:
    rnd = data.draw(SEEDED)
    pages = bytearray(rnd.randbytes(blocks * BLOCK))
    expected = _wire.crc32c_blocks(pages)
    bad = data.draw(st.integers(0, blocks - 1), label="bad block")
    bit = data.draw(st.integers(0, BLOCK * 8 - 1), label="bit")
    wrong = bytearray(expected)
    wrong[4 * bad] ^= 1
    assert _wire.check_blocks(pages, wrong) == bad  # a wrong crc is found the same way
    pages[bad * BLOCK + bit // 8] ^= 1 << (bit % 8)
    assert _wire.check_blocks(pages, expected) == bad
    if bad + 1 < blocks:  # with a later block bad too, the first is the one named
        later = data.draw(st.integers(bad + 1, blocks - 1), label="later bad block")
        pages[later * BLOCK] ^= 0x80
        assert _wire.check_blocks(pages, expected) == bad


# ---- ChaCha20-Poly1305 tags ----

aead_inputs = st.tuples(st.binary(min_size=32, max_size=32), st.binary(min_size=12, max_size=12),
                        st.integers(0, 20000), st.integers(1, 12), SEEDED)


@FUZZ
@given(aead_inputs)
@example((bytes(32), bytes(12), 0, 1, random.Random(0)))
@example((ALL_ONES, b"\xff" * 12, 100_000, 5, random.Random(2)))  # without the GIL
def test_aead_tag_is_cryptographys_with_an_empty_plaintext(
        args: tuple[bytes, bytes, int, int, random.Random]) -> None:
    key, nonce, n, pieces, rnd = args
    aad = rnd.randbytes(n)
    parts = cut(aad, rnd, pieces)
    want = ChaCha20Poly1305(key).encrypt(nonce, b"", aad)
    assert _wire.aead_tag(key, nonce, *parts) == want
    assert _wire.aead_tag(key, nonce, *(memoryview(bytearray(p)) for p in parts)) == want
    assert _wire.aead_verify(key, nonce, want, *parts)


@FUZZ
@given(aead_inputs, st.data())
def test_aead_verify_refuses_a_tampered_tag_aad_key_or_nonce(
        args: tuple[bytes, bytes, int, int, random.Random], data: st.DataObject) -> None:
    key, nonce, n, pieces, rnd = args
    aad = rnd.randbytes(n)
    tag = _wire.aead_tag(key, nonce, aad)
    bit = data.draw(st.integers(0, 127), label="tag bit")
    bad_tag = bytearray(tag)
    bad_tag[bit // 8] ^= 1 << (bit % 8)
    assert not _wire.aead_verify(key, nonce, bytes(bad_tag), *cut(aad, rnd, pieces))
    if n:
        pos = data.draw(st.integers(0, 8 * n - 1), label="aad bit")
        bad_aad = bytearray(aad)
        bad_aad[pos // 8] ^= 1 << (pos % 8)
        assert not _wire.aead_verify(key, nonce, tag, *cut(bytes(bad_aad), rnd, pieces))
    assert not _wire.aead_verify(key, nonce, tag, aad, b"\x00")  # one byte more
    assert not _wire.aead_verify(bytes(b ^ 1 for b in key), nonce, tag, aad)
    assert not _wire.aead_verify(key, bytes(b ^ 1 for b in nonce), tag, aad)
    assert _wire.aead_verify(key, nonce, tag, *cut(aad, rnd, pieces))


# ---- bad arguments ----


@pytest.mark.parametrize(("call", "error", "words"), [
    (lambda: _wire.aead_tag(bytes(31), bytes(12), b"x"), ValueError, "key must be 32 bytes, got 31"),
    (lambda: _wire.aead_tag(bytes(32), bytes(16)), ValueError, "nonce must be 12 bytes, got 16"),
    (lambda: _wire.aead_verify(bytes(32), bytes(12), bytes(15), b"x"), ValueError, "tag must be 16 bytes"),
    (lambda: _wire.aead_tag(bytes(32), bytes(12), b"x", "text"),  # type: ignore[arg-type]
     TypeError, "AAD part must be"),
    (lambda: _wire.crc32c_blocks(bytes(BLOCK + 1)), ValueError, "4097 is not a multiple of 4096"),
    (lambda: _wire.check_blocks(bytes(2 * BLOCK), bytes(4)), ValueError, "per block) must be 8 bytes, got 4"),
    (lambda: _wire.crc32c(b"x", 2**32), ValueError, "value must be a crc32c"),
    (lambda: _wire.crc32c(b"x", -1), ValueError, "value must be a crc32c"),
    (lambda: _wire.crc32c(b"x", other=1),  # type: ignore[call-arg]
     TypeError, "unexpected keyword argument 'other'"),
    (lambda: _wire.crc32c(memoryview(bytes(8))[::2]), TypeError, "contiguous bytes-like"),
])
def test_bad_arguments_get_errors_that_name_what_is_wrong(
        call: Callable[[], object], error: type[Exception], words: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


# ---- the header as the C fast paths build it ----


@pytest.fixture(scope="module", params=["x86-64", "portable"])
def wire_check(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/wire_check.c built with the project's C flags (-Werror), with or without the x86 paths."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the C extensions and this check")
    out = tmp_path_factory.mktemp("wire") / f"wire_check-{request.param}"
    flags = ["-DWIRE_PORTABLE"] if request.param == "portable" else []
    subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", *flags, "-I", str(ROOT / "uffdd/csrc"),
                    "-o", str(out), str(ROOT / "tests/wire_check.c")], check=True, timeout=120)
    return out


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 767, 768, 4096, 4113, 70000])
def test_the_header_alone_agrees_with_the_packages_with_and_without_x86_paths(wire_check: Path, n: int) -> None:
    rnd = random.Random(n)
    key, nonce, data = rnd.randbytes(32), rnd.randbytes(12), rnd.randbytes(n)
    cuts = sorted(rnd.randint(0, n) for _ in range(3))
    out = subprocess.run([str(wire_check), key.hex(), nonce.hex(), *map(str, cuts)], input=data,
                         capture_output=True, check=True, timeout=60).stdout.decode().split("\n")
    assert out[0] == f"crc32c {crc32c_pkg.crc32c(data):08x}"
    assert out[1] == f"tag {ChaCha20Poly1305(key).encrypt(nonce, b'', data).hex()}"
    assert out[2] == "verify 0 -1"
