"""Packed memory images: many guests' memory in object storage, restored through a host cache.

``format`` is the on-store format (docs/image-format.md), ``pack`` writes and verifies images
(``uffdd pack``), ``store`` reaches directories, HTTP servers and object stores through
obstore, ``cache`` and ``writer`` keep chunks on local disk, ``fetcher`` gets each chunk once
per host with demand faults first, and ``reader`` maps byte ranges to chunks for the
``kind: image`` page source (uffdd.sources.image).
"""
