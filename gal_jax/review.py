"""Human feedback: a review page to pick directions and images, and the selections file it saves.

`write_review_page` writes `DIR/rounds/<r>/review.html` (and `review.json`, the same data for the
server): every scored direction with its images and similarities, ranked by entropy as the
uncertainty rule ranks them, the rule's own pick pre-ticked as a suggestion. A person ticks
directions, clicks one image per ticked direction and saves (nothing ticked: GAL stops there). A
static page cannot write files, so saving works two ways:
- served by `review_server.serve_review` (`gal-jax review --workdir=DIR --round=r`), the page POSTs to
  /selections and the server writes `DIR/rounds/<r>/selections.json` after checking it;
- opened as a file, the page downloads `selections.json`, which the person puts in DIR/rounds/<r>/.
`read_selections` checks that file against the round's directions before the driver uses it:
  {"round": r, "selected": [{"prompt_id": int, "prompt": str, "image": "rounds/r/images/....png"}]}
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

from gal_jax import acquisition, io_utils
from gal_jax.records import Direction, to_json
from gal_jax.report_html import fmt, relative_url
from gal_jax.workdir import Workdir


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
            f'{source}: expected {{"round": r, "selected": [...]}}, got {short_repr(data)}')
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
        raise SelectionsError(f"{where}: expected an object, got {short_repr(entry)}")
    for key, kind in (("prompt_id", int), ("prompt", str), ("image", str)):
        value = entry.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SelectionsError(f"{where}: {key!r} must be {kind.__name__}, got {short_repr(value)}")
    return {"prompt_id": entry["prompt_id"], "prompt": entry["prompt"], "image": entry["image"]}


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------
# The page.


def review_data(record_like: dict, k: int) -> dict:
    """Returns what the review page shows: round, k and the directions by rank, with a suggestion.

    The directions come sorted as the uncertainty rule ranks them (entropy H, highest first, ties
    by pool order), each with its "rank" and "best_image" (the path of its highest-sim_anchor
    image). The k the rule would query (the top k, when at least k have H > 0; none otherwise) are
    "suggested"; the person may change the suggestion.
    """
    if not isinstance(record_like.get("round"), int):
        raise SelectionsError(
            f"record to review has no integer 'round': {short_repr(record_like.get('round'))}")
    if not isinstance(k, int) or k < 1:
        raise SelectionsError(f"k must be an integer >= 1, got {k!r}")
    directions = list(directions_by_id(record_like).items())
    if not directions:
        raise SelectionsError(f"round {record_like['round']} has no directions to review")
    entropies = [_number(d, "entropy", f"direction {pid}") for pid, d in directions]
    order = acquisition.top_k_uncertain(entropies, len(directions))
    suggested = set() if acquisition.should_stop(entropies, k) else set(order[:k])
    return {
        "round": record_like["round"],
        "k": k,
        "directions": [
            {"prompt_id": pid, "prompt": d["prompt"], "overfit_rate": d.get("overfit_rate"),
             "entropy": d["entropy"], "rank": rank, "images": d["images"],
             "best_image": _best_image(pid, d), "suggested": position in suggested}
            for rank, position in enumerate(order, 1)
            for pid, d in [directions[position]]
        ],
    }


def _best_image(pid: int, direction: dict) -> str:
    """Returns the path of the direction's image with the highest sim_anchor (the first on ties)."""
    images = direction["images"]
    anchors = [_number(image, "sim_anchor", f"direction {pid}: image {i}")
               for i, image in enumerate(images)]
    return images[acquisition.best_image(anchors)]["path"]


def _number(entry: dict, key: str, where: str) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SelectionsError(f"{where}: {key!r} must be a number, got {short_repr(value)}")
    return float(value)


def render_review_page(data: dict, page_dir: Path, workdir: Path) -> str:
    """Returns the review page HTML for review_data output; image links are relative to page_dir."""
    r, k = data["round"], data["k"]
    target = (Path(workdir).resolve() / "rounds" / str(r)).as_posix()
    sections = "\n".join(_direction_html(d, page_dir, workdir) for d in data["directions"])
    suggested = sum(d["suggested"] for d in data["directions"])
    if suggested:
        suggestion = (f"Pre-ticked, <b>suggested by the uncertainty rule</b>: the {suggested} "
                      f"direction(s) it would query (the top k = {k} by H), each with its image of "
                      "highest anchor similarity. Change the suggestion as you see fit.")
    else:
        suggestion = (f"Nothing is pre-ticked: fewer than k = {k} directions have H &gt; 0, so the "
                      "uncertainty rule would stop here. Saving with nothing ticked ends GAL at "
                      "this round (its model becomes the final one).")
    return _PAGE.format(
        round=r, k=k, target=_e(target), sections=sections, suggestion=suggestion,
        # Raw JSON in a script element: entities are not decoded there, and an escaped "<" keeps
        # a "</script>" inside a string from ending the element.
        config=json.dumps({"round": r, "k": k, "target": target}).replace("<", "\\u003c"),
    )


