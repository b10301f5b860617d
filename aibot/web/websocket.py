"""A minimal RFC 6455 WebSocket: the server side for `aibot serve` and a small client for tests.

Only what the dashboard needs: text frames (fragmented messages are reassembled), ping/pong and the
close handshake; no extensions, no subprotocols. Frames larger than `MAX_MESSAGE` are refused so a
client cannot make the server buffer without bound.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import threading
import urllib.parse

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 1 << 20

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WebSocketError(Exception):
    pass


class ConnectionClosed(WebSocketError):
    def __init__(self, code: int = 1005, reason: str = ""):
        super().__init__(f"connection closed ({code} {reason})".strip())
        self.code = code
        self.reason = reason


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode("ascii")


def handshake_problem(method: str, headers) -> str | None:
    """Why a request is not a valid upgrade, or None when it is."""
    if method != "GET":
        return "WebSocket upgrade needs GET"
    if "websocket" not in (headers.get("Upgrade") or "").lower():
        return "missing 'Upgrade: websocket' header"
    if "upgrade" not in (headers.get("Connection") or "").lower():
        return "missing 'Connection: Upgrade' header"
    if headers.get("Sec-WebSocket-Version") != "13":
        return "Sec-WebSocket-Version must be 13"
    key = headers.get("Sec-WebSocket-Key") or ""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        return "Sec-WebSocket-Key is not 16 base64-encoded bytes"
    return None


def encode_frame(opcode: int, payload: bytes, *, mask: bool = False, fin: bool = True) -> bytes:
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 1 << 16:
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        head += key
        payload = _xor(payload, key)
    return bytes(head) + payload


def _xor(data: bytes, key: bytes) -> bytes:
    # int.from_bytes XOR is fast enough for dashboard-sized frames without numpy.
    n = len(data)
    if not n:
        return data
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionClosed(1006, "connection dropped")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket, *, require_mask: bool) -> tuple[bool, int, bytes]:
    """One frame as (fin, opcode, unmasked payload)."""
    b0, b1 = _recv_exact(sock, 2)
    fin, opcode, masked, n = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
    if b0 & 0x70:
        raise WebSocketError("reserved bits set (no extensions were negotiated)")
    if require_mask and not masked:
        raise WebSocketError("client frames must be masked")
    if n == 126:
        n = struct.unpack("!H", _recv_exact(sock, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", _recv_exact(sock, 8))[0]
    if n > MAX_MESSAGE:
        raise WebSocketError(f"frame of {n} bytes exceeds the {MAX_MESSAGE}-byte limit")
    key = _recv_exact(sock, 4) if masked else b""
    payload = _recv_exact(sock, n)
    return fin, opcode, _xor(payload, key) if masked else payload


class Endpoint:
    """One side of an established connection. Sends are serialised by a lock (several threads send)."""

    def __init__(self, sock: socket.socket, *, is_client: bool):
        self.sock = sock
        self.is_client = is_client
        self._send_lock = threading.Lock()
        self.closed = False

    def _send(self, opcode: int, payload: bytes) -> None:
        frame = encode_frame(opcode, payload, mask=self.is_client)
        with self._send_lock:
            self.sock.sendall(frame)

    def send_text(self, text: str) -> None:
        self._send(OP_TEXT, text.encode("utf-8"))

    def send_json(self, obj) -> None:
        self.send_text(json.dumps(obj, separators=(",", ":"), default=str))

    def ping(self, data: bytes = b"") -> None:
        self._send(OP_PING, data)

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._send(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:120])
        except OSError:
            pass

    def recv(self) -> str:
        """The next text message; answers pings and raises ConnectionClosed on a close frame."""
        parts: list[bytes] = []
        total = 0
        while True:
            fin, opcode, payload = read_frame(self.sock, require_mask=not self.is_client)
            if opcode == OP_PING:
                self._send(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                reason = payload[2:].decode("utf-8", "replace")
                self.close(code if code != 1005 else 1000)
                raise ConnectionClosed(code, reason)
            if opcode == OP_BINARY:
                raise WebSocketError("binary frames are not supported")
            if opcode not in (OP_TEXT, OP_CONT):
                raise WebSocketError(f"unknown opcode {opcode:#x}")
            total += len(payload)
            if total > MAX_MESSAGE:
                raise WebSocketError(f"message exceeds the {MAX_MESSAGE}-byte limit")
            parts.append(payload)
            if fin:
                return b"".join(parts).decode("utf-8")


# --- client (tests, scripts) ---------------------------------------------------------------------------

class Client(Endpoint):
    """A blocking client: `Client.connect("ws://127.0.0.1:4001/ws?token=…", timeout=5)`."""

    def __init__(self, sock: socket.socket):
        super().__init__(sock, is_client=True)

    @classmethod
    def connect(cls, url: str, *, timeout: float = 10.0, headers: dict[str, str] | None = None) -> Client:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "ws":
            raise ValueError(f"url: only ws:// is supported, got {u.scheme!r}")
        port = u.port or 80
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        lines = [f"GET {path} HTTP/1.1", f"Host: {u.hostname}:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                sock.close()
                raise WebSocketError("server closed the connection during the handshake")
            head += chunk
            if len(head) > 65536:
                raise WebSocketError("handshake response too large")
        status, *header_lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in status + " ":
            sock.close()
            raise WebSocketError(f"upgrade refused: {status}")
        got = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        if got.get("sec-websocket-accept") != accept_key(key):
            sock.close()
            raise WebSocketError("bad Sec-WebSocket-Accept from server")
        return cls(sock)

    def recv_json(self, timeout: float | None = None):
        if timeout is not None:
            self.sock.settimeout(timeout)
        return json.loads(self.recv())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self.sock.close()
