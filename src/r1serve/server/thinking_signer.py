"""Signatures on the thinking this server writes (Anthropic's `thinking.signature`), so a
thinking block a client sends back can be told from one it wrote or changed."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path


class ThinkingSigner:
    """Signs the thinking this server wrote (HMAC-SHA256 under the server's key), so a thinking
    block sent back can be told from one a client wrote or changed."""

    PREFIX = "r1s1."

    def __init__(self, key: bytes) -> None:
        self.key = key

    def sign(self, thinking: str) -> str:
        mac = hmac.new(self.key, thinking.encode(), hashlib.sha256).digest()
        return self.PREFIX + base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def verify(self, thinking: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(thinking), signature)


def signing_key(path: Path) -> bytes:
    """The server's thinking-signature key, made once and kept in its data directory (so thinking
    signed before a restart still verifies after it; servers sharing the directory share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made before, or by a server starting beside this one
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        key = os.urandom(32)
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key
