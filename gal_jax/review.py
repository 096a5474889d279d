"""Human feedback: a review page to pick directions and images, and the selections file it saves.

`write_review_page` writes `DIR/rounds/<r>/review.html` (and `review.json`, the same data for the
server): every scored direction with its images and similarities. A person ticks directions,
clicks one image per ticked direction and saves. A static page cannot write files, so saving works
two ways:
- served by `serve_review` (`gal-jax review --workdir=DIR --round=r`), the page POSTs to
  /selections and the server writes `DIR/rounds/<r>/selections.json` after checking it;
- opened as a file, the page downloads `selections.json`, which the person puts in DIR/rounds/<r>/.
`read_selections` checks that file against the round's directions before the driver uses it:
  {"round": r, "selected": [{"prompt_id": int, "prompt": str, "image": "rounds/r/images/....png"}]}
"""

from __future__ import annotations

import dataclasses
import hmac
import html
import json
import mimetypes
import os
import secrets
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

from gal_jax import io_utils
from gal_jax.records import Direction, to_json
from gal_jax.report import fmt, relative_url
from gal_jax.workdir import RoundPaths, Workdir, WorkdirBusyError

_MAX_BODY_BYTES = 1 << 20


class SelectionsError(ValueError):
    """A selections file or POST body that does not match the round's directions."""


# ----------------------------------------------------------------------------------------------
# Checking selections.


def read_selections(path: Path, round_index: int, directions: Sequence[Direction]) -> list[dict]:
    """Returns the checked entries of a selections.json file for a round's scored directions.

    Raises FileNotFoundError when the file is missing and SelectionsError, naming the file and the
    entry, when it is not JSON or names an unknown direction or image, an image of another
    direction, or a direction twice.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise SelectionsError(f"{path}: not valid JSON ({error})") from error
    return check_selections(data, _record_like(round_index, directions), source=str(path))


def _record_like(round_index: int, directions: Sequence[Direction]) -> dict:
    """Returns the page's data layout of a round's directions (as review.json holds them)."""
    return {"round": round_index, "directions": [to_json(d) for d in directions]}


def check_selections(data, record_like: dict, source: str) -> list[dict]:
    """Returns [{"prompt_id", "prompt", "image"}] of parsed selections, checked against a record."""
    if not isinstance(data, dict) or not isinstance(data.get("selected"), list):
        raise SelectionsError(
            f'{source}: expected {{"round": r, "selected": [...]}}, got {_short(data)}')
    if "round" in record_like and data.get("round") != record_like["round"]:
        raise SelectionsError(
            f"{source}: round {data.get('round')!r} does not match round {record_like['round']}")
    directions = directions_by_id(record_like)
    owners = {image["path"]: pid for pid, d in directions.items() for image in d["images"]}
    entries, seen = [], set()
    for i, entry in enumerate(data["selected"]):
        where = f"{source}: selected[{i}]"
        entry = _entry_fields(entry, where)
        pid, prompt, image = entry["prompt_id"], entry["prompt"], entry["image"]
        if pid not in directions:
            raise SelectionsError(f"{where}: unknown prompt_id {pid} (known: {sorted(directions)})")
        if prompt != directions[pid]["prompt"]:
            expected = directions[pid]["prompt"]
            raise SelectionsError(
                f"{where}: prompt {prompt!r} is not direction {pid}'s {expected!r}")
        if pid in seen:
            raise SelectionsError(f"{where}: direction {pid} ({prompt!r}) is selected twice")
        if image not in owners:
            raise SelectionsError(f"{where}: image {image!r} is not an image generated this round")
        if owners[image] != pid:
            raise SelectionsError(
                f"{where}: image {image!r} belongs to direction {owners[image]}, not {pid}")
        seen.add(pid)
        entries.append(entry)
    return entries


def directions_by_id(record_like: dict) -> dict[int, dict]:
    """Returns the directions keyed by prompt_id (their position where a direction has none)."""
    directions, where = record_like.get("directions"), f"round {record_like.get('round', '?')}"
    if not isinstance(directions, list):
        raise SelectionsError(f"{where}: no 'directions' list to review")
    keyed = {}
    for position, direction in enumerate(directions):
        pid = direction.get("prompt_id", position)
        if pid in keyed:
            raise SelectionsError(f"{where}: prompt_id {pid} appears twice")
        keyed[pid] = direction
    return keyed


def _entry_fields(entry, where: str) -> dict:
    """Returns the entry's prompt_id, prompt and image, raising if one is missing or mistyped."""
    if not isinstance(entry, dict):
        raise SelectionsError(f"{where}: expected an object, got {_short(entry)}")
    for key, kind in (("prompt_id", int), ("prompt", str), ("image", str)):
        value = entry.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SelectionsError(f"{where}: {key!r} must be {kind.__name__}, got {_short(value)}")
    return {"prompt_id": entry["prompt_id"], "prompt": entry["prompt"], "image": entry["image"]}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------
# The page.


