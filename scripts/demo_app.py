#!/usr/bin/python3
"""The demo's "payments" app: a plain TCP service on loopback that answers each
line it receives with a greeting. It never sees TLS: its sidecar does that."""
import socketserver
import sys


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            text = line.decode("utf-8", "replace").strip()
            self.wfile.write(f"payments app: received {text!r}\n".encode())


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    with Server(("127.0.0.1", int(sys.argv[1])), Handler) as srv:
        srv.serve_forever()
