"""An HTTP/2 (h2c, prior knowledge) app for the tests, on python3-h2 and raw sockets: it
records every request (pseudo-headers, fields, body) and answers by path:

  /trailers     200, body "with trailers", then trailers x-trailer: yes, grpc-status: 0
  /big?n=N      200, N pattern bytes (harness.pattern_bytes), no content-length
  /status?code=N  N with a short body
  /goaway       200 like /echo, then GOAWAY naming this stream as the last one; the
                connection stays open until the peer closes it
  anything else 200, JSON summary of the request (method, path, authority, fields, body
                length and sha256), with content-length
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions

import harness as h


class H2Req:
    def __init__(self, stream_id: int, headers: list[tuple[str, str]]):
        self.stream_id = stream_id
        self.headers = headers
        self.body = bytearray()
        self.ended = False

    def hv(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def one(self, name: str) -> str | None:
        v = self.hv(name)
        return v[0] if v else None


class H2App:
    def __init__(self, name: str = "h2app"):
        self.name = name
        self.requests: list[H2Req] = []
        self.conns = 0
        self.closed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((h.HOST, 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name=f"{name}-{self.port}").start()

    @property
    def addr(self) -> str:
        return h.addr(self.port)

    def nreq(self) -> int:
        with self._lock:
            return len(self.requests)

    def reqs_since(self, n: int) -> list[H2Req]:
        with self._lock:
            return list(self.requests[n:])

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                s, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.conns += 1
                self._socks.append(s)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _answer(self, conn, req: H2Req) -> None:
        path = req.one(":path") or "/"
        u = urlsplit(path)
        q = parse_qs(u.query)
        sid = req.stream_id
        if u.path == "/trailers":
            conn.send_headers(sid, [(":status", "200"), ("content-type", "text/plain")])
            conn.send_data(sid, b"with trailers")
            conn.send_headers(sid, [("x-trailer", "yes"), ("grpc-status", "0")], end_stream=True)
            return
        if u.path == "/big":
            n = int(q["n"][0])
            conn.send_headers(sid, [(":status", "200")])
            self._pending[sid] = memoryview(h.pattern_bytes(n))
            return
        if u.path == "/goaway":
            conn.send_headers(sid, [(":status", "200"), ("content-length", "2")])
            conn.send_data(sid, b"ok", end_stream=True)
            conn.close_connection(last_stream_id=sid)
            return
        if u.path == "/status":
            code = q["code"][0]
            body = f"status {code}".encode()
            conn.send_headers(sid, [(":status", code), ("content-length", str(len(body)))])
            conn.send_data(sid, body, end_stream=True)
            return
        body = json.dumps({
            "method": req.one(":method"), "path": path, "authority": req.one(":authority"),
            "scheme": req.one(":scheme"),
            "fields": [[k, v] for k, v in req.headers if not k.startswith(":")],
            "body_len": len(req.body), "sha256": hashlib.sha256(req.body).hexdigest(),
        }).encode()
        conn.send_headers(sid, [(":status", "200"), ("content-type", "application/json"),
                                ("content-length", str(len(body)))])
        conn.send_data(sid, body, end_stream=True)

    def _pump(self, conn) -> None:
        """Sends pending big bodies as far as the windows allow."""
        for sid, mv in list(self._pending.items()):
            while mv:
                room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk, mv = mv[:room], mv[room:]
                conn.send_data(sid, bytes(chunk), end_stream=not mv)
            if mv:
                self._pending[sid] = mv
            else:
                del self._pending[sid]

    def _serve(self, s: socket.socket) -> None:
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        conn = h2.connection.H2Connection(config=cfg)
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        self._pending: dict[int, memoryview] = {}
        reqs: dict[int, H2Req] = {}
        s.settimeout(0.5)
        while not self._stop.is_set():
            try:
                data = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                break  # after our GOAWAY h2 takes nothing more: close
            for ev in events:
                if isinstance(ev, h2.events.RequestReceived):
                    r = H2Req(ev.stream_id, list(ev.headers))
                    reqs[ev.stream_id] = r
                    with self._lock:
                        self.requests.append(r)
                elif isinstance(ev, h2.events.DataReceived):
                    reqs[ev.stream_id].body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    r = reqs.get(ev.stream_id)
                    if r:
                        r.ended = True
                        self._answer(conn, r)
                elif isinstance(ev, h2.events.StreamReset):
                    self._pending.pop(ev.stream_id, None)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    break
            self._pump(conn)
            out = conn.data_to_send()
            if out:
                try:
                    s.sendall(out)
                except OSError:
                    break
        try:
            s.close()
        except OSError:
            pass
        with self._lock:
            self.closed += 1

    def stop(self) -> None:
        self._stop.set()
        try:
            self.lsock.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