def review_data(record_like: dict, k: int) -> dict:
    """Returns what the review page shows: round, k and each direction's prompt and images."""
    if not isinstance(record_like.get("round"), int):
        raise SelectionsError(
            f"record to review has no integer 'round': {_short(record_like.get('round'))}")
    if not isinstance(k, int) or k < 1:
        raise SelectionsError(f"k must be an integer >= 1, got {k!r}")
    directions = directions_by_id(record_like)
    if not directions:
        raise SelectionsError(f"round {record_like['round']} has no directions to review")
    return {
        "round": record_like["round"],
        "k": k,
        "directions": [
            {"prompt_id": pid, "prompt": d["prompt"], "overfit_rate": d.get("overfit_rate"),
             "entropy": d.get("entropy"), "images": d["images"]}
            for pid, d in directions.items()
        ],
    }


def render_review_page(data: dict, page_dir: Path, workdir: Path) -> str:
    """Returns the review page HTML for review_data output; image links are relative to page_dir."""
    r, k = data["round"], data["k"]
    target = (Path(workdir).resolve() / "rounds" / str(r)).as_posix()
    sections = "\n".join(_direction_html(d, page_dir, workdir) for d in data["directions"])
    return _PAGE.format(
        round=r, k=k, target=_e(target), sections=sections,
        # Raw JSON in a script element: entities are not decoded there, and an escaped "<" keeps
        # a "</script>" inside a string from ending the element.
        config=json.dumps({"round": r, "k": k, "target": target}).replace("<", "\\u003c"),
    )


def _direction_html(direction: dict, page_dir: Path, workdir: Path) -> str:
    anchors = [image.get("sim_anchor") for image in direction["images"]]
    best = anchors.index(max(anchors)) if anchors and None not in anchors else None
    picks = []
    for i, image in enumerate(direction["images"]):
        plain = image.get("sim_plain") or []
        tags = ("<span class=ovf>OVF</span>" if image.get("overfit") else "") + (
            "<span class=best>top anchor</span>" if i == best else "")
        src = relative_url(io_utils.resolve(workdir, image["path"]), page_dir)
        picks.append(
            f'<button type=button class="pick{" overfit" if image.get("overfit") else ""}" '
            f'data-path="{_e(image["path"])}"><img src="{src}" alt="image {i}" loading=lazy>'
            f'<span class=caption>anchor {fmt(image.get("sim_anchor"), ".3f")} · plain '
            f'{fmt(max(plain) if plain else None, ".3f")}<br>'
            f'seed {_e(image.get("seed", "–"))} {tags}</span></button>')
    return (
        f'<section class=direction data-prompt-id="{_e(direction["prompt_id"])}" '
        f'data-prompt="{_e(direction["prompt"])}"><label class=head><input type=checkbox '
        f'class=tick> <b>{_e(direction["prompt"])}</b></label> <span class=meta>overfit rate '
        f'{fmt(direction.get("overfit_rate"), ".2f")} · H '
        f'{fmt(direction.get("entropy"), ".3f")}</span> <span class=need>pick an image'
        f'</span><div class=grid>{"".join(picks)}</div></section>'
    )


def write_review_page(workdir: Path, round_index: int, directions: Sequence[Direction], k: int) -> Path:
    """Returns the path of `DIR/rounds/<r>/review.html`, written with `review.json` beside it.

    Args:
      workdir: the run directory DIR; image paths of the directions are relative to it.
      round_index: the round r whose generated images are reviewed.
      directions: the round's scored directions.
      k: how many directions the round would query; the page shows the count against it.
    """
    workdir = Path(workdir)
    data = review_data(_record_like(round_index, directions), k)
    paths = Workdir(workdir).round(data["round"])
    io_utils.write_json(paths.review_json, data)
    page = paths.review_html
    io_utils.atomic_write_bytes(page, render_review_page(data, paths.dir, workdir).encode("utf-8"))
    return page


def _e(value) -> str:
    return html.escape(str(value), quote=True)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>GAL review, round {round}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1500px; padding: 0 1em 3em;
       color: #222; }}
#bar {{ position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; padding: .6em 0;
       z-index: 1; }}
