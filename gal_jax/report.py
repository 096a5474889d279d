"""The run report: `DIR/report.html` with its PNGs under `DIR/report/`, rewritten after every round.

It shows, per round, a contact sheet per scored direction (overfit images framed red, the chosen
image green), the entropy of every direction, the chosen images with their weights, the references
the round trained on and its timings; across rounds, openness, reference count, mean overfit rate
and the evaluation metrics. Everything comes from the round records (`DIR/rounds/<r>/record.json`),
so the report can be rebuilt at any time from them alone.

The pure helpers (`round_summaries`, `contact_sheet`, `entropy_figure`, `progress_figure`,
`render_html`) turn record data into figures and text; `write_report` reads the images and writes.
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import math
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image, ImageDraw, ImageFont, ImageOps

THUMB = 128  # pixels per image in contact sheets and tables
OVERFIT_RGB = (214, 39, 40)  # matplotlib's tab:red
SELECTED_RGB = (44, 160, 44)  # tab:green
NEUTRAL_RGB = (205, 205, 205)
_UNSELECTED = "#8fa8c8"
_REQUIRED = {"round": int, "references": list, "directions": list, "selected": list, "openness": (int, float)}
_TIMING_KEYS = ("train", "generate", "score", "write")


class RecordError(ValueError):
    """A round record or evaluation entry lacks a field the report needs."""


# ----------------------------------------------------------------------------------------------
# Pure helpers: record data -> numbers, images, figures, text.


def check_records(records: Iterable[dict]) -> list[dict]:
    """Returns the records sorted by round, raising RecordError on a missing or mistyped field."""
    records = list(records)
    for position, record in enumerate(records):
        where = f"round record #{position} (round {record.get('round', '?')})"
        for key, kind in _REQUIRED.items():
            if key not in record:
                raise RecordError(f"{where}: missing field {key!r}")
            if isinstance(record[key], bool) or not isinstance(record[key], kind):
                raise RecordError(f"{where}: field {key!r} is {record[key]!r}, not {kind}")
        for d, direction in enumerate(record["directions"]):
            for key in ("prompt", "images"):
                if key not in direction:
                    raise RecordError(f"{where}: direction {d} has no {key!r}")
            if any("path" not in image for image in direction["images"]):
                raise RecordError(f"{where}: an image of direction {d} has no 'path'")
        for key in ("references", "selected"):
            if any("image" not in entry for entry in record[key]):
                raise RecordError(f"{where}: an entry of {key!r} has no 'image'")
    rounds = [record["round"] for record in records]
    if len(set(rounds)) != len(rounds):
        raise RecordError(f"round records repeat a round: {sorted(rounds)}")
    return sorted(records, key=lambda record: record["round"])


def round_summaries(records: Sequence[dict]) -> list[dict]:
    """Returns per round: references, directions, mean overfit rate and entropy, openness, choices.

    Rounds that scored no direction (the last one, or random feedback) get NaN rates and openness,
    so that plots leave a gap instead of a misleading zero.
    """
    summaries = []
    for record in records:
        directions = record["directions"]
        scored = bool(directions)
        timings = record.get("timings") or {}
        summaries.append({
            "round": record["round"],
            "references": len(record["references"]),
            "directions": len(directions),
            "mean_overfit_rate": _mean(d.get("overfit_rate") for d in directions),
            "mean_entropy": _mean(d.get("entropy") for d in directions),
            "openness": float(record["openness"]) if scored else math.nan,
            "selected": len(record["selected"]),
            "new_weight": record["selected"][0].get("weight") if record["selected"] else None,
            "stopped": bool(record.get("stopped", False)),
            "timings": {key: timings.get(key) for key in _TIMING_KEYS},
        })
    return summaries


def contact_sheet(direction: dict, thumbnails: Sequence[Image.Image], selected: set[str],
                  thumb: int = THUMB) -> Image.Image:
    """Returns one direction's images in a row: overfit framed red + "OVF", chosen framed green.

    Under each image: its sim_anchor, its highest sim_plain (overfit when anchor <= plain) and seed.
    """
    images = direction["images"]
    if len(thumbnails) != len(images):
        raise ValueError(f"{len(thumbnails)} thumbnails for {len(images)} images of {direction['prompt']!r}")
    pad, border, header, caption = 8, 4, 28, 50
    cell = thumb + 2 * border
    width = max(pad + len(images) * (cell + pad), 360)
    sheet = Image.new("RGB", (width, header + cell + caption), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), _fit_text(_direction_title(direction), _font(14), width - 2 * pad),
              fill="black", font=_font(14))
    for i, (info, thumbnail) in enumerate(zip(images, thumbnails)):
        x = pad + i * (cell + pad)
        chosen = info["path"] in selected
        frame = SELECTED_RGB if chosen else OVERFIT_RGB if info.get("overfit") else NEUTRAL_RGB
        draw.rectangle((x, header, x + cell - 1, header + cell - 1), fill=frame)
        sheet.paste(ImageOps.pad(thumbnail.convert("RGB"), (thumb, thumb), color="white"),
                    (x + border, header + border))
        _draw_caption(draw, info, chosen, x, header + cell + 3, cell)
    return sheet


def entropy_figure(round_index: int, directions: Sequence[dict], selected_prompts: set[str]) -> Figure:
    """Returns a horizontal bar chart of H per direction in pool order, the selected ones green."""
    entropies = np.nan_to_num([_number(d.get("entropy")) for d in directions])
    figure = Figure(figsize=(8, 1.3 + 0.3 * len(directions)), layout="constrained")
    axes = figure.add_subplot()
    rows = np.arange(len(directions))
    colours = [_hex(SELECTED_RGB) if d["prompt"] in selected_prompts else _UNSELECTED for d in directions]
    axes.barh(rows, entropies, color=colours)
    axes.set_yticks(rows, labels=[_shorten(d["prompt"], 52) for d in directions], fontsize=8)
    axes.invert_yaxis()
    axes.axvline(math.log(2), color="0.4", linestyle="--", linewidth=1)
    # The overfit rate p goes in a column right of the ln 2 line, where no bar can reach.
    for row, direction, entropy in zip(rows, directions, entropies):
        axes.text(math.log(2) + 0.012, row, f"H {entropy:.3f}  p {_fmt(direction.get('overfit_rate'), '.2f')}",
                  va="center", fontsize=7, color="0.25")
    axes.set_xlim(0, math.log(2) * 1.3)
    axes.set_xlabel("entropy H of the direction's overfit rate p (nats; dashed: max ln 2)", fontsize=8)
    axes.set_title(f"Round {round_index}: uncertainty per direction", fontsize=10)
    figure.legend(handles=[Patch(color=_hex(SELECTED_RGB), label="selected"),
                           Patch(color=_UNSELECTED, label="not selected")],
                  loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    return figure


def progress_figure(summaries: Sequence[dict], evaluations: Sequence[dict] | None = None) -> Figure:
    """Returns line plots across rounds: openness, references, mean overfit rate, evaluation metrics."""
    rounds = [s["round"] for s in summaries]
    panels = [("openness O = λ · mean H", "openness"), ("references trained on", "references"),
              ("mean overfit rate of scored directions", "mean_overfit_rate")]
    figure = Figure(figsize=(3.6 * (len(panels) + bool(evaluations)), 3.0), layout="constrained")
    axes = figure.subplots(1, len(panels) + bool(evaluations), squeeze=False)[0]
    for ax, (title, key) in zip(axes, panels):
        values = np.array([s[key] for s in summaries], dtype=float)
        ax.plot(rounds, values, marker="o", color="tab:blue")
        if np.isfinite(values).any() and np.nanmax(values) > 0:
            # From zero, so that a small change does not look like a large one.
            ax.set_ylim(0, 1.15 * np.nanmax(values))
        _round_axis(ax, title, rounds)
    if evaluations:
        ax = axes[-1]
        evaluations = sorted(evaluations, key=lambda e: e["round"])
        for metric in metric_names(evaluations):
            label = f"{metric} (lower is better)" if metric == "ovf" else metric
            ax.plot([e["round"] for e in evaluations], [_number(e.get(metric)) for e in evaluations],
                    marker="o", label=label)
        ax.legend(fontsize=7)
        _round_axis(ax, "evaluation on test prompts", [e["round"] for e in evaluations])
    return figure


def metric_names(evaluations: Sequence[dict]) -> list[str]:
    """Returns the numeric metric keys of the evaluation entries, in first-seen order."""
    names: dict[str, None] = {}
    for entry in evaluations:
        if "round" not in entry:
            raise RecordError(f"evaluation entry {entry!r} has no 'round'")
        for key, value in entry.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                names[key] = None
    return list(names)


def render_html(title: str, records: Sequence[dict], summaries: Sequence[dict],
                evaluations: Sequence[dict] | None, links: dict) -> str:
    """Returns the report page; `links` maps figure and image keys to URLs relative to DIR.

    Keys: "progress"; ("entropy", r); ("sheet", r, d); ("thumb", path); ("full", path).
    """
    last = records[-1]
    balance = {True: "on", False: "off"}.get(last.get("balance"), "?")
    settings = (f"feedback <b>{_e(last.get('feedback', '?'))}</b> · balance <b>{balance}</b>"
                f" · λ <b>{_e(last.get('lambda', '?'))}</b> · k <b>{_e(last.get('k', '?'))}</b>"
                f" · {len(records)} round(s) so far" + (" · <b>stopped early</b>" if summaries[-1]["stopped"] else ""))
    latest_scored = next((r for r in reversed(records) if r["directions"]), None)
    nav = " · ".join(f'<a href="#round-{r["round"]}">round {r["round"]}</a>' for r in records)
    parts = [
        _HEAD.format(title=_e(title), selected=SELECTED_RGB),
        f"<h1>{_e(title)}</h1><p class=meta>{settings}</p><p class=meta>{nav}</p>",
        f'<h2>Across rounds</h2><img class=wide src="{links["progress"]}" alt="progress plots">',
        _summary_table(summaries),
        _evaluation_table(evaluations) if evaluations else "",
        *(_round_section(record, summary, links, open_sheets=record is latest_scored)
          for record, summary in zip(records, summaries)),
        "</body></html>\n",
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# HTML pieces.

_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1500px; padding: 0 1em;
       color: #222; line-height: 1.4; }}
h1 {{ margin-bottom: .2em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }}
.meta {{ color: #555; margin: .2em 0; }}
table {{ border-collapse: collapse; margin: .6em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: middle; }}
th {{ background: #f3f3f3; }} td.text {{ text-align: left; }}
img.wide {{ max-width: 100%; height: auto; }}
.sheet {{ margin: .4em 0 1em; }} .sheet img {{ max-width: 100%; height: auto; }}
.chosen {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.chosen figure {{ margin: 0; width: 180px; font-size: 13px; }}
.chosen img {{ border: 4px solid rgb{selected}; width: 172px; height: auto; }}
.legend span {{ padding: 0 .4em; border: 3px solid; margin-right: .6em; }}
details > summary {{ cursor: pointer; font-weight: 600; margin: .5em 0; }}
</style></head><body>"""


