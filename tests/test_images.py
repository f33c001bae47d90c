"""Packed images without a guest: the format refuses hostile input, packing round-trips, diff
images store only what changed, and the chunk cache never serves a bad copy."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.test_cli import uffdd_cli
from uffdd.config import parse_config
from uffdd.errors import ConfigError, SourceUnavailable
from uffdd.images.cache import ChunkCache
from uffdd.images.fetcher import ChunkFetcher, FetchOptions
from uffdd.images.format import (
    HEADER,
    MAGIC,
    ImageFormatError,
    chunk_key,
    digest,
    open_chunk,
    parse_manifest,
    seal_chunk,
)
from uffdd.images.pack import PackOptions, load_manifest, pack, verify
from uffdd.images.store import ObjectStore, StoreError
from uffdd.images.tags import BLOCK, TAG, make_tags
from uffdd.testing.guestmem import change_pages, make_guest_image
from uffdd.testing.servers import StaticServer

MIB = 1 << 20
CHUNK = 256 << 10


@pytest.fixture(scope="module")
def guest_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guestmem") / "vm.mem"
    make_guest_image(path, 16 * MIB, seed=5)
    return path


def test_guest_like_memory_has_zero_duplicate_and_stamped_pages(guest_file: Path) -> None:
    data = guest_file.read_bytes()
    pages = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    zero = sum(p == bytes(4096) for p in pages)
    stamped = sum(int.from_bytes(p[:8], "little") == i and p != bytes(4096) for i, p in enumerate(pages))
    distinct = len(set(pages))
    assert 0.25 < zero / len(pages) < 0.65
    assert 0.25 < stamped / len(pages) < 0.65
    assert distinct < len(pages) - zero  # some pages occur more than once
    compressed = len(zstandard.ZstdCompressor(level=3).compress(data))
    assert 0.1 < compressed / len(data) < 0.5, "neither random bytes nor trivially compressible"


async def test_pack_round_trips_and_stores_zero_and_repeated_chunks_not_at_all_or_once(
        guest_file: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    res = await pack(str(guest_file), str(store), PackOptions(name="vm"))
    manifest, dig = await load_manifest(res.url)
    assert dig == res.digest and manifest.size == 16 * MIB and manifest.chunk_size == CHUNK
    names = [r.name for r in manifest.table if r is not None]
    assert res.zero_chunks == manifest.table.count(None) > 0
    assert res.written == len(set(names)) == len(list((store / "chunks").glob("*/*")))
    checked = await verify(res.url, against=str(guest_file))
    assert checked.checked == checked.chunks == 64 and not checked.bad and not checked.mismatched
    again = await pack(str(guest_file), str(store), PackOptions(name="vm-copy"))
    assert again.written == 0 and again.duplicates == len(names), "the store already has every chunk"


async def test_a_diff_image_stores_only_the_chunks_that_changed(guest_file: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = await pack(str(guest_file), str(store), PackOptions(name="base"))
    changed = tmp_path / "changed.mem"
    change_pages(guest_file, changed, 0.05, seed=3)
    child = await pack(str(changed), str(store), PackOptions(name="child", parent="base"))
    assert 0 < child.written_bytes <= 0.2 * base.written_bytes
    assert child.from_parent > 0
    manifest, _ = await load_manifest(child.url)
    assert manifest.parent == "base.json" and manifest.parent_digest == base.digest
    checked = await verify(child.url, against=str(changed))
    assert not checked.bad and not checked.mismatched


def _manifest(**change: Any) -> bytes:
    doc: dict[str, Any] = {"format": "uffdd-image", "version": 1, "hash": "blake3", "size": 2 * CHUNK,
                           "page_size": 4096, "chunk_size": CHUNK, "parent": None, "created": "",
                           "table": [None, ["ab" * 32, 100]]}
    doc.update(change)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("change", "named"), [
    ({"version": 2}, "version"),
    ({"format": "other"}, "format"),
    ({"hash": "sha1"}, "hash"),
    ({"size": 2 * CHUNK + 1}, "size"),
    ({"size": -4096}, "size"),
    ({"page_size": 8192}, "page_size"),
    ({"chunk_size": 3 * 4096}, "chunk_size"),
    ({"chunk_size": 1 << 30}, "chunk_size"),
    ({"table": [None]}, "table"),
    ({"table": [None, ["xyz", 100]]}, "table[1]"),
    ({"table": [None, ["ab" * 32, CHUNK * 2]]}, "table[1]"),
    ({"table": [None, ["ab" * 32, True]]}, "table[1]"),
    ({"parent": {"url": "x.json", "digest": "no"}}, "parent"),
])
def test_a_hostile_manifest_is_refused_naming_the_field(change: dict[str, Any], named: str) -> None:
    parse_manifest(_manifest())  # the unchanged one is fine
    with pytest.raises(ImageFormatError, match=f"manifest: {re.escape(named)}"):
        parse_manifest(_manifest(**change))


def test_manifests_that_are_not_json_or_too_large_are_refused() -> None:
    with pytest.raises(ImageFormatError, match="not JSON"):
        parse_manifest(b"\xff{")
    with pytest.raises(ImageFormatError, match="over the limit"):
        parse_manifest(b" " * (64 * MIB + 1))


def test_a_chunk_is_used_only_if_it_decompresses_to_its_length_and_hash() -> None:
    plain = (b"guest page " * 400)[:4096] * 16
    name = digest(plain)
    for codec in ("zstd", "lz4", "none"):
        assert open_chunk(seal_chunk(plain, codec), name, len(plain)) == plain
    blob = bytearray(seal_chunk(plain, "zstd"))
    blob[-3] ^= 0xFF
    with pytest.raises(ImageFormatError):
        open_chunk(bytes(blob), name, len(plain))
    with pytest.raises(ImageFormatError, match="content hash"):
        open_chunk(seal_chunk(plain[:-1] + b"X", "zstd"), name, len(plain))
    with pytest.raises(ImageFormatError, match="bad header"):
        open_chunk(seal_chunk(plain, "zstd"), name, len(plain) // 2)


def test_a_decompression_bomb_costs_nothing() -> None:
    """A small object that claims a small chunk but holds a 1 GiB zstd frame is refused unread."""
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 30))
    assert len(bomb) < 64 << 10
    blob = HEADER.pack(MAGIC, 1, CHUNK) + bomb
    with pytest.raises(ImageFormatError, match="does not declare"):
        open_chunk(blob, "00" * 32, CHUNK)
    streamed = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(bytes(1 << 24))
    with pytest.raises(ImageFormatError):
        open_chunk(HEADER.pack(MAGIC, 1, CHUNK) + streamed, "00" * 32, CHUNK)


def _cached(tmp_path: Path, max_bytes: int = 64 * MIB) -> tuple[ChunkCache, bytes, str]:
    cache = ChunkCache(str(tmp_path / "cache"), max_bytes)
    cache.open()
    plain = os.urandom(4096) * 4
    name = digest(plain)
    cache.write(name, plain)
    return cache, plain, name


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_corrupted_or_torn_cache_file_is_removed_not_served(tmp_path: Path, damage: str) -> None:
    cache, plain, name = _cached(tmp_path)
    assert cache.read(name, len(plain)) == plain
    view = memoryview(bytearray(len(plain)))
    assert cache.load(name, view, nowait=True) and view == plain
    path = Path(cache.file(name))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert not cache.load(name, memoryview(bytearray(len(plain))), nowait=True)
    assert not path.exists() and cache.stats.corrupt == 1
    assert cache.read(name, len(plain)) is None
    assert cache.probe(name) == "mine", "ours to fetch again"
    cache.unlock(name)


def _tagged(tmp_path: Path) -> tuple[ChunkCache, bytes, str]:
    """A cache holding one chunk of 3.5 blocks (the last one short)."""
    cache = ChunkCache(str(tmp_path / "cache"), 64 * MIB)
    cache.open()
    plain = os.urandom(3 * BLOCK + BLOCK // 2)
    name = digest(plain)
    cache.write(name, plain)
    return cache, plain, name


@pytest.mark.parametrize(("within", "n"), [(BLOCK, BLOCK), (BLOCK - 4096, 8192), (3 * BLOCK, BLOCK // 2),
                                           (0, 3 * BLOCK + BLOCK // 2), (4096, 4096)])
def test_a_part_read_of_a_cached_chunk_returns_exactly_those_bytes(tmp_path: Path, within: int, n: int) -> None:
    cache, plain, name = _tagged(tmp_path)
    assert os.path.getsize(cache.file(name)) == len(plain) + 4 * TAG
    dest = memoryview(bytearray(n))
    assert cache.read_part_nowait(name, len(plain), within, dest) is True
    assert dest == plain[within : within + n]
    assert cache.read(name, len(plain)) == plain, "a whole read ignores the tags"


@pytest.mark.parametrize("damage", ["block", "tag", "forged"])
def test_a_part_read_of_a_damaged_or_forged_block_is_removed_not_served(tmp_path: Path, damage: str) -> None:
    """Block 2 damaged, its tag damaged, or both rewritten with a tag made under another key."""
    cache, plain, name = _tagged(tmp_path)
    path = Path(cache.file(name))
    data = bytearray(path.read_bytes())
    if damage == "block":
        data[2 * BLOCK + 100] ^= 1
    elif damage == "tag":
        data[len(plain) + 2 * TAG] ^= 1
    else:  # a block and its tag rewritten by someone without the cache's key
        data[2 * BLOCK + 100] ^= 1
        forged = make_tags(os.urandom(32), name, memoryview(data)[: len(plain)])
        data[len(plain) + 2 * TAG : len(plain) + 3 * TAG] = forged[2 * TAG : 3 * TAG]
    path.write_bytes(bytes(data))
    clean = memoryview(bytearray(BLOCK))
    assert cache.read_part_nowait(name, len(plain), 0, clean) is True, "block 0 is still good"
    assert cache.read_part_nowait(name, len(plain), 2 * BLOCK, memoryview(bytearray(BLOCK))) is False
    assert not path.exists() and cache.stats.corrupt == 1
    assert cache.read_part_nowait(name, len(plain), 0, clean) is None, "gone: fetched again from the store"


def test_a_cache_file_without_tags_is_read_whole_and_checked_against_its_name(tmp_path: Path) -> None:
    cache, plain, name = _tagged(tmp_path)
    Path(cache.file(name)).write_bytes(plain)  # as an older uffdd wrote it
    assert cache.read_part_nowait(name, len(plain), BLOCK, memoryview(bytearray(BLOCK))) is None
    assert cache.read(name, len(plain)) == plain


def test_every_process_of_a_cache_shares_one_private_key(tmp_path: Path) -> None:
    first, _, name = _tagged(tmp_path)
    second = ChunkCache(first.path, 64 * MIB)
    second.open()
    key = tmp_path / "cache" / "key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    dest = memoryview(bytearray(BLOCK))
    assert second.read_part_nowait(name, 3 * BLOCK + BLOCK // 2, BLOCK, dest) is True


def test_the_cache_stays_under_max_bytes_dropping_least_recently_used(tmp_path: Path) -> None:
    cache = ChunkCache(str(tmp_path / "cache"), 8 * 64 << 10)
    cache.open()
    names = []
    for i in range(12):
        plain = os.urandom(64 << 10)
        names.append((digest(plain), plain))
        cache.write(names[-1][0], plain)
        os.utime(cache.file(names[-1][0]), (1000 + i, 1000 + i))  # an explicit age order
    cache.evict()
    kept = {n for n, _ in names if os.path.exists(cache.file(n))}
    assert cache.bytes <= 8 * (64 << 10)
    assert kept == {n for n, _ in names[-len(kept):]}, "the oldest went first"


def test_only_one_process_at_a_time_may_fetch_a_chunk(tmp_path: Path) -> None:
    cache, _, _ = _cached(tmp_path)
    other = "cd" * 32
    assert cache.try_lock(other)
    code = ("import sys; from uffdd.images.cache import ChunkCache; c = ChunkCache(sys.argv[1], 1 << 30); "
            "c.open(); print(c.try_lock(sys.argv[2]), c.try_lock(sys.argv[3]))")
    out = subprocess.run([sys.executable, "-c", code, cache.path, other, "ef" * 32], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "True"]
    cache.unlock(other)


@pytest.mark.parametrize(("source", "named"), [
    ({"url": "ftp://host/x.json"}, "sources.img.url"),
    ({"url": "relative/x.json"}, "sources.img.url"),
    ({"url": "https://host/images/"}, "sources.img.url"),
    ({"url": "/srv/x.json", "cache": {"path": "cache", "max_bytes": "1GiB"}}, "sources.img.cache.path"),
    ({"url": "/srv/x.json", "cache": {"path": "/c", "max_bytes": 5}}, "sources.img.cache.max_bytes"),
    ({"url": "/srv/x.json", "cache": {"path": "/c"}}, "sources.img.cache.max_bytes"),
    ({"url": "/srv/x.json", "digest": "abc"}, "sources.img.digest"),
    ({"url": "/srv/x.json", "concurrency": 0}, "sources.img.concurrency"),
    ({"url": "/srv/x.json", "bucket": "b"}, "sources.img.bucket"),
])
def test_a_bad_image_source_config_is_refused_naming_the_key(source: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=rf"^<config>: {named}\b"):
        parse_config({"sources": {"img": {"kind": "image", **source}}})


def test_an_image_source_config_is_accepted() -> None:
    cfg = parse_config({"sources": {"img": {"kind": "image", "url": "s3://bucket/images/{vm_id}.json",
                                            "cache": {"path": "/var/cache/uffdd", "max_bytes": "20GiB"}}}})
    src: Any = cfg.sources["img"]
    assert src.cache.max_bytes == 20 << 30


def test_uffdd_pack_and_verify_from_the_command_line(guest_file: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    done = uffdd_cli("pack", str(guest_file), str(store), "--name", "vm", "--verify", "--json")
    assert done.returncode == 0, done.stderr
    packed, checked = (json.loads(line) for line in done.stdout.splitlines())
    assert checked["ok"] and checked["checked"] == packed["chunks"] == 64
    # Damage one chunk object on the "server": --verify names it and fails.
    victim = next((store / "chunks").glob("*/*"))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    done = uffdd_cli("pack", "--verify", str(store / "vm.json"))
    assert done.returncode == 1 and victim.name in done.stderr
    shutil.rmtree(store / "chunks")
    done = uffdd_cli("pack", str(guest_file), str(store), "--chunk-size", "3000")
    assert done.returncode == 2 and "--chunk-size" in done.stderr
    assert chunk_key("ab" * 32).startswith("chunks/ab/")


async def test_a_server_without_range_requests_is_read_with_plain_gets(guest_file: Path, tmp_path: Path) -> None:
    """Python's http.server answers no Range header: chunks come whole, and are still checked."""
    res = await pack(str(guest_file), str(tmp_path / "store"), PackOptions(name="vm"))
    server = StaticServer(tmp_path / "store", tmp_path).start()
    try:
        checked = await verify(f"{server.url}/vm.json", against=str(guest_file))
        assert checked.checked == res.chunks and not checked.bad and not checked.mismatched
        manifest, _ = await load_manifest(f"{server.url}/vm.json")
        ref = next(r for r in manifest.table if r is not None)
        store = ObjectStore(server.url)
        assert len(await store.get(chunk_key(ref.name), size=ref.stored, limit=ref.stored)) == ref.stored
        with pytest.raises(StoreError, match="expected 1"):
            await store.get(chunk_key(ref.name), size=1, limit=1)
    finally:
        server.stop()