def _direction_html(direction: dict, page_dir: Path, workdir: Path) -> str:
    best, suggested = direction["best_image"], direction["suggested"]
    picks = []
    for i, image in enumerate(direction["images"]):
        plain = image.get("sim_plain") or []
        tags = ("<span class=ovf>OVF</span>" if image.get("overfit") else "") + (
            "<span class=ovf>MIX</span>" if image.get("identity_mixed") else "") + (
            "<span class=best>top anchor</span>" if image["path"] == best else "")
        src = relative_url(io_utils.resolve(workdir, image["path"]), page_dir)
        classes = "pick" + (" overfit" if image.get("overfit") or image.get("identity_mixed") else "") + (
            " selected" if suggested and image["path"] == best else "")
        picks.append(
            f'<button type=button class="{classes}" data-path="{_e(image["path"])}">'
            f'<img src="{src}" alt="image {i}" loading=lazy>'
            f'<span class=caption>anchor {fmt(image.get("sim_anchor"), ".3f")} · plain '
            f'{fmt(max(plain) if plain else None, ".3f")}<br>'
            f'seed {_e(image.get("seed", "–"))} {tags}</span></button>')
    badge = " <span class=suggested>suggested</span>" if suggested else ""
    return (
        f'<section class=direction data-prompt-id="{_e(direction["prompt_id"])}" '
        f'data-prompt="{_e(direction["prompt"])}" data-rank="{direction["rank"]}">'
        f'<label class=head><input type=checkbox class=tick{" checked" if suggested else ""}> '
        f'<span class=rank>#{direction["rank"]}</span> <b>{_e(direction["prompt"])}</b></label>'
        f'<span class=meta>overfit rate p {fmt(direction.get("overfit_rate"), ".2f")} · H '
        f'{fmt(direction.get("entropy"), ".3f")}</span>{badge} <span class=need>pick an image'
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
<link rel="icon" href="data:,">
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
.grid {{ display: flex; flex-wrap: nowrap; overflow-x: auto; gap: 8px; margin-top: .5em;
         padding-bottom: 4px; }}
.pick {{ flex: 0 0 auto; border: 4px solid #d0d0d0; background: #fff; padding: 0; width: 168px;
        cursor: pointer; text-align: left; }}
.pick img {{ width: 160px; height: 160px; object-fit: contain; display: block; }}
.pick.overfit {{ border-color: #e8a0a0; }}
.pick.selected {{ border-color: #2ca02c; box-shadow: 0 0 0 3px #2ca02c; }}
.direction:not(.ticked) .pick.selected {{ opacity: .55; }}
.caption {{ display: block; font-size: 12px; padding: 2px 4px; }}
.ovf {{ color: #d62728; font-weight: 700; margin-left: .3em; }}
.best {{ color: #555; margin-left: .3em; }}
.rank {{ color: #555; font-weight: 700; }}
.suggested {{ background: #2ca02c; color: #fff; border-radius: 4px; padding: 0 .4em;
             margin-left: .6em; font-size: 13px; }}
</style></head><body>
<h1>Round {round}: pick directions and images</h1>
<p>Tick the directions to add as references (the round queries k = {k}), and click one image in
each ticked direction (clicking an image also ticks its direction). The directions are ranked by
the entropy H of their overfit rate p, highest first (ties in pool order), as the uncertainty rule
ranks them. Under each image: its CLIP similarity to the direction's prompt (anchor) and the
highest similarity to a plain reference prompt (plain); OVF marks images that look more like the
references than like the prompt (anchor &le; plain).</p>
<p id=suggestion>{suggestion}</p>
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
      : !ticked.length ? "(nothing ticked: saving ends GAL at this round)"
      : ticked.length !== config.k ? `(not k = ${{config.k}})` : "";
  byId("save").disabled = byId("download").disabled = missing.length > 0;
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
