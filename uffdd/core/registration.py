"""Making a VMM's userfaultfd ready to serve its handshake: UFFDIO_API and registration."""

from __future__ import annotations

from uffdd.errors import HandshakeError
from uffdd.handshake import Handshake
from uffdd.kernel import KernelError, Userfaultfd, abi
from uffdd.kernel.uffd import supported_features

EVENTS = abi.FEATURE_EVENT_REMOVE | abi.FEATURE_EVENT_UNMAP | abi.FEATURE_EVENT_REMAP
WANTED_FEATURES = abi.FEATURE_MINOR_SHMEM | abi.FEATURE_MINOR_HUGETLBFS | abi.FEATURE_THREAD_ID | EVENTS
REGISTER_MODE = abi.REGISTER_MODE_MISSING | abi.REGISTER_MODE_MINOR


def prepare_uffd(uffd: Userfaultfd, hs: Handshake, *, hugetlb: bool, anonymous: bool = False) -> tuple[bool, int]:
    """Make ``uffd`` ready for ``hs``: API (unless the VMM did it) and registration.

    Shared memory is registered MISSING|MINOR (MINOR alone lets never-written pages read as
    zeros), anonymous memory MISSING. Registration is repeated even if the VMM did it: it is
    idempotent for the same uffd. Returns (whether the VMM had done UFFDIO_API, the features on).
    """
    feats = uffd.fdinfo_features()
    preinit = feats is not None
    if feats is None:
        uffd.api(WANTED_FEATURES & supported_features())
        feats = uffd.fdinfo_features() or 0
    minor = abi.FEATURE_MINOR_HUGETLBFS if hugetlb else abi.FEATURE_MINOR_SHMEM
    if not anonymous and not feats & minor:
        raise HandshakeError(
            f"the userfaultfd was initialized without {abi.FEATURE_NAMES[minor]}: do UFFDIO_API with "
            "that feature, or pass a bare userfaultfd and let uffdd do it")
    mode = abi.REGISTER_MODE_MISSING if anonymous else REGISTER_MODE
    need = abi.IOCTL_BIT_COPY if anonymous else abi.IOCTL_BIT_CONTINUE
    for i, r in enumerate(hs.regions):
        try:
            ioctls = uffd.register(r.start, r.size, mode)
        except KernelError as exc:
            what = ("private anonymous (or MAP_HUGETLB) memory" if anonymous
                    else "a shared mapping of the memory file")
            raise HandshakeError(
                f"regions[{i}]: cannot register {r.start:#x}+{r.size:#x} as "
                f"{'MISSING' if anonymous else 'MISSING|MINOR'}: {exc} (the region must be {what} in the VMM)"
            ) from None
        if not ioctls & (1 << need):
            raise HandshakeError(f"regions[{i}]: the kernel does not allow "
                                 f"{'UFFDIO_COPY' if anonymous else 'UFFDIO_CONTINUE'} on it")
    return preinit, feats


__all__ = ["EVENTS", "REGISTER_MODE", "WANTED_FEATURES", "prepare_uffd"]
