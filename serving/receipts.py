"""Signed prediction receipts: what a later label needs to be scored (model, version, classes, time), HMAC'd.

A receipt is base64url (no padding) of

    format (1 byte) | key id (4) | issued, unix seconds (4) | nonce (8) | len + model name | len + version
    | image count (4) | predicted classes, two per byte (ceil(n/2)) | HMAC-SHA256 tag, first 16 bytes

all big-endian. The key id (first 4 bytes of SHA-256 of the key) tells a receipt signed under another key
("foreign_key") from a tampered one ("invalid"); it reveals nothing usable about the key. Any process holding
the same key verifies any other's receipts, so feedback needs no shared state.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.contract import NUM_CLASSES
from serving.errors import InvalidReceipt, StartupError

log = logging.getLogger(__name__)

FORMAT = 1
TAG_BYTES = 16  # HMAC-SHA256 truncated to 128 bits (NIST SP 800-107 allows truncation to >= 64)
MIN_KEY_BYTES = 16
_HEAD = struct.Struct(">B4sI8s")  # format, key id, issued, nonce
_COUNT = struct.Struct(">I")
_MIN_RAW = _HEAD.size + 2 + _COUNT.size + TAG_BYTES
# A receipt for max_batch_size 65536 is ~44 KB of text; anything longer is not one of ours.
MAX_RECEIPT_CHARS = 1 << 16


@dataclass(frozen=True, slots=True)
class Receipt:
    """A verified receipt."""

    model: str
    version: str
    issued: int  # unix seconds
    classes: np.ndarray  # predicted class per image, uint8
    id: bytes  # unique per receipt (its tag): the key for duplicate detection


class ReceiptKey:
    """Issues and verifies receipts under one HMAC key."""

    def __init__(self, key: bytes, max_age_s: float) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"receipt key has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
        # The keyed HMAC state is made once; a receipt per answer copies it (1.0 vs 1.3 us for hmac.digest, which
        # keys a new context every time).
        self._hmac = hmac.new(key, digestmod=hashlib.sha256)
        self.key_id = hashlib.sha256(key).digest()[:4]
        self.max_age_s = max_age_s
        # Nonce: 4 random bytes per process + a counter, so equal predictions in one second still differ.
        self._salt = os.urandom(4)
        self._counter = itertools.count()
        self._names: dict[tuple[str, str], bytes] = {}

    @classmethod
    def from_file(cls, path: Path | None, max_age_s: float) -> ReceiptKey:
        """The key in `path`, or (None) a random one: then receipts verify only in this process."""
        if path is None:
            log.warning(
                "no --receipt-key-file: receipts are signed with a random key made now; they verify only in "
                "this server (not in other replicas, not after a restart)"
            )
            return cls(os.urandom(32), max_age_s)
        try:
            key = path.read_bytes()
        except OSError as exc:
            raise StartupError(f"cannot read the receipt key file: {exc}") from exc
        try:
            signer = cls(key, max_age_s)
        except ValueError as exc:
            raise StartupError(f"{path}: {exc} (make one with: head -c 32 /dev/urandom > key)") from None
        log.info("receipt key %s from %s", signer.key_id.hex(), path)
        return signer

    def issue(self, model: str, version: str, classes: np.ndarray, now: float | None = None) -> str:
        """The receipt for predictions `classes` (ints 0-9, one per image) of `model` `version`."""
        names = self._names.get((model, version))
        if names is None:
            names = self._names[(model, version)] = _short(model.encode()) + _short(version.encode())
        n = classes.shape[0]
        issued = int(time.time() if now is None else now)
        nonce = self._salt + (next(self._counter) & 0xFFFFFFFF).to_bytes(4, "big")
        body = b"".join((_HEAD.pack(FORMAT, self.key_id, issued, nonce), names, _COUNT.pack(n), _pack(classes)))
        tag = self._tag(body)
        return base64.urlsafe_b64encode(body + tag).rstrip(b"=").decode("ascii")

    def _tag(self, body: bytes) -> bytes:
        """HMAC-SHA256(key, body), truncated to TAG_BYTES."""
        mac = self._hmac.copy()
        mac.update(body)
        return mac.digest()[:TAG_BYTES]

    def verify(self, token: str, now: float | None = None) -> Receipt:
        """The receipt `token` stands for; InvalidReceipt if it is malformed, forged, foreign or expired."""
        if len(token) > MAX_RECEIPT_CHARS:
            raise InvalidReceipt("invalid", f"receipt is {len(token)} characters: not a receipt from this server")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise InvalidReceipt("invalid", "receipt is not base64url: pass the response's 'receipt' as is") from None
        if len(raw) < _MIN_RAW:
            raise InvalidReceipt("invalid", "receipt is truncated")
        body, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
        fmt, key_id, issued, _ = _HEAD.unpack_from(body)
        if fmt != FORMAT:
            raise InvalidReceipt("invalid", f"receipt format {fmt} is not {FORMAT}")
        if key_id != self.key_id:
            raise InvalidReceipt(
                "foreign_key",
                f"receipt was signed with key {key_id.hex()}, this server has key {self.key_id.hex()} "
                "(do all replicas mount the same receipt key?)",
            )
        if not hmac.compare_digest(self._tag(body), tag):
            raise InvalidReceipt("invalid", "receipt signature does not match: it was altered")
        # Signed by us from here on, so the layout is ours.
        model, at = _read_short(body, _HEAD.size)
        version, at = _read_short(body, at)
        (n,) = _COUNT.unpack_from(body, at)
        classes = _unpack(body[at + _COUNT.size :], n)
        receipt = Receipt(model.decode(), version.decode(), issued, classes, tag)
        age = (time.time() if now is None else now) - issued
        if age > self.max_age_s:
            raise InvalidReceipt(
                "expired",
                f"receipt is {age:.0f}s old; the server scores labels up to {self.max_age_s:.0f}s old",
                receipt.model,
                receipt.version,
            )
        return receipt


def _short(data: bytes) -> bytes:
    if len(data) > 255:
        raise ValueError("model names and versions in receipts are at most 255 bytes")
    return bytes((len(data),)) + data


def _read_short(body: bytes, at: int) -> tuple[bytes, int]:
    end = at + 1 + body[at]
    return body[at + 1 : end], end


def _pack(classes: np.ndarray) -> bytes:
    """Two classes (0-9) per byte, high nibble first."""
    if classes.shape[0] == 1:
        return bytes((int(classes[0]) << 4,))
    c = classes.astype(np.uint8)
    if c.size % 2:
        c = np.append(c, np.uint8(0))
    return ((c[0::2] << 4) | c[1::2]).tobytes()


def _unpack(data: bytes, n: int) -> np.ndarray:
    packed = np.frombuffer(data, dtype=np.uint8)
    classes = np.empty(packed.size * 2, dtype=np.uint8)
    classes[0::2], classes[1::2] = packed >> 4, packed & 0x0F
    classes = classes[:n]
    assert classes.size == n and (classes < NUM_CLASSES).all(), "a signed receipt has the layout it was made with"
    return classes