#bar button {{ font-size: 15px; padding: .3em .9em; margin-left: .6em; }}
#count {{ font-weight: 700; }} #warn {{ color: #b35900; margin-left: .6em; }}
#status {{ margin-left: .8em; }}
.ok {{ color: #207a20; }} .error {{ color: #c0262d; white-space: pre-wrap; }}
.direction {{ border: 2px solid #e3e3e3; border-radius: 6px; margin: 1em 0; padding: .5em .8em; }}
.direction.ticked {{ border-color: #2ca02c; background: #f5fbf5; }}
.head {{ font-size: 16px; cursor: pointer; }} .meta {{ color: #666; margin-left: .6em; }}
.need {{ display: none; color: #b35900; margin-left: .6em; }}
.direction.missing .need {{ display: inline; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 8px; margin-top: .5em; }}
.pick {{ border: 4px solid #d0d0d0; background: #fff; padding: 0; width: 168px; cursor: pointer;
        text-align: left; }}
.pick img {{ width: 160px; height: 160px; object-fit: contain; display: block; }}
.pick.overfit {{ border-color: #e8a0a0; }}
.pick.selected {{ border-color: #2ca02c; box-shadow: 0 0 0 3px #2ca02c; }}
.direction:not(.ticked) .pick.selected {{ opacity: .55; }}
.caption {{ display: block; font-size: 12px; padding: 2px 4px; }}
.ovf {{ color: #d62728; font-weight: 700; margin-left: .3em; }}
.best {{ color: #555; margin-left: .3em; }}
</style></head><body>
<h1>Round {round}: pick directions and images</h1>
<p>Tick the directions to add as references (the round queries k = {k}), and click one image in
each ticked direction (clicking an image also ticks its direction). Under each image: its CLIP
similarity to the direction's prompt (anchor) and the highest similarity to a plain reference
prompt (plain); OVF marks images that look more like the references than like the prompt
(anchor &le; plain).</p>
<p>Save: served by <code>gal-jax review</code>, <b>Save</b> writes
<code>{target}/selections.json</code>. Opened as a file, it downloads <code>selections.json</code>:
move it into <code>{target}/</code>, then rerun <code>gal-jax run</code> with the same flags to
continue.</p>
<div id=bar><span id=count>0</span> / {k} directions chosen<span id=warn></span>
<button id=save type=button disabled>Save selections</button>
<button id=download type=button disabled>Download selections.json</button>
<span id=status></span></div>
{sections}
<script type="application/json" id=config>{config}</script>
<script>
"use strict";
const config = JSON.parse(document.getElementById("config").textContent);
const sections = Array.from(document.querySelectorAll("section.direction"));
const byId = (id) => document.getElementById(id);
const isTicked = (s) => s.querySelector("input.tick").checked;
const pickOf = (s) => s.querySelector(".pick.selected");
// Put in by `gal-jax review` when it sends the page; the server saves only POSTs carrying it.
const token = document.querySelector('meta[name="gal-review-token"]');

function selections() {{
  return {{round: config.round, selected: sections.filter(isTicked).map((s) => ({{
    prompt_id: Number(s.dataset.promptId), prompt: s.dataset.prompt,
    image: pickOf(s).dataset.path}}))}};
}}

function refresh() {{
  status("", true);  // a change after saving makes the saved file stale
  const ticked = sections.filter(isTicked);
  const missing = ticked.filter((s) => !pickOf(s));
  for (const s of sections) {{
    s.classList.toggle("ticked", isTicked(s));
    s.classList.toggle("missing", isTicked(s) && !pickOf(s));
  }}
  byId("count").textContent = ticked.length;
  byId("warn").textContent = missing.length
      ? `${{missing.length}} ticked direction(s) still need an image`
      : (ticked.length && ticked.length !== config.k ? `(not k = ${{config.k}})` : "");
  byId("save").disabled = byId("download").disabled = ticked.length === 0 || missing.length > 0;
}}

function status(text, ok) {{
  byId("status").textContent = text;
  byId("status").className = ok ? "ok" : "error";
}}

function download() {{
  const blob = new Blob([JSON.stringify(selections(), null, 2)], {{type: "application/json"}});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "selections.json";
  document.body.appendChild(link);
  link.click();
  link.remove();
  status(`Downloaded selections.json: move it into ${{config.target}}/`, true);
}}

async function save() {{
  if (!location.protocol.startsWith("http")) return download();
  try {{
    const response = await fetch("/selections", {{
        method: "POST", headers: {{"Content-Type": "application/json",
                                   "X-GAL-Review-Token": token ? token.content : ""}},
        body: JSON.stringify(selections())}});
    const reply = await response.json();
    if (response.ok) status(`Saved ${{reply.selected}} selection(s) to ${{reply.saved}}`, true);
    else status(`Not saved: ${{reply.error}}`, false);
  }} catch (error) {{
    status(`Not saved (${{error}}); use Download instead`, false);
  }}
}}

for (const s of sections) {{
  s.querySelector("input.tick").addEventListener("change", refresh);
  for (const pick of s.querySelectorAll(".pick")) {{
    pick.addEventListener("click", () => {{
      s.querySelectorAll(".pick").forEach((p) => p.classList.toggle("selected", p === pick));
      s.querySelector("input.tick").checked = true;
      refresh();
    }});
  }}
}}
byId("save").addEventListener("click", save);
byId("download").addEventListener("click", download);
refresh();
</script></body></html>
"""


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
                           f"cross-origin POST from {_short(origin)}: only the review page this "
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
                           f"request addressed to host {_short(host)}; this server answers only "
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
                           f"Content-Length must be one number of bytes, got {_short(values)}")
        digits = text.lstrip("0") or "0"
        if len(digits) > len(str(_MAX_BODY_BYTES)) or int(digits) > _MAX_BODY_BYTES:
            raise _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"a body of {_short(digits)} bytes is too large "
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
