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

import functools
import html
import json
import urllib.parse
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from gal_jax import io_utils
from gal_jax.report import fmt, relative_url

SELECTIONS_FILE = "selections.json"
_MAX_BODY_BYTES = 1 << 20


class SelectionsError(ValueError):
    """A selections file or POST body that does not match the round's directions."""


# ----------------------------------------------------------------------------------------------
# Checking selections.


def read_selections(path: Path, record_like: dict) -> list[dict]:
    """Returns the checked entries of a selections.json file, in file order.

    Raises FileNotFoundError when the file is missing and SelectionsError, naming the file and the
    entry, when it is not JSON or names an unknown direction or image, an image of another
    direction, or a direction twice.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise SelectionsError(f"{path}: not valid JSON ({error})") from error
    return check_selections(data, record_like, source=str(path))


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


def write_review_page(workdir: Path, record_like: dict, k: int) -> Path:
    """Returns the path of `DIR/rounds/<r>/review.html`, written with `review.json` beside it.

    Args:
      workdir: the run directory DIR; image paths in record_like are relative to it.
      record_like: a round record, or anything with "round" and scored "directions" in its format.
      k: how many directions the round would query; the page shows the count against it.
    """
    workdir = Path(workdir)
    data = review_data(record_like, k)
    page_dir = workdir / "rounds" / str(data["round"])
    io_utils.write_json(page_dir / "review.json", data)
    page = page_dir / "review.html"
    io_utils.atomic_write_bytes(page, render_review_page(data, page_dir, workdir).encode("utf-8"))
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
        method: "POST", headers: {{"Content-Type": "application/json"}},
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
# The server.


class _ReviewHandler(SimpleHTTPRequestHandler):
    """Serves the workdir's files and accepts POST /selections for one round."""

    def __init__(self, *args, review: dict, target: Path, **kwargs):
        self.review, self.target = review, target  # first: the base __init__ handles the request
        super().__init__(*args, **kwargs)

    def do_POST(self):  # noqa: N802 (http.server's name)
        if urllib.parse.urlsplit(self.path).path != "/selections":
            return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path}"})
        origin = self.headers.get("Origin")
        # Another site open in the same browser must not be able to write selections.
        if origin and urllib.parse.urlsplit(origin).netloc != self.headers.get("Host"):
            return self._reply(HTTPStatus.FORBIDDEN, {"error": f"cross-origin POST from {origin}"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY_BYTES:
            return self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               {"error": f"a body of {length} bytes is too large"})
        try:
            data = json.loads(self.rfile.read(length).decode("utf-8"))
            entries = check_selections(data, self.review, source="POST /selections")
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        io_utils.write_json(self.target, {"round": self.review["round"], "selected": entries})
        return self._reply(HTTPStatus.OK, {"saved": str(self.target), "selected": len(entries)})

    def _reply(self, code: HTTPStatus, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        # One line per image request would bury the URL the person needs.
        pass


def serve_review(workdir: Path, round: int, host: str = "127.0.0.1",  # noqa: A002
                 port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Returns (server, url of the review page): a bound, not yet serving, HTTP server of DIR.

    The caller runs `server.serve_forever()` (in a thread if it must go on) and ends with
    `server.shutdown(); server.server_close()`. The page served is the one `write_review_page`
    wrote; without one, it is written from `rounds/<round>/record.json` with the record's k.
    POST /selections writes `rounds/<round>/selections.json` once `check_selections` accepts it.
    """
    workdir = Path(workdir).resolve()
    round_dir = workdir / "rounds" / str(round)
    if not (round_dir / "review.json").is_file():
        record_path = round_dir / "record.json"
        if not record_path.is_file():
            raise FileNotFoundError(
                f"round {round}: neither {round_dir / 'review.json'} nor {record_path} exists")
        record = io_utils.read_json(record_path)
        write_review_page(workdir, record, record.get("k"))
    handler = functools.partial(_ReviewHandler, directory=str(workdir),
                                review=io_utils.read_json(round_dir / "review.json"),
                                target=round_dir / SELECTIONS_FILE)
    server = ThreadingHTTPServer((host, port), handler)
    bound_host, bound_port = server.server_address[:2]
    return server, f"http://{bound_host}:{bound_port}/rounds/{round}/review.html"
