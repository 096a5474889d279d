"""The review page's local server: `gal-jax review --workdir=DIR --round=R`.

Serves one round's review page (`review.write_review_page`) and the images it shows, and saves
the person's picks, POSTed by that page, to `DIR/rounds/<r>/selections.json` once
`review.check_selections` accepts them. Saving takes the workdir's lock and never imports JAX.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import mimetypes
import os
import secrets
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from gal_jax import io_utils
from gal_jax.review import SelectionsError, short_repr, check_selections, write_review_page
from gal_jax.workdir import RoundPaths, Workdir, WorkdirBusyError

_MAX_BODY_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------
# The server. Local in every sense: any web page open in the browser can make it send requests
# here, and one whose DNS name rebinds to 127.0.0.1 even reads the answers. So it answers only
# requests addressed to 127.0.0.1:<port> or localhost:<port>, sends only the review page and the
# images it shows, and saves only POSTs from its own origin carrying the token of the page it sent.

TOKEN_HEADER = "X-GAL-Review-Token"
_TOKEN_META = '<meta name="gal-review-token" content="{token}">'
_LOOPBACK = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class _Site:
    """What one review server sends and accepts."""

    workdir: Path  # resolved; nothing outside it is ever sent
    review: dict  # review.json: what POSTed selections are checked against
    page_route: str  # "/rounds/<r>/review.html"
    files: dict[str, Path]  # URL path -> file: the page and the images it shows
    target: Path  # where a POST is saved: rounds/<r>/selections.json
    hosts: frozenset[str]  # the Host values answered: 127.0.0.1:<port> and localhost:<port>
    token: str  # new at every start; the served page carries it, a POST must send it back

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(f"http://{host}" for host in self.hosts)


class _Refusal(Exception):
    """A request answered with an HTTP error code and {"error": message}."""

    def __init__(self, code: HTTPStatus, message: str):
        super().__init__(message)
        self.code = code


class _ReviewServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the review site its handlers serve."""

    site: _Site


