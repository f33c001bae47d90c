"""Post-copy over the network: the wire protocol, ``uffdd serve`` and its client.

- :mod:`uffdd.peer.protocol` frames, codecs and sans-IO decoders (docs/peer-protocol.md);
- :mod:`uffdd.peer.server`, :mod:`uffdd.peer.image` and :mod:`uffdd.peer.serve` the source
  host's side (``uffdd serve``), configured by :mod:`uffdd.peer.config`;
- :mod:`uffdd.peer.client` the destination's side, used by the ``peer`` page source;
- :mod:`uffdd.peer.relay` a TCP relay whose link can be cut on purpose, :mod:`uffdd.peer.demo`
  the ``uffdd demo --peer`` half, :mod:`uffdd.peer.testing` helpers for tests and benchmarks.
"""
