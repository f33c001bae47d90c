"""The exception tree users of uffdd can catch, httpx-style.

    UffddError
    ├── ConfigError            a config file or option is wrong (names key and file)
    ├── StartupError           a socket or port the daemon needs is held by a live process
    ├── HandshakeError         a VMM's handshake message is malformed (names the field)
    ├── SourceError            a page source could not deliver a page
    │   ├── SourceUnavailable  it cannot be opened / reached at all
    │   ├── SourceShortRead    it ended before the page did (never zero-filled)
    │   └── PagePoisoned       the source holds a memory error there (installed as poison)
    └── SessionError           a session cannot go on (its guest or userfaultfd is gone)
        ├── GuestMemoryGone    the guest's memory file no longer covers what must be filled
        └── SourceChanged      the source's bytes changed during the restore (a snapshot
                               overwritten in place)

Kernel refusals are :class:`uffdd.kernel.KernelError` (an ``OSError``) and its subclasses.
"""

from __future__ import annotations


class UffddError(Exception):
    """Base of every error uffdd raises on purpose."""


class ConfigError(UffddError):
    """The configuration is invalid; the message names the file and the key."""


class StartupError(UffddError):
    """Start-up stopped before replacing anything: a socket path answers a connect() (another
    instance is live) or a port cannot be bound. The message names the setting and the path."""


class HandshakeError(UffddError):
    """A VMM's handshake is malformed. The message is sent back to the VMM as one JSON line."""


class SourceError(UffddError):
    """A page source failed for one page; the fault is retried, never answered with zeros."""


class SourceUnavailable(SourceError):
    """The source cannot be opened or reached."""


class SourceShortRead(SourceError):
    """The source had fewer bytes than the page needs."""


class PagePoisoned(SourceError):
    """The source marks bytes [offset, offset+length) as poisoned (a hardware memory error at
    the source). Not retried: the guest gets UFFDIO_POISON there and a SIGBUS on access."""

    def __init__(self, offset: int, length: int) -> None:
        super().__init__(f"poisoned bytes at {offset:#x}+{length:#x}")
        self.offset = offset
        self.length = length

    def covers(self, offset: int, length: int) -> bool:
        return self.offset < offset + length and offset < self.offset + self.length


class SessionError(UffddError):
    """The session cannot continue."""


class GuestMemoryGone(SessionError):
    """A copy into guest memory failed because the memory file no longer covers it (the VMM
    shrank it, e.g. with ftruncate). That session ends with this error; nothing else is touched."""

    @classmethod
    def at(cls, offset: int, length: int) -> GuestMemoryGone:
        return cls(f"the guest's memory file no longer covers {offset:#x}+{length:#x} (shrunk by the VMM?): "
                   "the session cannot fill it and ends")


class SourceChanged(SessionError):
    """The source's bytes are no longer those the restore started from (a snapshot file written
    in place): pages already served may mix old and new bytes, so the session ends loudly."""
