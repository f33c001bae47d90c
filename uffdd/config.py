"""The YAML configuration, validated with pydantic; every error names the file and the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ByteSize, Field, ValidationError, field_validator, model_validator

from uffdd.configbase import StrictModel, describe_validation_error, parse_hostport, read_yaml, validate
from uffdd.errors import ConfigError
from uffdd.sources import SourceConfig, source_class

METRICS_DEFAULT_HOST = "127.0.0.1"
"""The host of a ``metrics.listen`` given as ``:PORT``."""


class LogConfig(StrictModel):
    format: Literal["auto", "console", "json"] = "auto"
    """auto: console on a TTY, JSON lines otherwise (journald, files)."""
    level: Literal["debug", "info", "warning", "error"] = "info"


class MetricsConfig(StrictModel):
    listen: str | None = None
    """HOST:PORT of the Prometheus endpoint; unset: no endpoint."""

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hostport(value, default_host=METRICS_DEFAULT_HOST)
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to serve metrics on; None: no endpoint."""
        if self.listen is None:
            return None
        return parse_hostport(self.listen, default_host=METRICS_DEFAULT_HOST)


class HandshakeConfig(StrictModel):
    timeout: float = Field(default=5.0, gt=0, le=300)
    """Seconds a VMM has to send the whole handshake after connecting."""
    max_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    """Largest handshake body accepted."""
    max_pending: int = Field(default=64, ge=1, le=65536)
    """Handshakes in progress at once in one process (each worker); a connection beyond them gets
    an error line and is closed at once."""


class LimitsConfig(StrictModel):
    """What one process (each worker) takes on at once; unset: no limit."""

    max_sessions: int | None = Field(default=None, ge=1)
    """Sessions served at once; a handshake beyond them is refused."""
    max_mapped_bytes: ByteSize | None = Field(default=None, ge=4096)
    """Guest memory (the sum of the sessions' regions) under management at once, e.g. 64GiB; a
    handshake that would pass it is refused."""


class PrefetchConfig(StrictModel):
    enabled: bool = True
    """Fetch every page not yet filled in the background, after demand faults."""
    chunk: int = Field(default=4 << 20, ge=4096, le=256 << 20)
    """Bytes per background read and per UFFDIO_CONTINUE."""
    rate: float | None = Field(default=None, gt=0)
    """Limit in MiB/s; unset: as fast as the source allows."""
    max_inflight: int = Field(default=16 << 20, ge=4096)
    """Bytes of background reads in flight at once."""


class SessionConfig(StrictModel):
    fault_around: int = Field(default=65536, ge=0, le=2 << 20)
    """Bytes filled around a demand fault (an aligned block, one CONTINUE); 0 or one page: off."""
    prefetch: PrefetchConfig = PrefetchConfig()
    record: bool = False
    """Write the first-fault order next to the snapshot, for later restores to prefetch first."""
    replay: bool = True
    """Prefetch a recorded working set first when a record file exists."""
    native: bool = True
    """Serve single-page faults from a file source with the C fast path when it is built;
    false: the same path in Python."""


class ControlConfig(StrictModel):
    listen: str | None = None
    """Unix socket that `uffdd status` reads; unset: next to ``listen``, ending in ``.ctl``."""


class ShutdownConfig(StrictModel):
    on_sigterm: Literal["wait", "handover"] = "wait"
    """wait: stop accepting and wait for the sessions to end (a second signal hands them over
    to the fd store, or ends them without one); handover: leave them in the service manager's
    fd store at once and exit, for the next start to resume (needs FileDescriptorStoreMax=)."""


UID_MAX = (1 << 32) - 2
"""(uid_t)-1 means "no id" to the kernel; every other 32-bit value is a valid uid or gid."""


