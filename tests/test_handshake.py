"""The VMM -> daemon handshake: accepted forms, refusals that name the field, split reads."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffdd.errors import HandshakeError
from uffdd.handshake import (
    DEFAULT_SOURCE,
    DEFAULT_VM_ID,
    MAX_DEPTH,
    PAGE_SIZES,
    VM_ID_RE,
    BodyScanner,
    Handshake,
    RegionSpec,
    body_complete,
    check_against,
    encode,
    parse,
)

KIB4 = 4096
MIB2 = 2 << 20
GIB1 = 1 << 30


def region(start: int = 0x7F00_0000_0000, size: int = 16 * KIB4, offset: int = 0,
           page_size: int = KIB4, key: str = "page_size") -> dict[str, int]:
    """One region exactly as Firecracker serializes it."""
    return {"base_host_virt_addr": start, "size": size, "offset": offset, key: page_size}


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def refused(raw: bytes | str) -> str:
    """The HandshakeError message for a body that must be refused."""
    with pytest.raises(HandshakeError) as info:
        parse(raw)
    return str(info.value)


def refusal(doc: Any) -> str:
    """The HandshakeError message for a JSON document that must be refused."""
    return refused(body(doc))


# --- accepted forms -----------------------------------------------------------------------------


def test_firecracker_list_form_with_page_size_is_accepted_with_default_vm_id_and_source() -> None:
    hs = parse(body([region(start=0x10000, size=0x4000, offset=0x2000),
                     region(start=0x40000, size=0x1000, offset=0x6000)]))
    assert hs == Handshake(
        vm_id=DEFAULT_VM_ID, source=DEFAULT_SOURCE,
        regions=(RegionSpec(start=0x10000, size=0x4000, offset=0x2000, page_size=KIB4),
                 RegionSpec(start=0x40000, size=0x1000, offset=0x6000, page_size=KIB4)))
    assert hs.page_size == KIB4
    assert hs.total_bytes == 0x5000


@pytest.mark.parametrize("page_size", [KIB4, MIB2])
def test_deprecated_page_size_kib_alias_is_read_as_bytes(page_size: int) -> None:
    hs = parse(body([region(start=page_size * 8, size=page_size * 2, offset=0, page_size=page_size,
                            key="page_size_kib")]))
    assert hs.page_size == page_size
    assert hs.regions[0].pages == 2


def test_page_size_kib_holding_kibibytes_is_refused_because_the_alias_holds_bytes() -> None:
    msg = refusal([region(page_size=4, key="page_size_kib")])
    assert "page_size" in msg
    assert "4 is not one of" in msg


def test_region_carrying_both_page_size_and_its_alias_is_accepted() -> None:
    raw = region(page_size=MIB2, start=MIB2, size=MIB2)
    raw["page_size_kib"] = MIB2
    assert parse(body([raw])).page_size == MIB2


def test_object_form_carries_vm_id_and_source() -> None:
    hs = parse(body({"vm_id": "vm-42.a_b", "source": "migrate", "regions": [region()]}))
    assert hs.vm_id == "vm-42.a_b"
    assert hs.source == "migrate"
    assert hs.regions == (RegionSpec(start=0x7F00_0000_0000, size=16 * KIB4, offset=0, page_size=KIB4),)


def test_object_form_without_vm_id_and_source_gets_the_defaults() -> None:
    hs = parse(body({"regions": [region()]}))
    assert (hs.vm_id, hs.source) == ("default", "default")


def test_body_may_be_given_as_text() -> None:
    assert parse(json.dumps([region()])) == parse(body([region()]))


def test_gigantic_pages_are_accepted() -> None:
    hs = parse(body([region(start=GIB1, size=2 * GIB1, offset=GIB1, page_size=GIB1)]))
    assert hs.regions[0].pages == 2


def test_regions_touching_end_to_start_do_not_overlap() -> None:
    hs = parse(body([region(start=0x20000, size=0x1000, offset=0x1000),
                     region(start=0x10000, size=0x10000, offset=0x2000),
                     region(start=0x21000, size=0x1000, offset=0)]))
    assert len(hs.regions) == 3


# --- refusals: each names the field ---------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"{", b"[1,]", b"not json", b"\xff\xfe\xfa", b"", "[{]"])
def test_invalid_json_is_refused(raw: bytes | str) -> None:
    assert "not valid JSON" in refused(raw)


@pytest.mark.parametrize(("doc", "kind"), [(42, "int"), ("regions", "str"), (None, "NoneType"),
                                           (True, "bool"), (1.5, "float")])
def test_top_level_that_is_neither_list_nor_object_is_refused(doc: object, kind: str) -> None:
    msg = refusal(doc)
    assert "list or object" in msg
    assert kind in msg


@pytest.mark.parametrize("doc", [[], {"regions": []}, {"regions": {}}, {"regions": "x"}])
def test_empty_or_non_list_regions_are_refused(doc: object) -> None:
    assert "regions" in refusal(doc)


def test_object_without_regions_is_refused() -> None:
    assert "'regions'" in refusal({"vm_id": "a"})


@pytest.mark.parametrize("key", ["base_host_virt_addr", "size", "offset", "page_size"])
def test_region_missing_a_key_is_refused_naming_it(key: str) -> None:
    raw = region()
    del raw[key]
    msg = refusal([raw])
    assert "regions[0]" in msg
    assert repr(key) in msg


def test_region_that_is_not_an_object_is_refused() -> None:
    msg = refusal([region(), [1, 2]])
    assert "regions[1]" in msg


def test_unknown_key_in_a_region_is_refused_naming_it() -> None:
    raw: dict[str, object] = {**region(), "huge_pages": True}
    msg = refusal([raw])
    assert "regions[0]" in msg
    assert "huge_pages" in msg


def test_unknown_top_level_key_is_refused_naming_it() -> None:
    msg = refusal({"regions": [region()], "vmid": "typo"})
    assert "vmid" in msg


@pytest.mark.parametrize("key", ["base_host_virt_addr", "size", "offset", "page_size"])
@pytest.mark.parametrize("value", [True, False, "4096", 4096.0, None, [4096]])
def test_non_integer_field_is_refused_naming_it(key: str, value: object) -> None:
    raw: dict[str, object] = {**region(), key: value}
    msg = refusal([raw])
    assert f"regions[0].{key}" in msg
    assert "integer" in msg


@pytest.mark.parametrize("key", ["base_host_virt_addr", "size", "offset", "page_size"])
def test_negative_field_is_refused_naming_it(key: str) -> None:
    msg = refusal([{**region(), key: -KIB4}])
    assert f"regions[0].{key}" in msg
    assert "negative" in msg


def test_zero_size_is_refused() -> None:
    assert "regions[0].size" in refusal([region(size=0)])


@pytest.mark.parametrize("key", ["base_host_virt_addr", "size", "offset"])
@pytest.mark.parametrize(("page_size", "bad"), [(KIB4, KIB4 + 512), (MIB2, MIB2 + KIB4), (GIB1, GIB1 + MIB2)])
def test_field_misaligned_to_page_size_is_refused_naming_it(key: str, page_size: int, bad: int) -> None:
    raw = {**region(start=page_size, size=page_size, offset=page_size, page_size=page_size), key: bad}
    msg = refusal([raw])
    assert f"regions[0].{key}" in msg
    assert "aligned" in msg


@pytest.mark.parametrize("page_size", [0, 1, 512, 8192, 16384, 65536, 1 << 20, 4 << 20, 2 << 30])
def test_page_size_outside_the_supported_set_is_refused(page_size: int) -> None:
    msg = refusal([region(start=0, size=8 << 30, offset=0, page_size=page_size)])
    assert "regions[0].page_size" in msg
    assert str(page_size) in msg


def test_supported_page_sizes_are_exactly_4k_2m_and_1g() -> None:
    assert frozenset({KIB4, MIB2, GIB1}) == PAGE_SIZES


def test_regions_with_mixed_page_sizes_are_refused() -> None:
    msg = refusal([region(start=0, size=MIB2, offset=0, page_size=KIB4),
                   region(start=MIB2, size=MIB2, offset=MIB2, page_size=MIB2)])
    assert "page_size" in msg
    assert "regions" in msg


def test_region_ending_past_the_64_bit_address_space_is_refused() -> None:
    msg = refusal([region(start=(1 << 64) - KIB4, size=KIB4)])
    assert "regions[0]" in msg
    assert "overflow" in msg


@pytest.mark.parametrize(("second_start", "second_size"), [
    (0x10000, 0x1000),  # same start
    (0x13000, 0x2000),  # starts inside the first
    (0x0F000, 0x2000),  # ends inside the first
    (0x08000, 0x20000),  # contains the first
])
def test_regions_overlapping_in_address_space_are_refused(second_start: int, second_size: int) -> None:
    msg = refusal([region(start=0x10000, size=0x4000, offset=0),
                   region(start=second_start, size=second_size, offset=0x100000)])
    assert "regions[0] and regions[1]" in msg or "regions[1] and regions[0]" in msg
    assert "address space" in msg


@pytest.mark.parametrize(("second_offset", "second_size"), [(0, 0x1000), (0x3000, 0x2000), (0x0, 0x10000)])
def test_regions_overlapping_in_file_offset_are_refused(second_offset: int, second_size: int) -> None:
    msg = refusal([region(start=0x10000, size=0x4000, offset=0),
                   region(start=0x100000, size=second_size, offset=second_offset)])
    assert "regions[0] and regions[1]" in msg or "regions[1] and regions[0]" in msg
    assert "offset" in msg


def test_too_many_regions_are_refused() -> None:
    regions = [region(start=i * KIB4, size=KIB4, offset=i * KIB4) for i in range(1025)]
    assert "1024" in refusal(regions)


@pytest.mark.parametrize("vm_id", ["../x", "..", "a/b", "/etc", ".hidden", "-x", "_x", "", "x" * 65,
                                   "a b", "a\nb", "abc\n", "vm\x00", "é", 7, None, ["a"]])
def test_vm_id_that_is_unsafe_in_a_path_is_refused(vm_id: object) -> None:
    msg = refusal({"vm_id": vm_id, "regions": [region()]})
    assert msg.startswith("vm_id")


@pytest.mark.parametrize("vm_id", ["a", "A0", "x" * 64, "vm-1.snap_2", "0"])
def test_vm_id_of_safe_characters_up_to_64_long_is_accepted(vm_id: str) -> None:
    assert parse(body({"vm_id": vm_id, "regions": [region()]})).vm_id == vm_id


@pytest.mark.parametrize("source", ["", 3, None, {"kind": "file"}])
def test_source_that_is_not_a_name_is_refused(source: object) -> None:
    assert refusal({"source": source, "regions": [region()]}).startswith("source")


def test_deeply_nested_body_is_refused_with_handshake_error() -> None:
    # 200 KB, well under the default 1 MiB handshake limit: a VMM can send this.
    deep = b"[" * 100_000 + b"]" * 100_000
    assert body_complete(deep) is True
    msg = refused(deep)
    assert "regions" in msg or "JSON" in msg


def test_integer_with_too_many_digits_is_refused_with_handshake_error() -> None:
    raw = b'[{"base_host_virt_addr": ' + b"9" * 5000 + b', "size": 4096, "offset": 0, "page_size": 4096}]'
    assert body_complete(raw) is True
    msg = refused(raw)
    assert "regions[0].base_host_virt_addr" in msg or "JSON" in msg


# --- check_against: the fds against the message ---------------------------------------------------


def two_regions() -> Handshake:
    return parse(body([region(start=0x100000, size=0x4000, offset=0),
                       region(start=0x200000, size=0x2000, offset=0x8000)]))


def test_check_against_accepts_a_memory_file_and_source_that_exactly_fit_and_not_a_byte_less() -> None:
    hs = two_regions()
    check_against(hs, memfd_size=0xA000, memfd_page_size=KIB4, source_size=0xA000)
    check_against(hs, memfd_size=0xA000, memfd_page_size=KIB4, source_size=None)
    with pytest.raises(HandshakeError, match="memory file"):
        check_against(hs, memfd_size=0xA000 - 1, memfd_page_size=KIB4, source_size=None)
    with pytest.raises(HandshakeError, match="page source"):
        check_against(hs, memfd_size=0xA000, memfd_page_size=KIB4, source_size=0xA000 - 1)


def test_check_against_refuses_a_memory_file_too_small_naming_the_region() -> None:
    with pytest.raises(HandshakeError) as info:
        check_against(two_regions(), memfd_size=0xA000 - KIB4, memfd_page_size=KIB4, source_size=None)
    assert "regions[1]" in str(info.value)
    assert "memory file" in str(info.value)


def test_check_against_refuses_a_page_source_too_short_naming_the_region() -> None:
    with pytest.raises(HandshakeError) as info:
        check_against(two_regions(), memfd_size=1 << 20, memfd_page_size=KIB4, source_size=0x4000 - 1)
    assert "regions[0]" in str(info.value)
    assert "page source" in str(info.value)


@pytest.mark.parametrize(("declared", "actual"), [(KIB4, MIB2), (MIB2, KIB4)])
def test_check_against_refuses_a_page_size_other_than_the_memory_files(declared: int, actual: int) -> None:
    hs = parse(body([region(start=MIB2, size=MIB2, offset=0, page_size=declared)]))
    with pytest.raises(HandshakeError) as info:
        check_against(hs, memfd_size=1 << 30, memfd_page_size=actual, source_size=None)
    assert "page_size" in str(info.value)
    assert str(actual) in str(info.value)


# --- body_complete: the split-read logic ----------------------------------------------------------


@pytest.mark.parametrize(("raw", "complete"), [
    (b"", False),
    (b"  \n", False),
    (b"[", False),
    (b'[{"size": 40', False),
    (b'[{"size": 4096}', False),
    (b'{"vm_id": "ab', False),
    (b'{"vm_id": "a\\', False),
    (b"[tr", False),
    (b"[-", False),
    (b"[1, 2]", True),
    (b"[1, 2]\n", True),
    (b"{}", True),
    (b"[1,,", True),  # an error more bytes cannot cure
    (b"}", True),
    (b"[1] [2]", True),
])
def test_body_complete_tells_a_truncated_body_from_a_finished_or_hopeless_one(raw: bytes, complete: bool) -> None:
    assert body_complete(raw) is complete


# --- BodyScanner: the same answers, one read at a time -----------------------------------------

SCANNED_BODIES = [
    b'[{"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size": 4096}]',
    b'{"vm_id": "vm-1", "source": "s", "regions": [{"size": 1, "offset": -0.5e+3, "x": [true, false, null]}]}',
    b'{"vm_id": "a]}[{,:", "source": "\\"]\\\\", "regions": []}',
    b'{"vm_id": "\\u00e9\\u005D\\/\\n", "regions": [[], {}, [[{}]]]}',
    b' \n\t[ 1 , 2 ]',
]


def scanned_whole_at(raw: bytes, pieces: list[bytes]) -> int:
    """How many pieces the scanner took to find ``raw`` complete (-1: never)."""
    scanner = BodyScanner()
    for k, piece in enumerate(pieces):
        if scanner.feed(piece):
            return k
    return -1


@pytest.mark.parametrize("raw", SCANNED_BODIES)
def test_scanner_split_at_every_byte_finds_the_body_complete_only_with_its_last_byte(raw: bytes) -> None:
    json.loads(raw)
    for i in range(len(raw) + 1):
        assert scanned_whole_at(raw, [raw[:i], raw[i:]]) == (1 if i < len(raw) else 0), f"split at {i}"
    assert scanned_whole_at(raw, [raw[i : i + 1] for i in range(len(raw))]) == len(raw) - 1


@pytest.mark.parametrize("raw", SCANNED_BODIES)
def test_scanner_agrees_with_body_complete_on_every_prefix(raw: bytes) -> None:
    for i in range(len(raw) + 1):
        one_read = body_complete(raw[:i])
        byte_by_byte = BodyScanner()
        assert any([byte_by_byte.feed(raw[j : j + 1]) for j in range(i)]) is one_read is (i == len(raw))


@pytest.mark.parametrize(("raw", "ends_at"), [
    (b'["]"]', 4),           # a bracket inside a string closes nothing
    (b'["\\"]"]', 6),       # nor does an escaped quote end the string
    (b'["\\\\"]', 5),      # an escaped backslash does not escape the quote after it
    (b'{"[": "{"}', 9),
    (b'[1,,2]', 3),          # hopeless at the second comma: parse() names it
    (b'[1}', 2),
    (b'["a\nb"]', 3),       # a raw control character inside a string
    (b'["\\x"]', 3),        # an escape JSON does not have
    (b'["\\u12g4"]', 6),
    (b'[tru]', 4),
    (b'x', 0),
    (b'"top"', 0),           # a handshake is a list or an object
    (b'[1] [2]', 2),
])
def test_scanner_ends_where_the_body_closes_or_turns_hopeless(raw: bytes, ends_at: int) -> None:
    pieces = [raw[i : i + 1] for i in range(len(raw))]
    assert scanned_whole_at(raw, pieces) == ends_at


def test_scanner_refuses_nesting_deeper_than_the_limit_naming_it() -> None:
    assert BodyScanner().feed(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    assert BodyScanner().feed(b'{"a": ' * (MAX_DEPTH - 1) + b"[]" + b"}" * (MAX_DEPTH - 1))
    scanner = BodyScanner()
    assert not scanner.feed(b"[" * MAX_DEPTH)
    with pytest.raises(HandshakeError, match=f"deeper than {MAX_DEPTH} levels"):
        scanner.feed(b"{")
    with pytest.raises(HandshakeError, match="deeper than 3 levels"):
        BodyScanner(max_depth=3).feed(b'{"regions": [[[1]]]}')


def test_scanner_looks_at_each_byte_once_so_a_trickled_megabyte_is_not_quadratic() -> None:
    """Fed 4 bytes at a time, a 1 MiB prefix costs about what it costs in one read."""
    import time

    item = b'{"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size": 4096}, '
    raw = b'{"vm_id": "x", "regions": [' + item * ((1 << 20) // len(item))
    t0 = time.perf_counter()
    assert not BodyScanner().feed(raw)
    whole = time.perf_counter() - t0
    scanner = BodyScanner()
    t0 = time.perf_counter()
    for i in range(0, len(raw), 4):
        assert not scanner.feed(raw[i : i + 4])
    trickled = time.perf_counter() - t0
    assert scanner.depth == 2
    assert trickled < 3 * whole + 2.0, (trickled, whole)


# --- properties -----------------------------------------------------------------------------------

vm_ids = st.from_regex(VM_ID_RE, fullmatch=True)
printable_names = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20)


@st.composite
def handshakes(draw: st.DrawFn, names: st.SearchStrategy[str] = printable_names) -> Handshake:
    """A valid handshake: regions disjoint in address space and in file offset, in any order."""
    page_size = draw(st.sampled_from(sorted(PAGE_SIZES)))
    n = draw(st.integers(1, 8))
    pages = draw(st.lists(st.integers(1, 32), min_size=n, max_size=n))
    gaps = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    file_gaps = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    file_order = draw(st.permutations(range(n)))
    addr = draw(st.integers(0, 1 << 20)) * page_size
    starts = []
    for p, g in zip(pages, gaps, strict=True):
        addr += g * page_size
        starts.append(addr)
        addr += p * page_size
    offsets = [0] * n
    off = 0
    for i, g in zip(file_order, file_gaps, strict=True):
        off += g * page_size
        offsets[i] = off
        off += pages[i] * page_size
    regions = tuple(RegionSpec(start=s, size=p * page_size, offset=o, page_size=page_size)
                    for s, p, o in zip(starts, pages, offsets, strict=True))
    if draw(st.booleans()):
        regions = tuple(reversed(regions))
    return Handshake(vm_id=draw(vm_ids), source=draw(names), regions=regions)


def firecracker_body(hs: Handshake) -> bytes:
    return body([{"base_host_virt_addr": r.start, "size": r.size, "offset": r.offset, "page_size": r.page_size}
                 for r in hs.regions])


def assert_complete_only_when_whole(raw: bytes) -> None:
    for i in range(len(raw)):
        assert not body_complete(raw[:i]), f"prefix {raw[:i]!r} taken for a complete body"
        if i % 5 == 0:  # (every position: test_scanner_split_at_every_byte_...)
            assert scanned_whole_at(raw, [raw[:i], raw[i:]]) == 1, f"split at {i}"
    assert body_complete(raw)


@given(handshakes())
def test_encoded_handshake_round_trips_and_no_proper_prefix_looks_complete(hs: Handshake) -> None:
    raw = encode(hs)
    assert parse(raw) == hs
    assert_complete_only_when_whole(raw)


@given(handshakes())
def test_firecracker_list_body_parses_to_its_regions_and_no_proper_prefix_looks_complete(hs: Handshake) -> None:
    raw = firecracker_body(hs)
    assert parse(raw) == Handshake(vm_id=DEFAULT_VM_ID, source=DEFAULT_SOURCE, regions=hs.regions)
    assert_complete_only_when_whole(raw)


@given(handshakes(names=st.text(alphabet=st.characters(min_codepoint=0x80), min_size=1, max_size=8)))
def test_no_proper_prefix_looks_complete_when_a_name_is_sent_as_unicode_escapes(hs: Handshake) -> None:
    # json.dumps sends non-ASCII as \\uXXXX: a read may end inside such an escape.
    raw = encode(hs)
    assert parse(raw) == hs
    assert_complete_only_when_whole(raw)


def _expect_handshake_or_refusal(raw: bytes | str) -> None:
    try:
        hs = parse(raw)
    except HandshakeError as exc:
        assert str(exc)
    else:
        assert hs.regions
        assert len({r.page_size for r in hs.regions}) == 1


@given(st.binary(max_size=512))
def test_parse_of_arbitrary_bytes_raises_nothing_but_handshake_error(raw: bytes) -> None:
    _expect_handshake_or_refusal(raw)


json_values: st.SearchStrategy[object] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


@given(json_values)
def test_parse_of_arbitrary_json_values_raises_nothing_but_handshake_error(doc: object) -> None:
    _expect_handshake_or_refusal(json.dumps(doc).encode())


interesting_ints = st.sampled_from([0, 1, KIB4, MIB2, GIB1, (1 << 64) - KIB4, 1 << 64, -KIB4]) | st.integers()
region_like = st.dictionaries(
    st.sampled_from(["base_host_virt_addr", "size", "offset", "page_size", "page_size_kib", "extra"]),
    interesting_ints | json_values, max_size=6)
handshake_like = (
    st.lists(region_like | json_values, max_size=4)
    | st.fixed_dictionaries({}, optional={"vm_id": vm_ids | json_values, "source": st.text() | json_values,
                                          "regions": st.lists(region_like, max_size=4) | json_values}))


@settings(max_examples=300)
@given(handshake_like)
def test_parse_of_handshake_shaped_json_raises_nothing_but_handshake_error(doc: object) -> None:
    _expect_handshake_or_refusal(json.dumps(doc).encode())
