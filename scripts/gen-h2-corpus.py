#!/usr/bin/python3
"""Writes the seed corpus of tests/fuzz/fuzz_h2.c: tests/fuzz/corpus/fuzz_h2/<name>.

Each seed is what fuzz_h2 reads: byte 0 (mode), byte 1 (piece size), then the
client's frames after the connection preface, which fuzz_h2 prepends unless
mode bit 0 says raw. Mode bits (see fuzz_h2.c): 0 raw, 1 small limits (8
fields, 256 bytes), 2 drop_xfcc, 3 the sidecar's xfcc line goes into the
translated heads, 4 the server sends SETTINGS first, 5-7 response body size
/ 4.

Frames are built by hand (hyperframe's layout, hpack for the header blocks)
so that malformed and out-of-order input can be written too. The output is
deterministic: run it again after changing a seed and commit the diff. Files
named found_* in that directory are not written here: they are inputs a
libFuzzer run found (kept for their coverage), and this script leaves them be.

usage: /usr/bin/python3 scripts/gen-h2-corpus.py [OUTDIR]
"""

from __future__ import annotations

import os
import struct
import sys

from hpack import Encoder
from hyperframe.frame import (ContinuationFrame, DataFrame, GoAwayFrame, HeadersFrame, PingFrame,
                              PriorityFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

RAW, SMALL, DROP_XFCC, EXTRA, SERVER_SETTINGS = 1, 2, 4, 8, 16


def body(n: int) -> int:
    """Mode bits for a response body of about n bytes."""
    return (min(n // 4, 7)) << 5


class Conn:
    """One client connection's bytes; a single HPACK encoder, as a real client has."""

    def __init__(self, settings: bool = True) -> None:
        self.enc = Encoder()
        self.out = bytearray()
        if settings:
            self.frame(SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 0}))

    def frame(self, f) -> "Conn":
        self.out += f.serialize()
        return self

    def raw(self, ftype: int, flags: int, stream: int, payload: bytes) -> "Conn":
        """A frame exactly as given, valid or not."""
        self.out += struct.pack(">I", len(payload))[1:] + bytes([ftype, flags])
        self.out += struct.pack(">I", stream) + payload
        return self

    def block(self, fields) -> bytes:
        return self.enc.encode([(n.encode() if isinstance(n, str) else n,
                                 v.encode() if isinstance(v, str) else v) for n, v in fields])

    def headers(self, stream: int, fields, end_stream: bool = False) -> "Conn":
        f = HeadersFrame(stream, self.block(fields))
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return self.frame(f)

    def headers_split(self, stream: int, fields, pieces: int, end_stream: bool = False) -> "Conn":
        """HEADERS followed by CONTINUATION frames (at most 16384 bytes each)."""
        blk = self.block(fields)
        size = max(1, min(16384, -(-len(blk) // pieces)))
        chunks = [blk[i:i + size] for i in range(0, len(blk), size)]
        h = HeadersFrame(stream, chunks[0])
        if end_stream:
            h.flags.add("END_STREAM")
        if len(chunks) == 1:
            h.flags.add("END_HEADERS")
        self.frame(h)
        for i, c in enumerate(chunks[1:], 1):
            cf = ContinuationFrame(stream, c)
            if i == len(chunks) - 1:
                cf.flags.add("END_HEADERS")
            self.frame(cf)
        return self

    def data(self, stream: int, payload: bytes, end_stream: bool = False) -> "Conn":
        f = DataFrame(stream, payload)
        if end_stream:
            f.flags.add("END_STREAM")
        return self.frame(f)

    def bytes(self) -> bytes:
        return bytes(self.out)


def req(method: str = "GET", path: str = "/", authority: str | None = "svc.example",
        scheme: str = "https", extra=()) -> list:
    fields = [(":method", method), (":scheme", scheme)]
    if authority is not None:
        fields.append((":authority", authority))
    if path is not None:
        fields.append((":path", path))
    return fields + list(extra)


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def seeds() -> dict[str, tuple[int, int, bytes]]:
    s: dict[str, tuple[int, int, bytes]] = {}

    s["get"] = (SERVER_SETTINGS | body(12), 0, Conn().headers(
        1, req(path="/api/v1/items?limit=10", extra=[("accept", "*/*"), ("user-agent", "seed/1")]),
        end_stream=True).bytes())

    s["get_host_only"] = (EXTRA, 5, Conn().headers(
        1, req(authority=None, scheme="http", extra=[("host", "svc:8080")]), end_stream=True).bytes())

    s["head_options_star"] = (body(4), 0, Conn().headers(
        1, req("HEAD", "/h"), end_stream=True).headers(
        3, req("OPTIONS", "*"), end_stream=True).bytes())

    s["post_data"] = (SERVER_SETTINGS | body(8), 7, Conn().headers(
        1, req("POST", "/upload", extra=[("content-type", "text/plain"), ("content-length", "11")])
    ).data(1, b"hello ").data(1, b"world", end_stream=True).bytes())

    big = bytes(range(256)) + b"x" * 44
    s["post_large"] = (body(28), 0, Conn().headers(
        1, req("POST", "/big", extra=[("content-length", str(len(big)))])).data(1, big[:100]).data(
        1, big[100:], end_stream=True).bytes())

    s["post_no_length"] = (body(28), 3, Conn().headers(
        1, req("PUT", "/obj")).data(1, b"abc").data(1, b"", end_stream=True).bytes())

    s["post_end_stream_no_body"] = (0, 0, Conn().headers(
        1, req("POST", "/empty"), end_stream=True).bytes())

    # Every optional onward field at once (cookie, te, xfcc, length); stream 3
    # has a content-type that only looks like gRPC's.
    msg = grpc_message(b"\x0a\x05hello")
    s["grpc"] = (DROP_XFCC | EXTRA | SERVER_SETTINGS | body(16), 0, Conn().headers(
        1, req("POST", "/pkg.Greeter/SayHello", scheme="http",
               extra=[("content-type", "application/grpc+proto"), ("te", "trailers"),
                      ("grpc-timeout", "1S"), ("content-length", str(len(msg))),
                      ("cookie", "session=1")])
    ).data(1, msg, end_stream=True).headers(
        3, req("POST", "/pkg.Greeter/SayHello", extra=[("content-type", "application/grpz")]),
        end_stream=True).bytes())

    s["trailers"] = (body(4), 11, Conn().headers(
        1, req("POST", "/t", extra=[("te", "trailers"), ("content-type", "application/grpc")])
    ).data(1, grpc_message(b"x")).headers(
        1, [("grpc-status", "0"), ("x-checksum", "abc")], end_stream=True).bytes())

    s["cookie_crumbs"] = (SERVER_SETTINGS, 0, Conn().headers(
        1, req(extra=[("cookie", "a=1"), ("accept", "*/*"), ("cookie", "b=2"),
                      ("cookie", "c=3; d=4")]), end_stream=True).bytes())

    # Stream 3: the same authority in another case is no mismatch.
    s["authority_host_mismatch"] = (0, 0, Conn().headers(
        1, req(authority="good.example", extra=[("host", "evil.example")]),
        end_stream=True).headers(
        3, req(authority="Good.Example:443", extra=[("host", "good.example:443")]),
        end_stream=True).bytes())

    # nghttp2 checks "*" only for http and https: stream 9 reaches h2req.
    s["dot_segment"] = (0, 2, Conn().headers(
        1, req(path="/public/../admin"), end_stream=True).headers(
        3, req(path="/public/%2e%2e/admin"), end_stream=True).headers(
        5, req(path="/a%2fb"), end_stream=True).headers(
        7, req(path="*"), end_stream=True).headers(
        9, req(path="*", scheme="foo"), end_stream=True).headers(
        11, req(path="/a/..;x/b?q=/../"), end_stream=True).bytes())

    s["connect"] = (0, 0, Conn().headers(
        1, [(":method", "CONNECT"), (":authority", "db.internal:5432")]).data(
        1, b"\x16\x03\x01").bytes())

    many = [("x-field-%02d" % i, "value-%d" % i) for i in range(40)]
    s["fields_40"] = (0, 0, Conn().headers(1, req(extra=many), end_stream=True).bytes())
    s["fields_40_small_limits"] = (SMALL, 0, Conn().headers(
        1, req(extra=many), end_stream=True).headers(3, req(), end_stream=True).bytes())

    # Small limits (8 fields, 256 bytes): stream 1 is 8 fields and exactly
    # 256 bytes (name + value + 4 each), stream 3 one byte more, stream 5 a
    # ninth field.
    edge = req(authority="svc.example")  # 14 + 16 + 25 + 10 = 65 bytes
    s["limits_edge"] = (SMALL, 0, Conn().headers(
        1, edge + [("x-a", "a" * 41), ("x-b", "b" * 41), ("x-c", "c" * 41), ("x-d", "d" * 40)],
        end_stream=True).headers(
        3, edge + [("x-a", "a" * 41), ("x-b", "b" * 41), ("x-c", "c" * 41), ("x-d", "d" * 41)],
        end_stream=True).headers(
        5, edge + [("x-a", "a"), ("x-b", "b"), ("x-c", "c"), ("x-d", "d"), ("x-e", "e")],
        end_stream=True).bytes())

    huge = [("x-huge", "v" * 20000)]
    s["huge_value_continuation"] = (SERVER_SETTINGS, 0, Conn().headers_split(
        1, req(extra=huge), 2, end_stream=True).bytes())

    s["continuation"] = (SMALL | body(4), 9, Conn().headers_split(
        1, req("POST", "/c", extra=[("x-a", "1" * 40), ("x-b", "2" * 40), ("x-c", "3" * 40)]), 3,
    ).data(1, b"body", end_stream=True).bytes())

    s["control_frames"] = (SERVER_SETTINGS, 1, Conn().frame(PingFrame(0, b"12345678")).frame(
        SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20,
                                   SettingsFrame.MAX_FRAME_SIZE: 32768,
                                   SettingsFrame.HEADER_TABLE_SIZE: 0})).frame(
        WindowUpdateFrame(0, 1 << 16)).frame(
        PriorityFrame(1, depends_on=0, stream_weight=200)).headers(
        1, req("POST", "/w")).frame(WindowUpdateFrame(1, 1000)).frame(
        RstStreamFrame(1, 8)).frame(SettingsFrame(0, flags=["ACK"])).headers(
        3, req(), end_stream=True).bytes())

    s["goaway"] = (0, 0, Conn().headers(1, req(), end_stream=True).frame(
        GoAwayFrame(0, last_stream_id=1, error_code=0, additional_data=b"bye")).headers(
        3, req(), end_stream=True).bytes())

    # SETTINGS with a length that is not a multiple of 6: FRAME_SIZE_ERROR.
    s["malformed_settings"] = (0, 0, Conn().headers(1, req(), end_stream=True).raw(
        0x4, 0, 0, b"\x00\x03\x00\x00\x00").bytes())
    # DATA on stream 0, then an unknown frame type, then HEADERS on an even stream.
    s["malformed_frames"] = (body(4), 0, Conn().raw(0x0, 0, 0, b"x").raw(0xfa, 0, 1, b"??").raw(
        0x1, 0x5, 2, Encoder().encode([(b":method", b"GET")])).bytes())
    # Field-level mistakes nghttp2 catches: uppercase name, connection
    # field, te other than trailers, pseudo-header after a field, bad length.
    s["malformed_fields"] = (0, 0, Conn().headers(
        1, req(extra=[("X-Upper", "1")]), end_stream=True).headers(
        3, req(extra=[("connection", "close")]), end_stream=True).headers(
        5, req(extra=[("te", "gzip")]), end_stream=True).headers(
        7, [(":method", "GET"), ("accept", "*/*"), (":path", "/")], end_stream=True).headers(
        9, req("POST", "/", extra=[("content-length", "5")])).data(9, b"too long", end_stream=True)
        .bytes())

    c = Conn()
    for sid in (1, 3, 5):
        c.headers(sid, req("POST", "/s%d" % sid, extra=[("x-stream", str(sid))]))
    for i in range(3):
        for sid in (5, 1, 3):
            c.data(sid, b"chunk%d-%d" % (sid, i), end_stream=(i == 2))
    s["interleaved_streams"] = (SERVER_SETTINGS | body(8), 13, c.bytes())

    s["xfcc_spoof"] = (DROP_XFCC | EXTRA, 0, Conn().headers(
        1, req(extra=[("x-forwarded-client-cert", "By=spiffe://evil/x"),
                      ("x_forwarded_client_cert", "By=spiffe://evil/y"),
                      ("x-forwarded-client-certs", "kept")]), end_stream=True).bytes())

    # Raw: the preface is in the seed itself, fed one byte at a time.
    s["raw_preface_bytewise"] = (RAW, 1, PREFACE + Conn().headers(
        1, req("DELETE", "/r"), end_stream=True).bytes())

    return s


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "fuzz", "corpus",
                                                             "fuzz_h2")
    os.makedirs(out, exist_ok=True)
    for name, (mode, split, stream) in sorted(seeds().items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(bytes([mode, split]) + stream)
    print("%d seeds in %s" % (len(seeds()), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
