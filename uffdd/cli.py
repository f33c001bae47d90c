"""Command line: ``uffdd run | validate | check | demo``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from uffdd import __version__
from uffdd.errors import ConfigError


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in units else t
    try:
        return int(float(digits) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 2G, 4096)") from None


def _cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from uffdd import logs
    from uffdd.config import load_config
    from uffdd.service.daemon import serve

    config = load_config(args.config)
    logs.configure(config.log.format, config.log.level)
    return uvloop.run(serve(config))


def _cmd_validate(args: argparse.Namespace) -> int:
    from uffdd.config import load_config

    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.sources)} source(s): {', '.join(sorted(config.sources)) or 'none'}; "
          f"listen {config.listen})")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from uffdd.check import run_checks, usable

    checks = run_checks()
    ok = usable(checks)
    if args.json:
        print(json.dumps({"usable": ok, "checks": [c.__dict__ for c in checks]}, indent=2))
        return 0 if ok else 1
    from rich.console import Console
    from rich.table import Table

    table = Table(title="uffdd check")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for c in checks:
        mark = "[green]ok[/]" if c.ok else ("[red]FAIL[/]" if c.required else "[yellow]no[/]")
        table.add_row(c.name, mark, c.detail)
    console = Console()
    console.print(table)
    console.print("[green]uffdd can serve guests on this host[/]" if ok
                  else "[red]uffdd cannot work here: see the failed checks above[/]")
    return 0 if ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from uffdd.demo import DemoOptions
    from uffdd.demo import main as demo_main

    return demo_main(DemoOptions(size=args.size, page_size=args.page_size, threads=args.threads,
                                 regions=args.regions, prepopulate=args.prepopulate, workdir=args.workdir))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uffdd", description="userfaultfd page-fault daemon")
    p.add_argument("--version", action="version", version=f"uffdd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("-c", "--config", required=True, help="YAML config file")
    r.set_defaults(func=_cmd_run)
    v = sub.add_parser("validate", help="check a config file and exit")
    v.add_argument("-c", "--config", required=True)
    v.set_defaults(func=_cmd_validate)
    c = sub.add_parser("check", help="report what this kernel and these permissions allow")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_check)
    d = sub.add_parser("demo", help="restore a stand-in guest from a generated snapshot, end to end")
    d.add_argument("--size", type=_parse_size, default=256 << 20, help="guest memory (default 256M)")
    d.add_argument("--page-size", type=_parse_size, default=4096, help="4K (shmem) or 2M (hugetlbfs)")
    d.add_argument("--threads", type=int, default=4, help="faulting vCPU threads (default 4)")
    d.add_argument("--regions", type=int, default=2, help="memory regions (default 2)")
    d.add_argument("--prepopulate", type=float, default=0.05,
                   help="fraction of pages already in page cache with stale bytes (default 0.05)")
    d.add_argument("--workdir", default=None, help="where to put the snapshot (default: a temp dir)")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"uffdd: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
