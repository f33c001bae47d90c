"""The VMM -> daemon handshake message (docs/handshake.md), parsed and checked.

Only what can be checked from the message itself lives here; checks that need the fds (memfd
size and page size, source size) are in :func:`check_against`.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from uffdd.errors import HandshakeError

VM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""vm_id ends up in file paths (``{vm_id}``): no slashes, no leading dot."""

DEFAULT_VM_ID = "default"
DEFAULT_SOURCE = "default"
PAGE_SIZES = frozenset({4096, 2 << 20, 1 << 30})


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """One guest memory region as the VMM described it."""

    start: int
    """The VMM's virtual address of the region (``base_host_virt_addr``)."""
    size: int
    offset: int
    """Offset of the region in the memory file and in the page source."""
    page_size: int

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def pages(self) -> int:
        return self.size // self.page_size


@dataclass(frozen=True, slots=True)
class Handshake:
    vm_id: str
    source: str
    regions: tuple[RegionSpec, ...]

    @property
    def page_size(self) -> int:
        return self.regions[0].page_size

    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self.regions)


def _int_field(obj: dict[str, Any], key: str, where: str) -> int:
    if key not in obj:
        raise HandshakeError(f"{where}: missing {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise HandshakeError(f"{where}.{key}: expected an integer, got {type(value).__name__}")
    if value < 0:
        raise HandshakeError(f"{where}.{key}: must not be negative (got {value})")
    return value


_REGION_KEYS = frozenset({"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"})


def _parse_region(raw: object, i: int) -> RegionSpec:
    where = f"regions[{i}]"
    if not isinstance(raw, dict):
        raise HandshakeError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = set(raw) - _REGION_KEYS
    if unknown:
        raise HandshakeError(f"{where}: unknown keys {sorted(unknown)}")
    if "page_size" in raw:
        page_size = _int_field(raw, "page_size", where)
    elif "page_size_kib" in raw:
        # Firecracker's deprecated alias: despite its name it holds bytes.
        page_size = _int_field(raw, "page_size_kib", where)
    else:
        raise HandshakeError(f"{where}: missing 'page_size'")
    if page_size not in PAGE_SIZES:
        raise HandshakeError(f"{where}.page_size: {page_size} is not one of {sorted(PAGE_SIZES)}")
    spec = RegionSpec(
        start=_int_field(raw, "base_host_virt_addr", where),
        size=_int_field(raw, "size", where),
        offset=_int_field(raw, "offset", where),
        page_size=page_size,
    )
    if spec.size == 0:
        raise HandshakeError(f"{where}.size: must be > 0")
    for key, value in (("base_host_virt_addr", spec.start), ("size", spec.size), ("offset", spec.offset)):
        if value % page_size:
            raise HandshakeError(f"{where}.{key}: {value:#x} is not aligned to page_size {page_size}")
    if spec.end >= 1 << 64:
        raise HandshakeError(f"{where}: address range overflows")
    return spec


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def parse(body: bytes | str) -> Handshake:
    """Parse and check a handshake body. Raise HandshakeError naming the bad field."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints, deep nesting
        raise HandshakeError(f"handshake is not valid JSON: {str(exc)[:200]}") from None
    vm_id, source = DEFAULT_VM_ID, DEFAULT_SOURCE
    if isinstance(doc, list):
        raw_regions: object = doc
    elif isinstance(doc, dict):
        unknown = set(doc) - {"vm_id", "source", "regions"}
        if unknown:
            raise HandshakeError(f"handshake: unknown keys {sorted(unknown)}")
        if "regions" not in doc:
            raise HandshakeError("handshake: missing 'regions'")
        raw_regions = doc["regions"]
        vm_id = doc.get("vm_id", DEFAULT_VM_ID)
        source = doc.get("source", DEFAULT_SOURCE)
        if not isinstance(vm_id, str) or not VM_ID_RE.fullmatch(vm_id):
            raise HandshakeError(
                f"vm_id: {vm_id!r} must be 1-64 characters of [A-Za-z0-9._-], not starting with . - or _")
        if not isinstance(source, str) or not source:
            raise HandshakeError(f"source: expected the name of a configured source, got {source!r}")
    else:
        raise HandshakeError(f"handshake must be a JSON list or object, got {type(doc).__name__}")
    if not isinstance(raw_regions, list) or not raw_regions:
        raise HandshakeError("regions: expected a non-empty list")
    if len(raw_regions) > 1024:
        raise HandshakeError(f"regions: {len(raw_regions)} regions, at most 1024 are accepted")
    regions = tuple(_parse_region(r, i) for i, r in enumerate(raw_regions))
    if len({r.page_size for r in regions}) != 1:
        raise HandshakeError("regions: all regions must have the same page_size (one memory file)")
    order = sorted(range(len(regions)), key=lambda i: regions[i].start)
    for a, b in itertools.pairwise(order):
        if regions[b].start < regions[a].end:
            raise HandshakeError(f"regions[{a}] and regions[{b}] overlap in address space")
    by_offset = sorted(range(len(regions)), key=lambda i: regions[i].offset)
    for a, b in itertools.pairwise(by_offset):
        if _overlap((regions[a].offset, regions[a].offset + regions[a].size),
                    (regions[b].offset, regions[b].offset + regions[b].size)):
            raise HandshakeError(f"regions[{a}] and regions[{b}] overlap in the memory file (offset)")
    return Handshake(vm_id=vm_id, source=source, regions=regions)


def check_against(hs: Handshake, *, memfd_size: int | None, memfd_page_size: int | None,
                  source_size: int | None) -> None:
    """Check the regions against the memory file (None: anonymous memory) and the page source."""
    if memfd_page_size is not None and memfd_page_size != hs.page_size:
        raise HandshakeError(
            f"regions[0].page_size: {hs.page_size} does not match the memory file's page size "
            f"{memfd_page_size} ({'hugetlbfs' if memfd_page_size > 4096 else 'shmem'})")
    for i, r in enumerate(hs.regions):
        if memfd_size is not None and r.offset + r.size > memfd_size:
            raise HandshakeError(
                f"regions[{i}]: offset {r.offset:#x} + size {r.size:#x} lies past the end of the "
                f"memory file ({memfd_size:#x} bytes)")
        if source_size is not None and r.offset + r.size > source_size:
            raise HandshakeError(
                f"regions[{i}]: offset {r.offset:#x} + size {r.size:#x} lies past the end of the "
                f"page source ({source_size:#x} bytes): snapshot too short for these regions")


MAX_DEPTH = 32
"""Deepest nesting of lists and objects a handshake body may have (a real one has 3 levels)."""

_WS = re.compile(rb"[ \t\n\r]*")
_STRING_RUN = re.compile(rb'[^"\\\x00-\x1f]*')
_SCALAR_RUN = re.compile(rb"[-+.0-9A-Za-z]*")
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null")
_WS_ = rb"[ \t\n\r]*"
_STR_ = rb'"[^"\\\x00-\x1f]*"'
_MEMBER_ = _STR_ + _WS_ + rb":" + _WS_ + rb"(?:" + _STR_ + rb"|" + _SCALAR.pattern + rb")" + _WS_
_FLAT_OBJECT = re.compile(rb"\{" + _WS_ + rb"(?:" + _MEMBER_ + rb"(?:," + _WS_ + _MEMBER_ + rb")*)?\}")
"""An object of plain strings and scalars (a region, as every VMM sends it): read in one step."""
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrtu')
_SCALAR_START = frozenset(b"-0123456789tfn")
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN = {ord("["): ord("]"), ord("{"): ord("}")}


def _skip(run: re.Pattern[bytes], data: bytes, i: int) -> int:
    """Where the run of bytes ``run`` matches from ``i`` ends."""
    m = run.match(data, i)
    return m.end() if m else i


# What the next token must be.
_TOP, _VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE, _COLON, _COMMA_OR_CLOSE = range(7)


class BodyScanner:
    """Tells, one read at a time, when a handshake body is complete: a whole JSON list or object,
    or bytes that no continuation can make valid (then :func:`parse` names the problem).

    It keeps its state (open brackets, inside a string, inside an escape) across reads and looks
    at each byte once, so a body that trickles in costs time linear in its length, not quadratic.
    """

    def __init__(self, max_depth: int = MAX_DEPTH) -> None:
        self.max_depth = max_depth
        self.stack = bytearray()
        """The closing bracket of every open list or object, innermost last."""
        self.expect = _TOP
        self.in_string = False
        self.is_key = False
        self.escape = False
        self.hex_left = 0
        """Hex digits of a \\uXXXX escape still to come."""
        self.scalar: bytearray | None = None
        """The number or literal being read (it may continue in the next read)."""
        self.complete = False

    @property
    def depth(self) -> int:
        return len(self.stack)

    def feed(self, data: bytes) -> bool:
        """Scan the next bytes of the body; True once it is complete (or hopeless).

        HandshakeError if the body nests deeper than ``max_depth``.
        """
        i, n = 0, len(data)
        while i < n and not self.complete:
            if self.in_string:
                i = self._string(data, i)
            elif self.scalar is not None:
                i = self._scalar(data, i)
            else:
                i = _skip(_WS, data, i)
                if i < n:
                    i = self._token(data, i)
        return self.complete

    def _string(self, data: bytes, i: int) -> int:
        c = data[i]
        if self.hex_left:
            self.hex_left -= 1
            self.complete = c not in _HEX
            return i + 1
        if self.escape:
            self.escape = False
            self.hex_left = 4 if c == ord("u") else 0
            self.complete = c not in _ESCAPES
            return i + 1
        i = _skip(_STRING_RUN, data, i)
        if i == len(data):
            return i
        c = data[i]
        if c == _QUOTE:
            self.in_string = False
            if self.is_key:
                self.expect = _COLON
            else:
                self._value_done()
        elif c == _BACKSLASH:
            self.escape = True
        else:
            self.complete = True  # a control character inside a string
        return i + 1

    def _scalar(self, data: bytes, i: int) -> int:
        j = _skip(_SCALAR_RUN, data, i)
        assert self.scalar is not None
        self.scalar += data[i:j]
        if j < len(data):
            if _SCALAR.fullmatch(self.scalar):
                self.scalar = None
                self._value_done()
            else:
                self.complete = True
        return j

    def _value_done(self) -> None:
        self.expect = _COMMA_OR_CLOSE
        self.complete = not self.stack

    def _token(self, data: bytes, i: int) -> int:
        """The token at ``data[i]`` (outside strings and scalars); returns where to go on."""
        c, e = data[i], self.expect
        if c == ord("{") and e in (_VALUE, _VALUE_OR_CLOSE) and len(self.stack) < self.max_depth:
            flat = _FLAT_OBJECT.match(data, i)
            if flat is not None:
                self._value_done()
                return flat.end()
        if c in _OPEN and e in (_TOP, _VALUE, _VALUE_OR_CLOSE):
            if len(self.stack) >= self.max_depth:
                raise HandshakeError(f"handshake nests lists and objects deeper than {self.max_depth} levels "
                                     f"(the limit; a real handshake has 3)")
            self.stack.append(_OPEN[c])
            self.expect = _VALUE_OR_CLOSE if c == ord("[") else _KEY_OR_CLOSE
        elif self.stack and c == self.stack[-1] and (
                e == _COMMA_OR_CLOSE or (e == _VALUE_OR_CLOSE and c == ord("]"))
                or (e == _KEY_OR_CLOSE and c == ord("}"))):
            self.stack.pop()
            self._value_done()
        elif c == _QUOTE and e in (_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE):
            self.in_string = True
            self.is_key = e in (_KEY, _KEY_OR_CLOSE)
        elif c == ord(",") and e == _COMMA_OR_CLOSE:
            self.expect = _KEY if self.stack[-1] == ord("}") else _VALUE
        elif c == ord(":") and e == _COLON:
            self.expect = _VALUE
        elif c in _SCALAR_START and e in (_VALUE, _VALUE_OR_CLOSE):
            self.scalar = bytearray()
            return i  # the scalar is read from its first byte on
        else:
            self.complete = True  # no continuation can make this valid JSON
        return i + 1


def body_complete(buf: bytes, max_depth: int = MAX_DEPTH) -> bool:
    """True if ``buf`` holds a whole JSON list or object, or an error that more bytes cannot fix
    (a body nesting deeper than ``max_depth`` is such an error)."""
    try:
        return BodyScanner(max_depth).feed(buf)
    except HandshakeError:
        return True


def encode(hs: Handshake) -> bytes:
    """The wire form of a handshake (object form), as a VMM sends it."""
    return json.dumps({
        "vm_id": hs.vm_id,
        "source": hs.source,
        "regions": [
            {"base_host_virt_addr": r.start, "size": r.size, "offset": r.offset, "page_size": r.page_size}
            for r in hs.regions
        ],
    }).encode()