def _summary_table(summaries: Sequence[dict]) -> str:
    header = ("<tr><th>round</th><th>references</th><th>directions</th><th>mean overfit rate</th>"
              "<th>mean H</th><th>openness</th><th>selected</th><th>new weight</th><th>stopped</th>"
              + "".join(f"<th>{key} s</th>" for key in _TIMING_KEYS) + "<th>total s</th></tr>")
    rows = []
    for s in summaries:
        times = [s["timings"][key] for key in _TIMING_KEYS]
        total = sum(t for t in times if t is not None) if any(t is not None for t in times) else None
        cells = [s["round"], s["references"], s["directions"], _fmt(s["mean_overfit_rate"], ".3f"),
                 _fmt(s["mean_entropy"], ".3f"), _fmt(s["openness"], ".3g"), s["selected"],
                 _fmt(s["new_weight"], ".3g"), "yes" if s["stopped"] else "no",
                 *(_fmt(t, ".1f") for t in times), _fmt(total, ".1f")]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return f"<table>{header}{''.join(rows)}</table>"


def _evaluation_table(evaluations: Sequence[dict]) -> str:
    names = metric_names(evaluations)
    header = "<tr><th>round</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"
    rows = ["<tr>" + f"<td>{_e(e['round'])}</td>" + "".join(f"<td>{_fmt(e.get(n), '.4f')}</td>" for n in names)
            + "</tr>" for e in sorted(evaluations, key=lambda e: e["round"])]
    return (f"<h2>Evaluation</h2><p class=meta>On the test prompts; OVF: lower is better.</p>"
            f"<table>{header}{''.join(rows)}</table>")


