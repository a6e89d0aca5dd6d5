"""A small real HTTP server for shard tests: serves a folder on 127.0.0.1 with Range requests and
ETags (what object stores and nginx do), and can drop the connection of a chosen file's first GET
after a number of bytes, as a flaky network does. Every request is logged (path, Range header)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path


class ShardServer:
    def __init__(self, root: Path, ranges: bool = True) -> None:
        self.root, self.ranges = root, ranges
        self.drops: dict[str, int] = {}  # URL path -> bytes sent before the first GET is cut
        self.requests: list[tuple[str, str | None]] = []
        self.corrupt: set[str] = set()  # URL paths served with one byte flipped
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if self.path in server.corrupt:
                    data = data[:600] + bytes([data[600] ^ 0xFF]) + data[601:]
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                start, status = 0, 200
                wanted = self.headers.get("Range")
                if server.ranges and wanted and wanted.startswith("bytes=") and wanted.endswith("-"):
                    if self.headers.get("If-Range") in (None, etag):
                        start, status = int(wanted[6:-1]), 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                if server.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = server.drops.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the peer sees the stream end short of Content-Length
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "ShardServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
