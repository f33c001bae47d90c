"""The page-source registry: built-in kinds, kinds from other packages' entry points, and the
errors that name what is wrong (a real installed distribution, made on the fly)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

from uffdd.config import parse_config
from uffdd.errors import ConfigError
from uffdd.sources import BUILTIN_SOURCES, available_kinds, source_class
from uffdd.sources.file import FileSource
from uffdd.sources.peer import PeerSource

_names = itertools.count()

PLUGIN = '''
from typing import ClassVar, Literal
from uffdd.sources.base import PageSource, SourceConfig

class GoodConfig(SourceConfig):
    kind: Literal["{kind}"] = "{kind}"
    bucket: str

class Good(PageSource):
    config_model: ClassVar[type[SourceConfig]] = GoodConfig

    @classmethod
    async def open(cls, config, *, vm_id):
        return cls()

    @property
    def size(self):
        return None

    async def fill(self, offset, dest):
        dest[:] = bytes(len(dest))

class NotASource:
    pass
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Install a distribution whose entry points add kinds; returns the good kind's name."""
    n = next(_names)
    module, kind = f"uffdd_test_plugin_{n}", f"testkind{n}"
    (tmp_path / f"{module}.py").write_text(PLUGIN.replace("{kind}", kind))
    dist = tmp_path / f"uffdd_test_plugin_{n}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: uffdd-test-plugin-{n}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[uffdd.sources]\n"
        f"{kind} = {module}:Good\n"
        f"broken{n} = uffdd_no_such_module_{n}:Thing\n"
        f"notasource{n} = {module}:NotASource\n"
        f"missing{n} = {module}:Absent\n"
        f"file = {module}:Good\n")  # may not shadow the built-in kind
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return kind


def test_builtin_kinds_are_file_and_peer() -> None:
    assert {k: available_kinds()[k] for k in BUILTIN_SOURCES} == BUILTIN_SOURCES
    assert source_class("file") is FileSource
    assert source_class("peer") is PeerSource


def test_an_unknown_kind_is_refused_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown source kind 's3'; known kinds: .*file.*peer"):
        source_class("s3")


def test_another_package_adds_a_kind_through_its_entry_point_and_its_own_config_model(plugin: str) -> None:
    assert available_kinds()[plugin].endswith(":Good")
    cls = source_class(plugin)
    assert cls.__name__ == "Good"
    config = parse_config({"sources": {"remote": {"kind": plugin, "bucket": "b"}}})
    assert config.sources["remote"].kind == plugin
    with pytest.raises(ConfigError, match=r"sources\.remote\.bucket"):
        parse_config({"sources": {"remote": {"kind": plugin}}})


def test_an_entry_point_cannot_shadow_a_builtin_kind(plugin: str) -> None:
    assert available_kinds()["file"] == BUILTIN_SOURCES["file"]
    assert source_class("file") is FileSource


@pytest.mark.parametrize(("name", "needle"), [
    ("broken", "cannot be loaded: No module named"),
    ("missing", "cannot be loaded: .*Absent"),
    ("notasource", "is not a PageSource"),
])
def test_a_kind_that_cannot_be_used_is_refused_naming_kind_and_target(plugin: str, name: str, needle: str) -> None:
    kind = name + plugin.removeprefix("testkind")
    with pytest.raises(ConfigError, match=rf"source kind '{kind}' -> '.*' {needle}"):
        source_class(kind)
    with pytest.raises(ConfigError, match=rf"sources\.x\.kind: source kind '{kind}'"):
        parse_config({"sources": {"x": {"kind": kind}}})