def _round_section(record: dict, summary: dict, links: dict, open_sheets: bool) -> str:
    r = record["round"]
    if record["directions"]:
        facts = (f"trained on {summary['references']} references · {summary['directions']} directions scored"
                 f" · openness {_fmt(summary['openness'], '.4g')}" + (" · <b>stop rule fired</b>" if summary["stopped"] else ""))
    else:
        facts = f"trained on {summary['references']} references · no direction scored (final round)"
    parts = [f'<section id="round-{r}"><h2>Round {r}</h2><p class=meta>{facts}</p>']
    if record["selected"]:
        parts.append("<h3>Chosen images (new references for the next round)</h3>" + _chosen(record["selected"], links))
    elif record["directions"]:
        parts.append("<p>No image chosen this round.</p>")
    if record["directions"]:
        parts.append(f'<h3>Uncertainty per direction</h3><img class=wide src="{links[("entropy", r)]}" '
                     f'alt="entropy per direction, round {r}">')
        parts.append(_sheets(record, links, open_sheets))
    parts.append(_references_table(record["references"], links, r))
    parts.append("</section>")
    return "\n".join(parts)


def _chosen(selected: Sequence[dict], links: dict) -> str:
    figures = [f'<figure><a href="{links[("full", s["image"])]}"><img src="{links[("thumb", s["image"])]}" '
               f'alt="chosen image"></a><figcaption>{_e(s.get("prompt", ""))}<br>weight '
               f'<b>{_fmt(s.get("weight"), ".4g")}</b></figcaption></figure>' for s in selected]
    return f'<div class=chosen>{"".join(figures)}</div>'


