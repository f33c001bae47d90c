"""Command line: ``uffdd run | serve | status | validate | check | demo | pack``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from uffdd import __version__
from uffdd.errors import ConfigError, StartupError


def parse_size(text: str) -> int:
    """"256M", "2G", "4KiB", "4096" -> bytes; an argparse type (the benchmarks use it too)."""
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
    from uffdd.service.supervisor import become_worker, run_worker, supervise, worker_index

    config = load_config(args.config)
    logs.configure(config.log.format, config.log.level)
    index = worker_index()
    if index is None and config.worker_count > 1:
        return int(uvloop.run(supervise(config, config_path=args.config, count=config.worker_count)))
    if index is None:
        return int(uvloop.run(serve(config, config_path=args.config)))
    become_worker(index, pin=config.pin_workers)
    return int(uvloop.run(run_worker(config, config_path=args.config, index=index)))


def _cmd_status(args: argparse.Namespace) -> int:
    """Print the live sessions from the control socket; exit 1 if the daemon does not answer."""
    from uffdd.service.control import query

    path = args.socket
    if path is None:
        from uffdd.config import load_config

        path = load_config(args.config).control_path if args.config else "/run/uffdd/uffdd.ctl"
    try:
        doc = query(path, "status", timeout=args.timeout)
    except (OSError, ValueError) as exc:
        print(f"uffdd status: no answer from {path}: {exc}", file=sys.stderr)
        return 1
    for w in doc.get("workers", []):  # workers: N > 1: each worker answers for its own sessions
        try:
            sub = query(w["control"], "status", timeout=args.timeout)
        except (OSError, ValueError) as exc:
            print(f"uffdd status: worker {w['index']}: no answer from {w['control']}: {exc}", file=sys.stderr)
            continue
        doc["sessions"].extend({**row, "worker": w["index"], "session": f"w{w['index']}.{row['session']}"}
                               for row in sub["sessions"])
        doc["unresumed"] = doc.get("unresumed", []) + [f"w{w['index']}.{sid}" for sid in sub.get("unresumed", [])]
        w["accept_error"] = sub.get("accept_error") if sub.get("healthy") is False else None
    unhealthy = [doc.get("accept_error")] if doc.get("healthy") is False else []
    unhealthy += [f"worker {w['index']}: {w['accept_error']}" for w in doc.get("workers", []) if w.get("accept_error")]
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if args.quiet:
        return 1 if unhealthy else 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"uffdd {doc.get('version')} pid {doc.get('pid')} on {doc.get('listen')}: {doc.get('status')}")
    table = Table(title=f"{len(doc['sessions'])} live session(s)")
    for col in ("session", "vm_id", "source", "filled", "remaining", "faults", "p99 us", "blocked ms", "age s",
                "state"):
        table.add_column(col, justify="left" if col in ("session", "vm_id", "source", "state") else "right")
    for s in doc["sessions"]:
        state = "complete" if s["completed"] else "resumed" if s["resumed"] else "serving"
        table.add_row(s["session"], s["vm_id"], f"{s['source']} ({s['kind']})",
                      f"{s['pages_filled']}/{s['pages_total']}", str(s["pages_remaining"]), str(s["faults"]),
                      f"{s['p99_us_le']:g}", f"{s['blocked_ms']:g}", f"{s['seconds']:.1f}", state)
    console.print(table)
    if doc.get("unresumed"):
        console.print(f"[red]not resumed (waiting in the fd store): {', '.join(doc['unresumed'])}[/]")
    for why in unhealthy:
        console.print(f"[red]unhealthy: no VMM can connect, accept() fails: {why}[/]")
    return 1 if unhealthy else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from uffdd import logs
    from uffdd.peer.config import load_serve_config, parse_image_arg
    from uffdd.peer.serve import run_serve

    images: dict[str, str] = {}
    for value in args.image or []:
        try:
            name, path = parse_image_arg(value)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        images[name] = path
    tls = {k: v for k, v in (("cert", args.tls_cert), ("key", args.tls_key), ("client_ca", args.tls_client_ca))
           if v is not None}
    config = load_serve_config(args.config, {
        "listen": args.listen, "images": images or None, "vmm_socket": args.vmm_socket,
        "secret_file": args.secret_file, "tls": tls or None,
        "log": {"format": args.log_format, "level": args.log_level} if args.log_format or args.log_level else None,
        "metrics": {"listen": args.metrics} if args.metrics else None})
    logs.configure(config.log.format, config.log.level)
    return int(uvloop.run(run_serve(config)))


def _cmd_secret(args: argparse.Namespace) -> int:
    """Print (or write, readable by the owner only) a strong shared secret for a peer link."""
    from uffdd.peer.config import make_secret

    secret = make_secret()
    if args.output is None:
        print(secret)
        return 0
    try:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        print(f"uffdd secret: cannot create {args.output}: {exc.strerror} (it must not exist yet)", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return 0


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
                                 regions=args.regions, prepopulate=args.prepopulate, workdir=args.workdir,
                                 peer=args.peer or args.cut_link, cut_link=args.cut_link,
                                 cut_seconds=args.cut_seconds, peer_deadline=args.peer_deadline, image=args.image))


def _cmd_pack(args: argparse.Namespace) -> int:
    from uffdd.images.command import main as pack_main

    return pack_main(args)


def _add_pack_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k = sub.add_parser("pack", help="pack a memory file into an image (compressed, content-addressed chunks and "
                       "a manifest) in a directory or object store; --verify checks one")
    k.add_argument("memory", nargs="?", metavar="MEMORY_FILE", help="raw guest memory (a snapshot file)")
    k.add_argument("dest", metavar="DEST", help="directory or store URL (s3://, gs://, az://, file://) that gets "
                   "NAME.json and chunks/; with --verify alone: the image's manifest URL")
    k.add_argument("--name", help="image name (default: the memory file's name without its suffix)")
    k.add_argument("--parent", metavar="IMAGE", help="store only the chunks that differ from this image (its "
                   "name in DEST, or its manifest URL)")
    k.add_argument("--chunk-size", type=parse_size, default=256 << 10, help="bytes per chunk (default 256K)")
    k.add_argument("--compression", choices=["zstd", "lz4", "none"], default="zstd")
    k.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    k.add_argument("--page-size", type=parse_size, default=4096, help="the guest's page size: 4K or 2M")
    k.add_argument("--verify", action="store_true", help="re-read every chunk and check it (after packing: "
                   "and compare with MEMORY_FILE)")
    k.add_argument("--json", action="store_true", help="print the results as JSON")
    k.set_defaults(func=_cmd_pack)


def _add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="serve a memory image to destination daemons (the source side of a migration)")
    s.add_argument("-c", "--config", help="YAML file with the serve options (flags override it)")
    s.add_argument("--image", action="append", metavar="[NAME=]PATH",
                   help="serve this file (snapshot or /dev/shm/...) under NAME (default: 'default'); repeatable")
    s.add_argument("--listen", metavar="HOST:PORT", help="TCP address (default 127.0.0.1:7447; without a "
                   "secret only loopback is ever bound)")
    s.add_argument("--vmm-socket", metavar="PATH", help="Unix socket where a source VMM hands over a live "
                   "guest's memfd")
    s.add_argument("--secret-file", metavar="PATH", help="shared secret clients must prove they know")
    s.add_argument("--tls-cert", metavar="PEM")
    s.add_argument("--tls-key", metavar="PEM")
    s.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA")
    s.add_argument("--metrics", metavar="HOST:PORT", help="Prometheus endpoint")
    s.add_argument("--log-format", choices=["auto", "console", "json"])
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_cmd_serve)


def _add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("demo", help="restore a stand-in guest from a generated snapshot, end to end")
    d.add_argument("--size", type=parse_size, default=256 << 20, help="guest memory (default 256M)")
    d.add_argument("--page-size", type=parse_size, default=4096, help="4K (shmem) or 2M (hugetlbfs)")
    d.add_argument("--threads", type=int, default=4, help="faulting vCPU threads (default 4)")
    d.add_argument("--regions", type=int, default=2, help="memory regions (default 2)")
    d.add_argument("--prepopulate", type=float, default=0.05,
                   help="fraction of pages already in page cache with stale bytes (default 0.05)")
    d.add_argument("--workdir", default=None, help="where to put the snapshot (default: a temp dir)")
    d.add_argument("--peer", action="store_true", help="serve the snapshot with `uffdd serve` on loopback and "
                   "fetch pages over the network (kind: peer)")
    d.add_argument("--image", action="store_true", help="pack guest-like memory with `uffdd pack`, serve it over "
                   "HTTP on loopback and restore from it (kind: image)")
    d.add_argument("--cut-link", action="store_true", help="with --peer: cut the link a third of the way in "
                   "and show the recovery")
    d.add_argument("--cut-seconds", type=float, default=1.5, help="how long the link stays cut (default 1.5)")
    d.add_argument("--peer-deadline", type=float, default=30.0,
                   help="seconds the source may stay unreachable before the demo fails (default 30)")
    d.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uffdd", description="userfaultfd page-fault daemon")
    p.add_argument("--version", action="version", version=f"uffdd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("-c", "--config", required=True, help="YAML config file")
    r.set_defaults(func=_cmd_run)
    _add_serve_parser(sub)
    st = sub.add_parser("status", help="show the running daemon's live sessions (from its control socket)")
    st_where = st.add_mutually_exclusive_group()
    st_where.add_argument("-c", "--config", help="find the control socket through this config file")
    st_where.add_argument("--socket", help="control socket path (default /run/uffdd/uffdd.ctl)")
    st.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    st.add_argument("-q", "--quiet", action="store_true", help="print nothing: exit 0 if the daemon is healthy")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    st.set_defaults(func=_cmd_status)
    sec = sub.add_parser("secret", help="make a strong shared secret for `uffdd serve` and `kind: peer`")
    sec.add_argument("-o", "--output", metavar="FILE", help="write it to FILE (mode 0600, must not exist) "
                     "instead of printing it")
    sec.set_defaults(func=_cmd_secret)
    v = sub.add_parser("validate", help="check a config file and exit")
    v.add_argument("-c", "--config", required=True)
    v.set_defaults(func=_cmd_validate)
    c = sub.add_parser("check", help="report what this kernel and these permissions allow")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_check)
    _add_demo_parser(sub)
    _add_pack_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"uffdd: config error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"uffdd: cannot start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
