"""A gRPC app for the HTTP/2 tests: Python's grpcio (Debian python3-grpcio) with generic
handlers on raw bytes, so no generated code is needed. Service "mesh.Echo":

  Unary          echoes the request; metadata "fail" = "<code>" aborts with that code;
                 "sleep-ms" sleeps first (the deadline tests)
  ServerStream   request b"<count>:<size>": count messages of size bytes each
  ClientStream   returns sha256 of all request messages joined, and their count
  Bidi           echoes each message as it arrives
  Forbidden      echoes (the allow list forbids it)

Every call is recorded with its metadata (what the app saw)."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent import futures

import grpc

import harness as h

SERVICE = "mesh.Echo"


class GrpcApp:
    def __init__(self, *, name: str = "grpcapp"):
        self.name = name
        self.calls: list[dict] = []
        self.cancelled: list[str] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                  options=[("grpc.max_receive_message_length", 64 << 20),
                                           ("grpc.max_send_message_length", 64 << 20)])
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            "Forbidden": grpc.unary_unary_rpc_method_handler(self._unary),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port(f"{h.HOST}:0")
        self.server.start()

    @property
    def addr(self) -> str:
        return h.addr(self.port)

    def ncalls(self) -> int:
        with self._lock:
            return len(self.calls)

    def _record(self, method: str, ctx) -> dict:
        md = {k: v for k, v in ctx.invocation_metadata()}
        rec = {"method": method, "metadata": md, "done": False}
        with self._lock:
            self.calls.append(rec)

        def gone():
            if not rec["done"]:
                with self._lock:
                    self.cancelled.append(method)
        ctx.add_callback(gone)
        return rec

    def _unary(self, request: bytes, ctx) -> bytes:
        rec = self._record("Unary", ctx)
        md = rec["metadata"]
        if "sleep-ms" in md:
            time.sleep(int(md["sleep-ms"]) / 1000)
        if "fail" in md:
            rec["done"] = True
            code = next(c for c in grpc.StatusCode if c.value[0] == int(md["fail"]))
            ctx.abort(code, "the app says no")
        rec["done"] = True
        ctx.set_trailing_metadata((("x-app-trailer", "kept"),))
        return request

    def _server_stream(self, request: bytes, ctx):
        rec = self._record("ServerStream", ctx)
        count, size = (int(x) for x in request.decode().split(":"))
        for i in range(count):
            if not ctx.is_active():
                return
            yield h.pattern_bytes(size, seed=i)
        rec["done"] = True

    def _client_stream(self, it, ctx) -> bytes:
        rec = self._record("ClientStream", ctx)
        d = hashlib.sha256()
        n = 0
        for m in it:
            d.update(m)
            n += 1
        rec["done"] = True
        return f"{n}:{d.hexdigest()}".encode()

    def _bidi(self, it, ctx):
        rec = self._record("Bidi", ctx)
        for m in it:
            yield m
        rec["done"] = True

    def stop(self) -> None:
        self.server.stop(grace=None)