class AccessRule(StrictModel):
    """Processes that may claim the vm_ids matching ``vm_id``: by uid, or by gid (the primary
    group or a supplementary one of the connecting process)."""

    vm_id: str = Field(min_length=1, max_length=255)
    """A glob (``*``, ``?``, ``[...]``, as fnmatch; case-sensitive): ``tenant-a-*``."""
    uids: list[int] = Field(default_factory=list)
    gids: list[int] = Field(default_factory=list)

    @field_validator("uids", "gids")
    @classmethod
    def _ids_in_range(cls, value: list[int]) -> list[int]:
        bad = [v for v in value if not 0 <= v <= UID_MAX]
        if bad:
            raise ValueError(f"{bad[0]} is not a uid/gid (expected 0..{UID_MAX})")
        return value

    @model_validator(mode="after")
    def _someone(self) -> AccessRule:
        if not self.uids and not self.gids:
            raise ValueError(f"vm_id {self.vm_id!r}: give uids, gids or both (a rule must say who may claim it)")
        return self


class AccessConfig(StrictModel):
    """Who may claim which guest: checked against the connecting VMM's SO_PEERCRED. Omitted: off
    (anyone who can connect to ``listen`` may claim any vm_id)."""

    rules: list[AccessRule]
    """A handshake is served when at least one rule matches its vm_id and allows the process."""

    @field_validator("rules")
    @classmethod
    def _not_empty(cls, value: list[AccessRule]) -> list[AccessRule]:
        if not value:
            raise ValueError("no rules: every VMM would be refused (omit `access` to turn the policy off)")
        return value


class Config(StrictModel):
    listen: str = "/run/uffdd/uffdd.sock"
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    handshake: HandshakeConfig = HandshakeConfig()
    limits: LimitsConfig = LimitsConfig()
    session: SessionConfig = SessionConfig()
    control: ControlConfig = ControlConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    access: AccessConfig | None = None
    """Which uids/gids may claim which vm_ids (see AccessConfig); None: no such policy."""
    workers: int | Literal["auto"] = "auto"
    """Worker processes sharing the socket (uffdd.service.supervisor); "auto": one per CPU this
    process may run on (systemd's CPUAffinity= narrows it). 1: a single process, no parent."""
    pin_workers: bool = True
    """Each worker runs on one CPU of that set (worker i on the i-th, round-robin): a worker
    keeps its caches, and two workers never share a CPU while another is free."""

    @field_validator("workers")
    @classmethod
    def _workers_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("expected 1..256 or 'auto'")
        return value

    @property
    def worker_count(self) -> int:
        return self.workers if isinstance(self.workers, int) else max(len(os.sched_getaffinity(0)), 1)

    @property
    def control_path(self) -> str:
        """Where the control socket lives (``control.listen``, or derived from ``listen``)."""
        if self.control.listen:
            return self.control.listen
        return str(Path(self.listen).with_suffix(".ctl"))

    @field_validator("sources", mode="before")
    @classmethod
    def _sources_by_kind(cls, raw: Any) -> dict[str, SourceConfig]:
        """Each source is validated by the model of its own kind (plugins bring their own)."""
        if not isinstance(raw, dict):
            raise ValueError("expected a mapping of source name -> {kind: ..., ...}")
        out: dict[str, SourceConfig] = {}
        for name, spec in raw.items():
            if isinstance(spec, SourceConfig):
                out[name] = spec
                continue
            if not isinstance(spec, dict) or "kind" not in spec:
                    raise ValueError(f"sources.{name}: expected a mapping with a 'kind' key")
            try:
                model = source_class(str(spec["kind"])).config_model
            except ConfigError as exc:
                raise ValueError(f"sources.{name}.kind: {exc}") from None
            try:
                out[name] = model.model_validate(spec)
            except ValidationError as exc:
                raise ValueError(describe_validation_error(exc, prefix=f"sources.{name}")) from None
        return out


def parse_config(data: Any, origin: str = "<config>") -> Config:
    """Validate already-loaded YAML data."""
    return validate(Config, data, origin)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    return parse_config(read_yaml(path), str(path))
