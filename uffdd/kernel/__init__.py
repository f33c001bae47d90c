"""The one place that knows the userfaultfd ABI. Synchronous, stdlib only, no asyncio."""

from uffdd.kernel import abi
from uffdd.kernel.errors import (
    AlreadyInitialized,
    FeatureUnsupported,
    GuestGone,
    KernelError,
    MappingChanging,
    PageExists,
    RangeBusy,
    RangeInvalid,
    UserfaultfdUnavailable,
)
from uffdd.kernel.memory import SecondMapping, file_page_size, file_size, is_hugetlb
from uffdd.kernel.uffd import MAX_BATCH, ApiInfo, UffdMsg, Userfaultfd

__all__ = [
    "MAX_BATCH",
    "AlreadyInitialized",
    "ApiInfo",
    "FeatureUnsupported",
    "GuestGone",
    "KernelError",
    "MappingChanging",
    "PageExists",
    "RangeBusy",
    "RangeInvalid",
    "SecondMapping",
    "UffdMsg",
    "Userfaultfd",
    "UserfaultfdUnavailable",
    "abi",
    "file_page_size",
    "file_size",
    "is_hugetlb",
]
