"""uffdd: a userfaultfd page-fault daemon for post-copy migration and snapshot restore."""

__version__ = "0.1.0"
