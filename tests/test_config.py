"""The YAML configuration: the example file, refusals naming key and file, and `uffdd validate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from uffdd.config import Config, LogConfig, MetricsConfig, load_config, parse_config
from uffdd.configbase import join_hostport, parse_hostport
from uffdd.errors import ConfigError
from uffdd.sources.file import FileSourceConfig

EXAMPLE = Path(__file__).parent.parent / "configs" / "uffdd.yaml"

GOOD = """\
listen: /run/uffdd/uffdd.sock
sources:
  default: {kind: file, path: "/var/lib/uffdd/{vm_id}.mem"}
log: {format: auto, level: info}
metrics: {listen: 127.0.0.1:9477}
"""


def write(tmp_path: Path, text: str, name: str = "uffdd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refusal(path: Path) -> str:
    """The ConfigError message for a file that must be refused; it always names the file."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    return msg


def test_example_config_file_loads_with_a_default_file_source_per_vm_id() -> None:
    config = load_config(EXAMPLE)
    default = config.sources["default"]
    assert isinstance(default, FileSourceConfig)
    assert "{vm_id}" in default.path
    assert config.listen.endswith(".sock")


def test_documented_config_loads_with_every_section() -> None:
    config = Config.model_validate({
        "listen": "/run/uffdd/uffdd.sock",
        "sources": {"default": {"kind": "file", "path": "/var/lib/uffdd/{vm_id}.mem"}},
        "log": {"format": "auto", "level": "info"},
        "metrics": {"listen": "127.0.0.1:9477"},
    })
    assert config.listen == "/run/uffdd/uffdd.sock"
    assert config.sources == {"default": FileSourceConfig(kind="file", path="/var/lib/uffdd/{vm_id}.mem")}
    assert config.log == LogConfig(format="auto", level="info")
    assert config.metrics == MetricsConfig(listen="127.0.0.1:9477")


def test_config_file_is_read_from_disk(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.metrics.listen == "127.0.0.1:9477"
    assert list(config.sources) == ["default"]
    assert config.handshake == Config().handshake
    assert (config.handshake.timeout, config.handshake.max_bytes) == (5.0, 1 << 20)


def test_config_path_may_be_a_string(tmp_path: Path) -> None:
    assert load_config(str(write(tmp_path, GOOD))) == load_config(write(tmp_path, GOOD))


@pytest.mark.parametrize("text", ["", "\n", "# nothing here\n", "---\n"])
def test_empty_file_gives_the_defaults(tmp_path: Path, text: str) -> None:
    config = load_config(write(tmp_path, text))
    assert config == Config()
    assert config.listen == "/run/uffdd/uffdd.sock"
    assert config.sources == {}
    assert config.log == LogConfig(format="auto", level="info")
    assert config.metrics.listen is None
    assert config.handshake.timeout == 5.0


def test_unknown_top_level_key_is_refused_naming_key_and_file(tmp_path: Path) -> None:
    msg = refusal(write(tmp_path, GOOD + "listen_addr: /tmp/x.sock\n"))
    assert "listen_addr" in msg
    assert "unknown key" in msg


def test_unknown_key_in_a_section_is_refused_naming_the_dotted_key(tmp_path: Path) -> None:
    msg = refusal(write(tmp_path, "log: {format: json, colour: true}\n"))
    assert "log.colour" in msg
    assert "unknown key" in msg


def test_unknown_key_inside_a_source_is_refused_naming_the_dotted_key(tmp_path: Path) -> None:
    msg = refusal(write(tmp_path, "sources:\n  default: {kind: file, path: /x.mem, cache: 1G}\n"))
    assert "sources.default.cache" in msg
    assert "unknown key" in msg


def test_unknown_source_kind_is_refused_listing_the_known_kinds(tmp_path: Path) -> None:
    msg = refusal(write(tmp_path, "sources:\n  snap: {kind: s3, bucket: b}\n"))
    assert "sources.snap.kind" in msg
    assert "'s3'" in msg
    assert "known kinds: file" in msg


def test_source_without_kind_is_refused_naming_it(tmp_path: Path) -> None:
    msg = refusal(write(tmp_path, "sources:\n  snap: {path: /x.mem}\n"))
    assert "sources.snap" in msg
    assert "kind" in msg


def test_file_source_without_path_is_refused_naming_the_key(tmp_path: Path) -> None:
    msg = refusal(write(tmp_path, "sources:\n  default: {kind: file}\n"))
    assert "sources.default.path" in msg


@pytest.mark.parametrize(("text", "key"), [
    ("handshake: {timeout: soon}\n", "handshake.timeout"),
    ("handshake: {timeout: 0}\n", "handshake.timeout"),
    ("handshake: {max_bytes: 12}\n", "handshake.max_bytes"),
    ("log: {level: loud}\n", "log.level"),
    ("log: {format: xml}\n", "log.format"),
    ("log: json\n", "log"),
    ("listen: [a, b]\n", "listen"),
    ("sources: [default]\n", "sources"),
    ("sources:\n  default: {kind: file, path: [a]}\n", "sources.default.path"),
])
def test_wrong_type_or_value_is_refused_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    msg = refusal(write(tmp_path, text))
    assert f"{key}:" in msg


@pytest.mark.parametrize("text", [
    "listen: /run/x.sock\nsources: {default: [unclosed\n",
    "listen: a\n listen: b\n",
    "\tlisten: /run/x.sock\n",
    # In a flow mapping an unquoted {vm_id} opens a nested mapping: the path must be quoted.
    "sources:\n  default: {kind: file, path: /var/lib/uffdd/{vm_id}.mem}\n",
])
def test_invalid_yaml_is_refused_naming_the_file_and_the_line(tmp_path: Path, text: str) -> None:
    msg = refusal(write(tmp_path, text))
    assert "not valid YAML" in msg
    assert "line" in msg


def test_vm_id_placeholder_survives_in_a_quoted_flow_or_a_block_mapping(tmp_path: Path) -> None:
    flow = load_config(write(tmp_path, 'sources: {default: {kind: file, path: "/s/{vm_id}.mem"}}\n', "a.yaml"))
    block = load_config(write(tmp_path, "sources:\n  default:\n    kind: file\n    path: /s/{vm_id}.mem\n", "b.yaml"))
    assert flow.sources == block.sources == {"default": FileSourceConfig(path="/s/{vm_id}.mem")}


@pytest.mark.parametrize("text", ["- listen\n- sources\n", "just a string\n", "42\n"])
def test_top_level_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    assert "top level must be a mapping" in refusal(write(tmp_path, text))


def test_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    msg = refusal(tmp_path / "absent.yaml")
    assert "cannot read" in msg
    assert "No such file" in msg


# --- uffdd validate -----------------------------------------------------------------------------


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uffdd", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_validate_exits_0_on_a_good_file_and_says_ok(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    done = validate(path)
    assert done.returncode == 0, done.stderr
    assert f"{path}: ok" in done.stdout
    assert done.stderr == ""


def test_validate_exits_2_with_the_file_and_the_key_on_stderr_for_a_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "handshake: {timeout: soon}\n")
    done = validate(path)
    assert done.returncode == 2
    assert str(path) in done.stderr
    assert "handshake.timeout" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_validate_exits_2_for_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    done = validate(path)
    assert done.returncode == 2
    assert str(path) in done.stderr


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1:99999"])  # every form: the parser tests below
def test_validate_exits_2_naming_metrics_listen_when_it_is_not_host_and_port(tmp_path: Path, listen: str) -> None:
    path = write(tmp_path, GOOD.replace("metrics: {listen: 127.0.0.1:9477}", f"metrics: {{listen: '{listen}'}}"))
    done = validate(path)
    assert done.returncode == 2, done.stdout
    assert "metrics.listen" in done.stderr and str(path) in done.stderr
    assert "Traceback" not in done.stderr