def _sheets(record: dict, links: dict, open_sheets: bool) -> str:
    r = record["round"]
    legend = (f'<p class="meta legend"><span style="border-color: rgb{OVERFIT_RGB}">OVF</span>overfit: '
              f'sim_anchor ≤ max sim_plain <span style="border-color: rgb{SELECTED_RGB}">chosen</span>'
              f'new reference · numbers: sim_anchor / max sim_plain / seed</p>')
    sheets = [f'<div class=sheet><img src="{links[("sheet", r, d)]}" alt="{_e(direction["prompt"])}"></div>'
              for d, direction in enumerate(record["directions"])]
    return (f"<details{' open' if open_sheets else ''}><summary>Contact sheets "
            f"({len(sheets)} directions)</summary>{legend}{''.join(sheets)}</details>")


def _references_table(references: Sequence[dict], links: dict, r: int) -> str:
    rows = [f'<tr><td><a href="{links[("full", ref["image"])]}"><img src="{links[("thumb", ref["image"])]}" '
            f'width=64 alt="reference"></a></td><td class=text>{_e(ref.get("prompt", ""))}</td>'
            f'<td>{_fmt(ref.get("weight"), ".4g")}</td><td class=text>{_e(ref.get("source", ""))}</td></tr>'
            for ref in references]
    return (f"<details><summary>References trained on in round {r} ({len(references)})</summary><table>"
            f"<tr><th>image</th><th>prompt</th><th>weight</th><th>source</th></tr>{''.join(rows)}</table></details>")


# ----------------------------------------------------------------------------------------------
# Small pure utilities.


def _direction_title(direction: dict) -> str:
    return (f"{direction['prompt']}   ·   overfit rate {_fmt(direction.get('overfit_rate'), '.2f')}"
            f"   ·   H {_fmt(direction.get('entropy'), '.3f')}")


def _draw_caption(draw: ImageDraw.ImageDraw, info: dict, chosen: bool, x: int, y: int, width: int) -> None:
    font = _font(11)
    plain = info.get("sim_plain") or []
    draw.text((x + 2, y), f"anchor {_fmt(info.get('sim_anchor'), '.3f')}", fill="black", font=font)
    draw.text((x + 2, y + 14), f"plain  {_fmt(max(plain) if plain else None, '.3f')}", fill="#555", font=font)
    draw.text((x + 2, y + 28), f"seed {info.get('seed', '–')}", fill="#777", font=font)
    tags = [(text, colour) for text, colour, on in (("OVF", OVERFIT_RGB, info.get("overfit")),
                                                    ("CHOSEN", SELECTED_RGB, chosen)) if on]
    right = x + width - 2
    for text, colour in reversed(tags):
        bold = _font(11, bold=True)
        right -= int(bold.getlength(text))
        draw.text((right, y + 28), text, fill=colour, font=bold)
        right -= 6


