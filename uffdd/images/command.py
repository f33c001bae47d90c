"""``uffdd pack``: the command's behaviour (the parser lives in uffdd.cli)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from urllib.parse import urlsplit

import uvloop

from uffdd.images.pack import PackError, PackOptions, PackResult, VerifyResult, pack, verify
from uffdd.images.store import check_url


def _report_pack(res: PackResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res.__dict__))
        return
    mib = 1 << 20
    print(f"packed {res.size / mib:,.0f} MiB in {res.seconds:.2f}s ({res.size / mib / res.seconds:,.0f} MiB/s): "
          f"{res.chunks} chunks, {res.zero_chunks} zero, {res.from_parent} from the parent, "
          f"{res.duplicates} already stored, {res.written} written ({res.written_bytes / mib:,.1f} MiB)")
    print(f"the image refers to {res.stored_bytes / mib:,.1f} MiB of chunks "
          f"({res.stored_bytes / res.size:.1%} of the memory)")
    print(f"image: {res.url}")
    print(f"digest: {res.digest}")


def _report_verify(res: VerifyResult, as_json: bool) -> bool:
    ok = not res.bad and not res.mismatched
    if as_json:
        print(json.dumps(res.__dict__ | {"ok": ok}))
        return ok
    print(f"{res.url}: {res.checked} of {res.chunks} chunks good"
          + (f", {len(res.mismatched)} differ from the memory file (first: {res.mismatched[:8]})"
             if res.mismatched else ""))
    for line in res.bad[:20]:
        print(f"  bad: {line}", file=sys.stderr)
    return ok


def main(args: argparse.Namespace) -> int:
    """Pack MEMORY into DEST (then re-read it with --verify), or with --verify alone check an image."""
    if not urlsplit(args.dest).scheme:
        args.dest = os.path.abspath(args.dest)
    try:
        check_url(args.dest)
        if args.memory is None:
            if not args.verify:
                print("uffdd pack: give MEMORY_FILE DEST, or --verify IMAGE_URL", file=sys.stderr)
                return 2
            return 0 if _report_verify(uvloop.run(verify(args.dest)), args.json) else 1
        opts = PackOptions(name=args.name, parent=args.parent, chunk_size=args.chunk_size,
                           compression=args.compression, level=args.level, page_size=args.page_size)
        res = uvloop.run(pack(args.memory, args.dest, opts))
        _report_pack(res, args.json)
        if args.verify:
            return 0 if _report_verify(uvloop.run(verify(res.url, against=args.memory)), args.json) else 1
        return 0
    except (PackError, ValueError) as exc:
        print(f"uffdd pack: {exc}", file=sys.stderr)
        return 2
