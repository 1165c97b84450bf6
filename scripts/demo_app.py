#!/usr/bin/python3
"""The demo's "payments" app, two ways, both plaintext on loopback (its sidecar
does all the TLS):
  demo_app.py PORT        a TCP service that answers each line with a greeting;
  demo_app.py --http PORT an HTTP/1.1 service that answers every request with
                          JSON naming the caller its sidecar vouched for."""
import http.server
import json
import socketserver
import sys


class LineHandler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            text = line.decode("utf-8", "replace").strip()
            self.wfile.write(f"payments app: received {text!r}\n".encode())


class HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        body = json.dumps({"app": "payments", "method": self.command, "path": self.path,
                           "x-forwarded-client-cert":
                               self.headers.get_all("x-forwarded-client-cert")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = answer

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    http_mode = sys.argv[1] == "--http"
    port = int(sys.argv[-1])
    with Server(("127.0.0.1", port), HttpHandler if http_mode else LineHandler) as srv:
        srv.serve_forever()
