"""Where images live: a directory, an HTTP(S) server, S3 (or GCS, Azure), through obstore.

obstore (Rust's object_store) gives every kind of store the same small async API, signs S3
requests itself and takes credentials from the usual environment (AWS_* variables, web
identity, instance metadata). uffdd keeps its own retry loop (with a deadline that it reports),
so obstore's own retries are off; every request has a timeout.

An image is named by the URL of its manifest; its chunk objects live under ``chunks/`` next to
it, so images in one folder share their chunks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError, NotFoundError, NotSupportedError
from obstore.store import HTTPStore, LocalStore, from_url

SCHEMES = ("file", "http", "https", "s3", "gs", "az", "abfs", "abfss")


class StoreError(Exception):
    """A request to the store failed; ``missing`` if the object does not exist."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class StoreOptions:
    timeout: float = 30.0
    """Seconds for one whole request (connect, send, receive)."""
    connect_timeout: float = 5.0
    endpoint: str | None = None
    """S3-compatible servers (MinIO, Ceph): their URL; default: AWS (or AWS_ENDPOINT_URL)."""
    region: str | None = None


def split_url(url: str) -> tuple[str, str]:
    """``https://host/a/vm1.json`` -> (``https://host/a``, ``vm1.json``): the store and the key."""
    head, sep, name = url.rstrip().rpartition("/")
    if not sep or not name:
        raise ValueError(f"{url!r} does not name an object (expected .../NAME)")
    return head, name


def check_url(url: str) -> str:
    """The URL's scheme, if uffdd can read it; a local path counts as ``file``."""
    scheme = urlsplit(url).scheme or "file"
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r} in {url!r}: use one of {', '.join(SCHEMES)} "
                         "or an absolute path")
    if scheme == "file" and not local_path(url).startswith("/"):
        raise ValueError(f"{url!r}: a local image needs an absolute path")
    return scheme


def local_path(url: str) -> str:
    return urlsplit(url).path if url.startswith("file:") else url


class ObjectStore:
    """One store prefix (a folder of images and their chunks); safe to share between sessions."""

    def __init__(self, url: str, options: StoreOptions | None = None, *, create: bool = False) -> None:
        self.url = url.rstrip("/")
        self._ranges = True
        opts = options or StoreOptions()
        scheme = check_url(self.url + "/x")
        client: Any = {"timeout": timedelta(seconds=opts.timeout),
                                  "connect_timeout": timedelta(seconds=opts.connect_timeout)}
        retry: Any = {"max_retries": 0, "retry_timeout": timedelta(seconds=opts.timeout)}
        self._store: Any
        if scheme == "file":
            path = local_path(self.url) or "/"
            if create:
                os.makedirs(path, exist_ok=True)
            self._store = LocalStore(path)
        elif scheme in ("http", "https"):
            client["allow_http"] = scheme == "http"
            self._store = HTTPStore.from_url(self.url, client_options=client, retry_config=retry)
        else:
            extra: dict[str, Any] = {}
            endpoint = opts.endpoint or os.environ.get("AWS_ENDPOINT_URL")
            if scheme == "s3" and endpoint:
                extra["endpoint"] = endpoint
                client["allow_http"] = endpoint.startswith("http:")
            if scheme == "s3" and opts.region:
                extra["region"] = opts.region
            self._store = from_url(self.url, client_options=client, retry_config=retry, **extra)

    async def get(self, key: str, *, size: int | None = None, limit: int) -> Any:
        """The object's bytes (a buffer). ``size``: read exactly that many (one Range GET, a
        single round trip; a plain GET where the server has no ranges); ``limit``: refuse an
        object longer than that, from its length, before the body is read."""
        try:
            if size is not None and self._ranges:
                try:
                    data = await obstore.get_range_async(self._store, key, start=0, end=size)
                except NotSupportedError:
                    self._ranges = False  # e.g. Python's http.server: plain GETs from now on
                else:
                    if len(data) != size:
                        raise StoreError(f"{self.url}/{key}: answer of {len(data)} bytes, expected {size}")
                    return data
            result = await obstore.get_async(self._store, key)
            n = int(result.meta["size"])
            if n > limit or (size is not None and n != size):
                want = f"{size}" if size is not None else f"at most {limit}"
                raise StoreError(f"{self.url}/{key}: {n} bytes, expected {want}")
            data = await result.bytes_async()
        except (NotFoundError, FileNotFoundError):  # obstore raises either, by store kind
            raise StoreError(f"{self.url}/{key}: not found", missing=True) from None
        except (BaseError, OSError) as exc:
            raise StoreError(f"{self.url}/{key}: {_first_line(exc)}") from None
        if len(data) != n:
            raise StoreError(f"{self.url}/{key}: answer ended after {len(data)} of {n} bytes")
        return data

    async def put(self, key: str, data: Any) -> None:
        try:
            await obstore.put_async(self._store, key, data)
        except (BaseError, OSError) as exc:
            raise StoreError(f"{self.url}/{key}: write failed: {_first_line(exc)}") from None

    async def size_of(self, key: str) -> int | None:
        """The object's size, or None if there is no such object."""
        try:
            meta = await obstore.head_async(self._store, key)
        except (NotFoundError, FileNotFoundError):  # obstore raises either, by store kind
            return None
        except (BaseError, OSError) as exc:
            raise StoreError(f"{self.url}/{key}: {_first_line(exc)}") from None
        return int(meta["size"])


def _first_line(exc: BaseException) -> str:
    """obstore's messages carry a long debug dump after the first line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