async def test_a_demand_fetch_gets_the_next_store_slot_and_background_leaves_two_free() -> None:
    from uffdd.images.fetcher import _Job, _Slots
    from uffdd.images.format import ChunkRef

    def job(i: int, urgent: bool) -> _Job:
        return _Job(ChunkRef(f"{i:064x}", 100), 4096, urgent=urgent)

    slots = _Slots(4, 2)
    bg = [job(i, False) for i in range(3)]
    await slots.acquire(bg[0])
    await slots.acquire(bg[1])
    bg_waits = asyncio.create_task(slots.acquire(bg[2]))
    await asyncio.sleep(0)
    assert not bg_waits.done() and slots.free == 2, "background leaves two slots to demand"
    urgent = [job(10 + i, True) for i in range(3)]
    await slots.acquire(urgent[0])
    await slots.acquire(urgent[1])  # the reserved slots: at once, although background waits
    late = asyncio.create_task(slots.acquire(urgent[2]))
    await asyncio.sleep(0)
    assert not late.done() and slots.free == 0
    slots.release(bg[0])  # a slot frees: the demand fetch queued last gets it
    await asyncio.sleep(0)
    assert late.done() and not bg_waits.done()
    slots.release(urgent[0])
    await asyncio.wait_for(bg_waits, 1)


