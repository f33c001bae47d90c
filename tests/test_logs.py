"""Log lines as the daemon writes them: one write per line, so processes sharing a stream (the
workers, under journald) never cut into each other's lines."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path


class _Writes(io.StringIO):
    """A text stream that keeps each write() call apart."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, s: str) -> int:
        self.calls.append(s)
        return len(s)

    def isatty(self) -> bool:
        return False


def test_each_json_log_line_is_one_write_with_its_newline() -> None:
    import structlog

    from uffdd.logs import configure

    out = _Writes()
    try:
        configure(format="json", level="info", stream=out)
        structlog.get_logger("test").info("one_event", n=1)
        structlog.get_logger("test").warning("two_event", n=2)
    finally:
        structlog.reset_defaults()
    assert len(out.calls) == 2 and all(c.endswith("\n") and c.count("\n") == 1 for c in out.calls), out.calls
    assert [json.loads(c)["event"] for c in out.calls] == ["one_event", "two_event"]


def test_two_processes_logging_to_one_shared_file_never_mix_their_lines(tmp_path: Path) -> None:
    """Both inherit one file description without O_APPEND, as workers share the service's stderr."""
    code = ("import structlog, sys; from uffdd.logs import configure; configure(format='json'); "
            "log = structlog.get_logger('t'); [log.info('line', who=sys.argv[1], i=i, pad='x' * 200) "
            "for i in range(2000)]")
    path = tmp_path / "shared.log"
    with open(path, "wb") as fh:
        procs = [subprocess.Popen([sys.executable, "-c", code, who], stderr=fh) for who in ("a", "b")]
        for p in procs:
            assert p.wait(60) == 0
    lines = path.read_text().splitlines()
    docs = [json.loads(line) for line in lines]  # a line cut into by the other process would not parse
    assert sorted(d["who"] for d in docs) == ["a"] * 2000 + ["b"] * 2000
