"""The `:authority` grpcio sends on the unix socket, read off the wire.

The supervisor's HTTP/2 stack refuses a socket path there with PROTOCOL_ERROR, so every channel
must send `localhost`. A bare HTTP/2 listener reads the client's first HEADERS frame and decodes
it (HPACK); no gRPC server is involved, so this checks what the client sends, not what a lenient
server accepts.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading

import grpc
import hpack
import pytest

from uvmctl_client import connect, pb, pb_grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, HEADERS, CONTINUATION = 0x4, 0x1, 0x9
ACK, END_HEADERS = 0x1, 0x4
PADDED, PRIORITY = 0x8, 0x20


def frame(kind: int, flags: int, payload: bytes = b"", stream: int = 0) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def first_request_headers(make_channel) -> dict[str, str]:
    """The headers of the first request a channel from ``make_channel(socket_path)`` sends."""
    tmp = tempfile.mkdtemp(prefix="uvmauth", dir="/tmp")
    path = os.path.join(tmp, "api.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(20)
    seen: dict[str, str] = {}
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as f:
                assert f.read(len(PREFACE)) == PREFACE
                conn.sendall(frame(SETTINGS, 0))
                block = b""
                while True:
                    head = f.read(9)
                    assert len(head) == 9, "the client closed before sending headers"
                    length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                    payload = f.read(length)
                    if kind == SETTINGS and not flags & ACK:
                        conn.sendall(frame(SETTINGS, ACK))
                    elif kind in (HEADERS, CONTINUATION):
                        if kind == HEADERS:
                            pad = payload[0] if flags & PADDED else 0
                            payload = payload[1 if flags & PADDED else 0 :]
                            if flags & PRIORITY:
                                payload = payload[5:]
                            payload = payload[: len(payload) - pad]
                        block += payload
                        if flags & END_HEADERS:
                            seen.update(hpack.Decoder().decode(block))
                            return  # closing the connection fails the client's call
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failure.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    channel = make_channel(path)
    try:
        with pytest.raises(grpc.RpcError):
            pb_grpc.VmServiceStub(channel).Inspect(pb.InspectRequest(), timeout=20)
    finally:
        channel.close()
        thread.join(30)
        listener.close()
        os.unlink(path)
        os.rmdir(tmp)
    assert not failure, failure
    return seen


def test_the_clients_channel_sends_localhost():
    headers = first_request_headers(connect)
    assert headers[":authority"] == "localhost"
    assert headers[":path"] == "/uvm.v1.VmService/Inspect"


def test_a_bare_grpcio_channel_would_not():
    """The control: without the option grpcio sends something else, so the test above means
    something."""
    headers = first_request_headers(lambda p: grpc.insecure_channel(f"unix:{p}"))
    assert headers[":authority"] != "localhost"