@functools.lru_cache(maxsize=None)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    # DejaVu ships with matplotlib, so sheets and plots share one font on every machine.
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def _fit_text(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    while font.getlength(text) > width and len(text) > 1:
        text = text[:-2] + "…"
    return text


def _round_axis(ax, title: str, rounds: Sequence[int]) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("round", fontsize=8)
    ax.set_xticks(sorted(set(rounds)))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def _mean(values: Iterable) -> float:
    numbers = [_number(v) for v in values]
    numbers = [v for v in numbers if not math.isnan(v)]
    return float(np.mean(numbers)) if numbers else math.nan


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def _e(value) -> str:
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------------------------
# Files: the only functions that read images or write.


def write_report(workdir: Path, records: list[dict], evaluations: list[dict] | None = None) -> Path:
    """Returns the path of `DIR/report.html`, (re)written with its PNGs under `DIR/report/`.

    Args:
      workdir: the run directory DIR; image paths in records are relative to it (or absolute).
      records: the round records written so far (any order), as read from rounds/<r>/record.json.
      evaluations: optional per-round metrics, e.g. {"round": r, "txt_aln": f, "img_aln": f, "ovf": f}.
    """
    workdir = Path(workdir)
    records = check_records(records)
    if not records:
        raise RecordError(f"no round records to report on in {workdir}")
    summaries = round_summaries(records)
    if evaluations:
        metric_names(evaluations)
    out = workdir / "report"
    links = {"progress": _write_png(out / "progress.png", progress_figure(summaries, evaluations), workdir)}
    for record in records:
        links.update(_write_round_figures(workdir, out / f"round_{record['round']:02d}", record))
        for entry in [*record["selected"], *record["references"]]:
            links[("thumb", entry["image"])] = _write_png(
                out / "thumbs" / f"{_path_key(entry['image'])}.png", _load_image(workdir, entry["image"], 2 * THUMB), workdir)
            links[("full", entry["image"])] = _relative_url(workdir, entry["image"])
    page = render_html(f"GAL report: {workdir.resolve().name}", records, summaries, evaluations, links)
    path = workdir / "report.html"
    atomic_write(path, page)
    return path


def _write_round_figures(workdir: Path, out: Path, record: dict) -> dict:
    """Returns the links of one round's entropy chart and contact sheets, after writing them."""
    if not record["directions"]:
        return {}
    r = record["round"]
    selected_images = {s["image"] for s in record["selected"]}
    selected_prompts = {s.get("prompt") for s in record["selected"]}
    links = {("entropy", r): _write_png(out / "entropy.png", entropy_figure(r, record["directions"], selected_prompts), workdir)}
    for d, direction in enumerate(record["directions"]):
        thumbnails = [_load_image(workdir, image["path"], THUMB) for image in direction["images"]]
        sheet = contact_sheet(direction, thumbnails, selected_images)
        links[("sheet", r, d)] = _write_png(out / f"direction_{d:02d}.png", sheet, workdir)
    return links


def _load_image(workdir: Path, path: str, size: int) -> Image.Image:
    """Returns the image at `path` (relative to workdir or absolute), shrunk to fit size x size."""
    full = _resolve(workdir, path)
    if not full.is_file():
        raise FileNotFoundError(f"image {path!r} named in a round record is missing: {full}")
    with Image.open(full) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at reduced scale
        image = image.convert("RGB")
    image.thumbnail((size, size))
    return image


def _write_png(path: Path, figure: Figure | Image.Image, workdir: Path) -> str:
    """Returns path's URL relative to workdir, after writing the figure or image there as PNG."""
    buffer = io.BytesIO()
    if isinstance(figure, Figure):
        figure.savefig(buffer, format="png", dpi=110)
    else:
        figure.save(buffer, format="PNG", optimize=False)
    atomic_write(path, buffer.getvalue())
    return _relative_url(workdir, path)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Writes data to path through a temporary file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(payload)
        os.chmod(temporary, 0o644)  # mkstemp makes files private; reports are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _resolve(workdir: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else workdir / path


def _relative_url(workdir: Path, path: str | Path) -> str:
    relative = os.path.relpath(_resolve(workdir, path), workdir)
    return urllib.parse.quote(Path(relative).as_posix())


def _path_key(path: str) -> str:
    return hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:16]
