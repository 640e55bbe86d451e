"""The review page's local HTTP server (standard library): the page, the studies as JSON, images
rendered at a window, and marks posted by the page (`medrpn.review.session`). It listens on the
loopback address by default: the images are patients'."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from medrpn.errors import DataError
from medrpn.review.page import PAGE
from medrpn.review.session import ReviewSession

LOG = logging.getLogger("medrpn.review")


def review_server(session: ReviewSession, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server for ``session`` (not started: call ``serve_forever``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif url.path == "/api/studies":
                self._send(HTTPStatus.OK, json.dumps(session.listing()).encode(), "application/json")
            elif url.path == "/api/image":
                try:
                    center = float(query["center"]) if "center" in query else None
                    width = float(query["width"]) if "width" in query else None
                    self._send(HTTPStatus.OK, session.render(query.get("key", ""), center, width), "image/png")
                except KeyError:
                    self._send(HTTPStatus.NOT_FOUND, b"no such image", "text/plain")
                except (ValueError, DataError) as error:
                    self._send(HTTPStatus.BAD_REQUEST, str(error).encode(), "text/plain")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def do_POST(self) -> None:
            if urlparse(self.path).path != "/api/marks":
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                record = session.mark(str(body["key"]), str(body["mark"]), body.get("label"))
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                self._send(HTTPStatus.BAD_REQUEST, b"expected {key, mark, label} naming a finding of this review", "text/plain")
                return
            except ValueError as error:
                self._send(HTTPStatus.BAD_REQUEST, str(error).encode(), "text/plain")
                return
            LOG.info("marked %s %s", body["key"], record["mark"])
            self._send(HTTPStatus.OK, json.dumps(record).encode(), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            return

    return ThreadingHTTPServer((host, port), Handler)
