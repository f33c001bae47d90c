"""The peer wire protocol (docs/peer-protocol.md): a sans-IO codec.

Everything here is pure: no sockets, no event loop. :mod:`.frames` holds the layouts, codes and
header checks; :mod:`.messages` the handshake's messages and proofs; :mod:`.data` builds DATA
frames (server); :mod:`.decoder` turns received bytes into control frames (server);
:mod:`.reader` lets the client tell the transport where the next bytes must go (its
``get_buffer`` / ``buffer_updated`` pair is asyncio's ``BufferedProtocol``), so page payloads land
straight in the destination buffer. Every length, count and offset is checked against what was
negotiated before anything is read into memory.

Use it as ``from uffdd.peer import protocol as p``; the submodules are its implementation.
"""

from __future__ import annotations

from uffdd.peer.protocol.data import (
    LZ4_WORTH_IT,
    BlockCounts,
    Compressor,
    encode_data,
)
from uffdd.peer.protocol.decoder import (
    FrameDecoder,
)
from uffdd.peer.protocol.frames import (
    AUTH,
    BLOCK_SHIFT,
    BLOCK_SIZE,
    CHALLENGE,
    CLIENT_CONTROL,
    DESC,
    DESC_SIZE,
    FEATURE_LZ4,
    FLAG_TAGGED,
    HEADER,
    HEADER_SIZE,
    HELLO,
    KNOWN_FEATURES,
    MAGIC,
    MAX_CONTROL_PAYLOAD,
    MAX_ERROR_MESSAGE,
    MAX_NAME,
    NO_PROOF,
    NONCE_SIZE,
    PROOF_SIZE,
    SERVER_ACCEPTS,
    TAG_SIZE,
    VERSION,
    WELCOME,
    ZERO_BLOCK,
    ZERO_CRC,
    AuthMethod,
    Encoding,
    ErrorCode,
    Frame,
    FrameType,
    Limits,
    ProtocolError,
    Role,
    check_header,
    encode_error,
    encode_frame,
    encode_read,
    error_code,
    frame_pieces,
    header,
)
from uffdd.peer.protocol.messages import (
    Challenge,
    Hello,
    Welcome,
    client_proof,
    proofs_equal,
    server_proof,
)
from uffdd.peer.protocol.reader import (
    DISCARD_SIZE,
    ReaderHandler,
    ResponseReader,
    Target,
    feed_reader,
)
from uffdd.peer.protocol.seal import (
    Opener,
    Sealer,
    session_keys,
)

__all__ = [
    "AUTH",
    "BLOCK_SHIFT",
    "BLOCK_SIZE",
    "CHALLENGE",
    "CLIENT_CONTROL",
    "DESC",
    "DESC_SIZE",
    "DISCARD_SIZE",
    "FEATURE_LZ4",
    "FLAG_TAGGED",
    "HEADER",
    "HEADER_SIZE",
    "HELLO",
    "KNOWN_FEATURES",
    "LZ4_WORTH_IT",
    "MAGIC",
    "MAX_CONTROL_PAYLOAD",
    "MAX_ERROR_MESSAGE",
    "MAX_NAME",
    "NONCE_SIZE",
    "NO_PROOF",
    "PROOF_SIZE",
    "SERVER_ACCEPTS",
    "TAG_SIZE",
    "VERSION",
    "WELCOME",
    "ZERO_BLOCK",
    "ZERO_CRC",
    "AuthMethod",
    "BlockCounts",
    "Challenge",
    "Compressor",
    "Encoding",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Hello",
    "Limits",
    "Opener",
    "ProtocolError",
    "ReaderHandler",
    "ResponseReader",
    "Role",
    "Sealer",
    "Target",
    "Welcome",
    "check_header",
    "client_proof",
    "encode_data",
    "encode_error",
    "encode_frame",
    "encode_read",
    "error_code",
    "feed_reader",
    "frame_pieces",
    "header",
    "proofs_equal",
    "server_proof",
    "session_keys",
]