async def test_a_dead_store_is_reported_unreachable_past_its_deadline_while_the_cache_still_answers(
        guest_file: Path, tmp_path: Path) -> None:
    """Chunks read from the cache say nothing about the store: they must not restart the clock
    of an outage, or a dead store behind a busy cache is never reported."""
    await pack(str(guest_file), str(tmp_path / "store"), PackOptions(name="vm"))
    server = StaticServer(tmp_path / "store", tmp_path).start()
    try:
        manifest, _ = await load_manifest(f"{server.url}/vm.json")
        (ia, a), (ib, b) = [(i, r) for i, r in enumerate(manifest.table) if r is not None][:2]
        cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
        cache.open()
        fetcher = ChunkFetcher(ObjectStore(server.url), cache,
                               FetchOptions(deadline=0.3, retry_min=0.01, retry_max=0.02))
        await fetcher.get(a, manifest.chunk_len(ia), urgent=True, keep=False)
        await fetcher.drain()  # chunk a is in the cache (not in memory)
    finally:
        server.stop()
    hits = 0

    async def read_a_from_the_cache() -> None:
        nonlocal hits
        while True:
            await fetcher.get(a, manifest.chunk_len(ia), urgent=True, keep=False)
            hits += 1
            await asyncio.sleep(0.005)

    reader = asyncio.create_task(read_a_from_the_cache())
    try:
        with pytest.raises(SourceUnavailable):
            await asyncio.wait_for(fetcher.get(b, manifest.chunk_len(ib), urgent=True), 10)
    finally:
        reader.cancel()
    assert hits > 10 and fetcher.stats.cache_hits == hits and fetcher.unreachable is not None