# --- HOST:PORT, one parser for every address in a config ----------------------------------------

@pytest.mark.parametrize(("value", "kw", "expected"), [
    ("127.0.0.1:9477", {}, ("127.0.0.1", 9477)),
    (" host.example:0 ", {}, ("host.example", 0)),
    ("[::1]:7447", {}, ("::1", 7447)),
    ("[fe80::1]", {"default_port": 7447}, ("fe80::1", 7447)),
    ("::1", {"default_port": 7447}, ("::1", 7447)),
    ("src-host", {"default_port": 7447}, ("src-host", 7447)),
    (":9477", {"default_host": "127.0.0.1"}, ("127.0.0.1", 9477)),
    ("[]:9477", {"default_host": "127.0.0.1"}, ("127.0.0.1", 9477)),
])
def test_hostport_parses_names_v4_v6_and_the_defaults_asked_for(
        value: str, kw: dict[str, Any], expected: tuple[str, int]) -> None:
    assert parse_hostport(value, **kw) == expected
    assert parse_hostport(join_hostport(*expected)) == expected  # what join writes, parse reads


@pytest.mark.parametrize(("value", "kw", "needle"), [
    ("host", {}, "port is missing"),
    ("::1", {}, "port is missing"),
    (":9477", {}, "missing host"),
    ("h:65536", {}, "port must be 0..65535"),
    ("h:-1", {}, "port must be 0..65535"),
    ("h:http", {"default_port": 80}, "port must be 0..65535"),
    ("[::1", {"default_port": 1}, "missing ']'"),
    ("[::1]7447", {"default_port": 1}, r"expected \[HOST\]:PORT"),
])
def test_hostport_refuses_what_is_not_an_address_naming_the_value(value: str, kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        parse_hostport(value, **kw)
    assert repr(value) in str(info.value)


def test_metrics_listen_is_parsed_once_at_load_and_a_bare_port_means_loopback() -> None:
    assert MetricsConfig(listen=":9477").address == ("127.0.0.1", 9477)
    assert MetricsConfig(listen="[::1]:9").address == ("::1", 9)
    assert MetricsConfig().address is None
    with pytest.raises(ConfigError, match=r"metrics\.listen: 'nowhere': expected HOST:PORT"):
        parse_config({"metrics": {"listen": "nowhere"}})
