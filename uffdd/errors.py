"""The exception tree users of uffdd can catch, httpx-style.

    UffddError
    ├── ConfigError            a config file or option is wrong (names key and file)
    ├── HandshakeError         a VMM's handshake message is malformed (names the field)
    ├── SourceError            a page source could not deliver a page
    │   ├── SourceUnavailable  it cannot be opened / reached at all
    │   └── SourceShortRead    it ended before the page did (never zero-filled)
    └── SessionError           a session cannot go on (its guest or userfaultfd is gone)

Kernel refusals are :class:`uffdd.kernel.KernelError` (an ``OSError``) and its subclasses.
"""

from __future__ import annotations


class UffddError(Exception):
    """Base of every error uffdd raises on purpose."""


class ConfigError(UffddError):
    """The configuration is invalid; the message names the file and the key."""


class HandshakeError(UffddError):
    """A VMM's handshake is malformed. The message is sent back to the VMM as one JSON line."""


class SourceError(UffddError):
    """A page source failed for one page; the fault is retried, never answered with zeros."""


class SourceUnavailable(SourceError):
    """The source cannot be opened or reached."""


class SourceShortRead(SourceError):
    """The source had fewer bytes than the page needs."""


class SessionError(UffddError):
    """The session cannot continue."""