class _ReviewHandler(BaseHTTPRequestHandler):
    """Sends one round's review page and its images (GET, HEAD); saves POST /selections."""

    server: _ReviewServer
    timeout = 10.0  # seconds a connection may stall, e.g. a body shorter than its Content-Length
    default_request_version = "HTTP/1.0"  # errors about a garbled request line get a status line

    def do_GET(self):  # noqa: N802 (http.server's names)
        self._answer(self._send_file)

    def do_HEAD(self):  # noqa: N802
        self._answer(self._send_file)

    def do_POST(self):  # noqa: N802
        self._answer(self._save_selections)

    def _answer(self, respond) -> None:
        try:
            respond()
        except _Refusal as refusal:
            self._reply(refusal.code, {"error": str(refusal)})

    def _send_file(self) -> None:
        self._check_host()
        site = self.server.site
        route = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        body = _read_inside(site.files[route], site.workdir) if route in site.files else None
        if body is None:
            raise _Refusal(HTTPStatus.NOT_FOUND,
                           f"{route}: not found (only the review page of round "
                           f"{site.review['round']} and its images are served)")
        if route == site.page_route:
            self._send(HTTPStatus.OK, _with_token(body, site.token), "text/html; charset=utf-8")
        else:
            kind = mimetypes.guess_type(route)[0] or "application/octet-stream"
            self._send(HTTPStatus.OK, body, kind)

    def _save_selections(self) -> None:
        # The body first: refused before it is read, it would reset the connection under the reply.
        body = self._read_body()
        self._check_host()
        site = self.server.site
        if urllib.parse.urlsplit(self.path).path != "/selections":
            raise _Refusal(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path}")
        origin = self._single_header("Origin")
        if origin not in site.origins:
            raise _Refusal(HTTPStatus.FORBIDDEN,
                           f"cross-origin POST from {short_repr(origin)}: only the review page this "
                           f"server sent may save")
        token = (self._single_header(TOKEN_HEADER) or "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(token, site.token.encode("ascii")):
            raise _Refusal(HTTPStatus.FORBIDDEN,
                           f"missing or wrong {TOKEN_HEADER} (a page from an earlier server?): "
                           f"reload the page and save again")
        entries = _parse_selections(body, site.review)
        selections = {"round": site.review["round"], "selected": entries}
        try:
            with Workdir(site.workdir).lock("gal-jax review"):
                io_utils.write_json(site.target, selections)
        except WorkdirBusyError as error:
            raise _Refusal(HTTPStatus.CONFLICT, f"not saved: {error}") from None
        except OSError as error:
            raise _Refusal(HTTPStatus.INTERNAL_SERVER_ERROR,
                           f"not saved: cannot write {site.target} ({error})") from None
        self._reply(HTTPStatus.OK, {"saved": str(site.target), "selected": len(entries)})

    def _check_host(self) -> None:
        """Raises _Refusal unless the request is addressed to this server by its loopback name."""
        host, hosts = self._single_header("Host"), self.server.site.hosts
        if host not in hosts:
            raise _Refusal(HTTPStatus.BAD_REQUEST,
                           f"request addressed to host {short_repr(host)}; this server answers only "
                           f"{' or '.join(sorted(hosts))}")

    def _read_body(self) -> bytes:
        """Returns the body: exactly Content-Length (ASCII digits, at most 1 MiB) bytes."""
        if "Transfer-Encoding" in self.headers:
            raise _Refusal(HTTPStatus.LENGTH_REQUIRED,
                           "send the body with a Content-Length, not a Transfer-Encoding")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _Refusal(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length header")
        text = values[0].strip(" \t")
        if len(values) > 1 or not (text.isascii() and text.isdigit()):
            raise _Refusal(HTTPStatus.BAD_REQUEST,
                           f"Content-Length must be one number of bytes, got {short_repr(values)}")
        digits = text.lstrip("0") or "0"
        if len(digits) > len(str(_MAX_BODY_BYTES)) or int(digits) > _MAX_BODY_BYTES:
            raise _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"a body of {short_repr(digits)} bytes is too large "
                           f"(at most {_MAX_BODY_BYTES})")
        length = int(digits)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise _Refusal(HTTPStatus.BAD_REQUEST,
                           f"the body stalled for {self.timeout} s before the {length} bytes its "
                           f"Content-Length announced") from None
        if len(body) != length:
            raise _Refusal(HTTPStatus.BAD_REQUEST,
                           f"the body has {len(body)} bytes; its Content-Length announced {length}")
        return body

    def _single_header(self, name: str) -> str | None:
        """Returns the value of a header sent exactly once, else None."""
        values = self.headers.get_all(name) or []
        return values[0] if len(values) == 1 else None

    def _reply(self, code: HTTPStatus, payload: dict) -> None:
        self._send(code, json.dumps(payload).encode("utf-8"), "application/json")

    def _send(self, code: HTTPStatus, body: bytes, content_type: str) -> None:
        """Sends a response (the body left out for HEAD) that no other site may frame or sniff."""
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """Answers http.server's own errors (a malformed request, another method) as JSON."""
        self.close_connection = True
        self._reply(code, {"error": message or HTTPStatus(code).phrase})

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        # One line per image request would bury the URL the person needs.
        pass


def _read_inside(path: Path, root: Path) -> bytes | None:
    """Returns the bytes of the file at path, or None unless it is one, inside root (links too)."""
    try:
        real = path.resolve(strict=True)
        return real.read_bytes() if real.is_relative_to(root) and real.is_file() else None
    except OSError:
        return None


def _with_token(page: bytes, token: str) -> bytes:
    """Returns the page with the server's token in a meta element, where its script finds it."""
    head = b"<head>"
    if head not in page:
        raise _Refusal(HTTPStatus.INTERNAL_SERVER_ERROR,
                       "the review page has no <head> to put the token in; rewrite it "
                       "(write_review_page)")
    return page.replace(head, head + _TOKEN_META.format(token=token).encode("ascii"), 1)


def _parse_selections(body: bytes, review: dict) -> list[dict]:
    """Returns the checked selections of a POST body; raises _Refusal (400) naming the problem."""
    source, bad = "POST /selections", HTTPStatus.BAD_REQUEST
    try:
        data = json.loads(body.decode("utf-8"))
        return check_selections(data, review, source=source)
    except UnicodeDecodeError as error:
        raise _Refusal(bad, f"{source}: the body is not UTF-8 ({error})") from None
    except json.JSONDecodeError as error:
        raise _Refusal(bad, f"{source}: the body is not JSON ({error})") from None
    except SelectionsError as error:
        raise _Refusal(bad, str(error)) from None
    except RecursionError:
        raise _Refusal(bad, f"{source}: the body is nested too deeply") from None


def _served_files(workdir: Path, paths: RoundPaths, review: dict) -> dict[str, Path]:
    """Returns {URL path: file} of the review page and of the images under workdir it shows."""
    images = [io_utils.resolve(workdir, image["path"])
              for direction in review["directions"] for image in direction["images"]]
    routes = {_route(workdir, path): path for path in [paths.review_html, *images]}
    routes.pop(None, None)  # images outside the workdir are never sent
    return routes


def _route(workdir: Path, path: Path) -> str | None:
    """Returns the URL path of a file under workdir ("/rounds/2/review.html"), None for others."""
    relative = os.path.relpath(os.path.normpath(path), workdir)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return None
    return "/" + Path(relative).as_posix()


def serve_review(workdir: Path, round: int,  # noqa: A002
                 port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Returns (server, url of the review page): a bound, not yet serving, HTTP server on 127.0.0.1.

    The caller runs `server.serve_forever()` (in a thread if it must go on) and ends with
    `server.shutdown(); server.server_close()`. The page served is the one `write_review_page`
    wrote, with a token new at each start; without a page, it is written from
    `rounds/<round>/record.json` with the record's k. GET and HEAD send the page and the images it
    shows, nothing else. POST /selections, from the page, writes `rounds/<round>/selections.json`
    under the workdir's lock once `check_selections` accepts it.
    """
    workdir = Path(workdir).resolve()
    paths = Workdir(workdir).round(round)
    if not paths.review_json.is_file():
        if not paths.record.is_file():
            raise FileNotFoundError(
                f"round {round}: neither {paths.review_json} nor {paths.record} exists")
        record = Workdir(workdir).read_record(round)
        write_review_page(workdir, record.round, record.directions, record.k)
    review = io_utils.read_json(paths.review_json)
    server = _ReviewServer((_LOOPBACK, port), _ReviewHandler)
    port = server.server_address[1]
    page_route = _route(workdir, paths.review_html)
    server.site = _Site(workdir=workdir, review=review, page_route=page_route,
                        files=_served_files(workdir, paths, review),
                        target=paths.selections,
                        hosts=frozenset({f"{_LOOPBACK}:{port}", f"localhost:{port}"}),
                        token=secrets.token_urlsafe(32))
    return server, f"http://{_LOOPBACK}:{port}{page_route}"
