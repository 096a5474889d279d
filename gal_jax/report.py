"""The run report: `DIR/report.html` with its PNGs under `DIR/report/`, rewritten after every round.

Per round: a contact sheet per scored direction (overfit images framed red, the chosen image
green), the entropy of every direction, the chosen images with their weights, the references the
round trained on and its timings. Across rounds: openness, reference count, mean overfit rate and
the evaluation metrics. Everything comes from the round records (`DIR/rounds/<r>/record.json`), so
the report can be rebuilt from them alone at any time.

The pure helpers (`round_summaries`, `contact_sheet`, `entropy_figure`, `progress_figure`,
`render_html`) turn record data into figures and text; `write_report` reads images and writes.
"""

from __future__ import annotations

import functools
import hashlib
import html
import io
import math
import os
import urllib.parse
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from gal_jax import io_utils
from gal_jax.images import open_rgb
from gal_jax.records import Direction, ImageScore, RecordError, ReferenceEntry, RoundRecord, SelectedEntry
from gal_jax.workdir import Workdir

THUMB = 128  # pixels per image in contact sheets
OVERFIT_RGB = (214, 39, 40)  # matplotlib's tab:red
SELECTED_RGB = (44, 160, 44)  # tab:green
NEUTRAL_RGB = (205, 205, 205)
_UNSELECTED_BAR = "#8fa8c8"
_TIMING_KEYS = ("train", "generate", "score", "write")


# ----------------------------------------------------------------------------------------------
# Pure helpers: record data -> numbers, images, figures, text.


def check_records(records: Iterable[RoundRecord]) -> list[RoundRecord]:
    """Returns the records sorted by round, raising RecordError when a round appears twice."""
    records = list(records)
    rounds = [record.round for record in records]
    if len(set(rounds)) != len(rounds):
        raise RecordError(f"round records repeat a round: {sorted(rounds)}")
    return sorted(records, key=lambda record: record.round)


def round_summaries(records: Sequence[RoundRecord]) -> list[dict]:
    """Returns per round: references, directions, mean overfit rate and H, openness, choices.

    Rounds that scored no direction (the final one) get NaN rates and openness, so that plots
    leave a gap instead of a misleading zero.
    """
    summaries = []
    for record in records:
        directions, selected, timings = record.directions, record.selected, record.timings
        summaries.append({
            "round": record.round,
            "references": len(record.references),
            "directions": len(directions),
            "mean_overfit_rate": _mean(d.overfit_rate for d in directions),
            "mean_entropy": _mean(d.entropy for d in directions),
            "openness": float(record.openness) if directions else math.nan,
            "selected": len(selected),
            "new_weight": selected[0].weight if selected else None,
            "stopped": record.stopped,
            "timings": {key: timings.get(key) for key in _TIMING_KEYS},
        })
    return summaries


def contact_sheet(direction: Direction, thumbnails: Sequence[Image.Image], selected: set[str],
                  thumb: int = THUMB) -> Image.Image:
    """Returns a direction's images in a row: overfit ones framed red + "OVF", chosen ones green.

    Under each image: its sim_anchor, its highest sim_plain (overfit when anchor <= plain), seed.
    """
    images = direction.images
    if len(thumbnails) != len(images):
        raise ValueError(f"{len(thumbnails)} thumbnails for {len(images)} images of "
                         f"{direction.prompt!r}")
    pad, border, header, caption = 8, 4, 28, 50
    cell = thumb + 2 * border
    width = max(pad + len(images) * (cell + pad), 360)
    sheet = Image.new("RGB", (width, header + cell + caption), "white")
    draw = ImageDraw.Draw(sheet)
    title = _fit_text(_direction_title(direction), _font(14), width - 2 * pad)
    draw.text((pad, 6), title, fill="black", font=_font(14))
    for i, (info, thumbnail) in enumerate(zip(images, thumbnails)):
        x = pad + i * (cell + pad)
        chosen = info.path in selected
        frame = SELECTED_RGB if chosen else OVERFIT_RGB if info.overfit else NEUTRAL_RGB
        draw.rectangle((x, header, x + cell - 1, header + cell - 1), fill=frame)
        square = ImageOps.pad(thumbnail.convert("RGB"), (thumb, thumb), color="white")
        sheet.paste(square, (x + border, header + border))
        _draw_caption(draw, info, chosen, (x, header + cell + 3), cell)
    return sheet


def entropy_figure(round_index: int, directions: Sequence[Direction],
                   selected_prompts: set[str]) -> Figure:
    """Returns a horizontal bar chart of H per direction in pool order, the selected ones green."""
    entropies = np.nan_to_num([_number(d.entropy) for d in directions])
    figure = Figure(figsize=(8, 1.3 + 0.3 * len(directions)), layout="constrained")
    axes = figure.add_subplot()
    rows = np.arange(len(directions))
    colours = [_hex(SELECTED_RGB) if d.prompt in selected_prompts else _UNSELECTED_BAR
               for d in directions]
    axes.barh(rows, entropies, color=colours)
    # parse_math=False: a prompt is literal text, "a $5 teapot" is not mathtext.
    axes.set_yticks(rows, labels=[_shorten(d.prompt, 52) for d in directions], fontsize=8,
                    parse_math=False)
    axes.invert_yaxis()
    axes.axvline(math.log(2), color="0.4", linestyle="--", linewidth=1)
    # H and p go in a column right of the ln 2 line, where no bar reaches.
    for row, direction, entropy in zip(rows, directions, entropies):
        rate = fmt(direction.overfit_rate, ".2f")
        axes.text(math.log(2) + 0.012, row, f"H {entropy:.3f}  p {rate}", va="center", fontsize=7,
                  color="0.25")
    axes.set_xlim(0, math.log(2) * 1.3)
    axes.set_xlabel("entropy H of the direction's overfit rate p (nats; dashed: max ln 2)",
                    fontsize=8)
    axes.set_title(f"Round {round_index}: uncertainty per direction", fontsize=10)
    handles = [Patch(color=_hex(SELECTED_RGB), label="selected"),
               Patch(color=_UNSELECTED_BAR, label="not selected")]
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    return figure


def progress_figure(summaries: Sequence[dict], evaluations: Sequence[dict] | None = None) -> Figure:
    """Returns line plots across rounds: openness, references, mean overfit rate, eval metrics."""
    rounds = [s["round"] for s in summaries]
    panels = [("openness O = λ · mean H", "openness"), ("references trained on", "references"),
              ("mean overfit rate of scored directions", "mean_overfit_rate")]
    count = len(panels) + bool(evaluations)
    figure = Figure(figsize=(3.6 * count, 3.0), layout="constrained")
    axes = figure.subplots(1, count, squeeze=False)[0]
    for ax, (title, key) in zip(axes, panels):
        values = np.array([s[key] for s in summaries], dtype=float)
        ax.plot(rounds, values, marker="o", color="tab:blue")
        if np.isfinite(values).any() and np.nanmax(values) > 0:
            # From zero, so that a small change does not look like a large one.
            ax.set_ylim(0, 1.15 * np.nanmax(values))
        _round_axis(ax, title, rounds)
    if evaluations:
        evaluations = sorted(evaluations, key=lambda e: e["round"])
        eval_rounds = [e["round"] for e in evaluations]
        for metric in metric_names(evaluations):
            label = f"{metric} (lower is better)" if metric == "ovf" else metric
            values = [_number(e.get(metric)) for e in evaluations]
            axes[-1].plot(eval_rounds, values, marker="o", label=label)
        for text in axes[-1].legend(fontsize=7).get_texts():
            text.set_parse_math(False)  # metric names are literal, "$" included
        _round_axis(axes[-1], "evaluation on test prompts", eval_rounds)
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


def render_html(title: str, records: Sequence[RoundRecord], summaries: Sequence[dict],
                evaluations: Sequence[dict] | None, links: dict) -> str:
    """Returns the report page; `links` maps figure and image keys to URLs relative to DIR.

    Keys: "progress"; ("entropy", r); ("sheet", r, d); ("thumb", path); ("full", path).
    """
    if not records:
        return (_HEAD.format(title=_e(title), selected=SELECTED_RGB) + f"<h1>{_e(title)}</h1>"
                "<p>No round has finished yet; this page fills in as rounds finish.</p>"
                "</body></html>\n")
    latest_scored = next((r for r in reversed(records) if r.directions), None)
    nav = " · ".join(f'<a href="#round-{r.round}">round {r.round}</a>' for r in records)
    parts = [
        _HEAD.format(title=_e(title), selected=SELECTED_RGB),
        f"<h1>{_e(title)}</h1><p class=meta>{_settings(records[-1], summaries[-1])}</p>",
        f"<p class=meta>{nav}</p>",
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
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1500px;
       padding: 0 1em; color: #222; line-height: 1.4; }}
h1 {{ margin-bottom: .2em; }}
h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }}
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


def _settings(last: RoundRecord, summary: dict) -> str:
    items = [f"concept <b>{_e(last.concept_phrase)}</b>"]
    items += [f"feedback <b>{_e(last.feedback)}</b>", f"balance <b>{'on' if last.balance else 'off'}</b>",
              f"λ <b>{_e(last.openness_lambda)}</b>", f"k <b>{_e(last.k)}</b>",
              f"{summary['round']} round(s) so far"]
    return " · ".join(items + (["<b>stopped early</b>"] if summary["stopped"] else []))


def _summary_table(summaries: Sequence[dict]) -> str:
    names = ["round", "references", "directions", "mean overfit rate", "mean H", "openness",
             "selected", "new weight", "stopped", *(f"{key} s" for key in _TIMING_KEYS), "total s"]
    rows = []
    for s in summaries:
        times = [s["timings"][key] for key in _TIMING_KEYS]
        known = [t for t in times if t is not None]
        total = sum(known) if known else None
        cells = [s["round"], s["references"], s["directions"], fmt(s["mean_overfit_rate"], ".3f"),
                 fmt(s["mean_entropy"], ".3f"), fmt(s["openness"], ".3g"), s["selected"],
                 fmt(s["new_weight"], ".3g"), "yes" if s["stopped"] else "no",
                 *(fmt(t, ".1f") for t in times), fmt(total, ".1f")]
        rows.append(_row(cells))
    return f"<table>{_row(names, 'th')}{''.join(rows)}</table>"


def _evaluation_table(evaluations: Sequence[dict]) -> str:
    names = metric_names(evaluations)
    rows = [_row([e["round"], *(fmt(e.get(n), ".4f") for n in names)])
            for e in sorted(evaluations, key=lambda e: e["round"])]
    return ("<h2>Evaluation</h2><p class=meta>On the test prompts; OVF: lower is better.</p>"
            f"<table>{_row(['round', *names], 'th')}{''.join(rows)}</table>")


def _row(cells: Sequence, tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{_e(c)}</{tag}>" for c in cells) + "</tr>"


def _round_section(record: RoundRecord, summary: dict, links: dict, open_sheets: bool) -> str:
    r, refs = record.round, summary["references"]
    if record.directions:
        facts = (f"trained on {refs} references · {summary['directions']} directions scored · "
                 f"openness {fmt(summary['openness'], '.4g')}"
                 + (" · <b>stop rule fired</b>" if summary["stopped"] else ""))
    else:
        facts = f"trained on {refs} references · no direction scored (final round)"
    parts = [f'<section id="round-{r}"><h2>Round {r}</h2><p class=meta>{facts}</p>']
    if record.selected:
        parts.append("<h3>Chosen images (new references for the next round)</h3>")
        parts.append(_chosen(record.selected, links))
    elif record.directions:
        parts.append("<p>No image chosen this round.</p>")
    if record.directions:
        parts.append(f'<h3>Uncertainty per direction</h3><img class=wide '
                     f'src="{links[("entropy", r)]}" alt="entropy per direction, round {r}">')
        parts.append(_sheets(record, links, open_sheets))
    parts.append(_references_table(record.references, links, r))
    parts.append("</section>")
    return "\n".join(parts)


def _linked_thumb(links: dict, image: str, alt: str, width: str = "") -> str:
    return (f'<a href="{links[("full", image)]}"><img src="{links[("thumb", image)]}"{width} '
            f'alt="{alt}"></a>')


def _chosen(selected: Sequence[SelectedEntry], links: dict) -> str:
    figures = [f'<figure>{_linked_thumb(links, s.image, "chosen image")}<figcaption>'
               f'{_e(s.prompt)}<br>weight <b>{fmt(s.weight, ".4g")}</b>'
               "</figcaption></figure>" for s in selected]
    return f'<div class=chosen>{"".join(figures)}</div>'


def _sheets(record: RoundRecord, links: dict, open_sheets: bool) -> str:
    r = record.round
    legend = (f'<p class="meta legend"><span style="border-color: rgb{OVERFIT_RGB}">OVF</span>'
              "overfit: sim_anchor ≤ max sim_plain "
              f'<span style="border-color: rgb{SELECTED_RGB}">chosen</span>new reference · '
              "under each image: sim_anchor, max sim_plain, seed</p>")
    sheets = [f'<div class=sheet><img src="{links[("sheet", r, d)]}" '
              f'alt="{_e(direction.prompt)}"></div>'
              for d, direction in enumerate(record.directions)]
    return (f"<details{' open' if open_sheets else ''}><summary>Contact sheets "
            f"({len(sheets)} directions)</summary>{legend}{''.join(sheets)}</details>")


def _references_table(references: Sequence[ReferenceEntry], links: dict, r: int) -> str:
    rows = [f'<tr><td>{_linked_thumb(links, ref.image, "reference", " width=64")}</td>'
            f'<td class=text>{_e(ref.prompt)}</td><td>{fmt(ref.weight, ".4g")}'
            f'</td><td class=text>{_e(ref.source)}</td></tr>' for ref in references]
    header = _row(["image", "prompt", "weight", "source"], "th")
    return (f"<details><summary>References trained on in round {r} ({len(references)})</summary>"
            f"<table>{header}{''.join(rows)}</table></details>")


# ----------------------------------------------------------------------------------------------
# Small pure utilities.


def _direction_title(direction: Direction) -> str:
    return (f"{direction.prompt}   ·   overfit rate {fmt(direction.overfit_rate, '.2f')}"
            f"   ·   H {fmt(direction.entropy, '.3f')}")


def _draw_caption(draw: ImageDraw.ImageDraw, info: ImageScore, chosen: bool, corner: tuple[int, int],
                  width: int) -> None:
    (x, y), font, bold = corner, _font(11), _font(11, bold=True)
    plain = info.sim_plain
    draw.text((x + 2, y), f"anchor {fmt(info.sim_anchor, '.3f')}", fill="black", font=font)
    draw.text((x + 2, y + 14), f"plain  {fmt(max(plain) if plain else None, '.3f')}", fill="#555",
              font=font)
    draw.text((x + 2, y + 28), f"seed {info.seed}", fill="#777", font=font)
    tags = [("CHOSEN", SELECTED_RGB, chosen), ("OVF", OVERFIT_RGB, info.overfit)]
    right = x + width - 2
    for text, colour, shown in tags:  # right to left
        if shown:
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
    numbers = [v for v in map(_number, values) if not math.isnan(v)]
    return float(np.mean(numbers)) if numbers else math.nan


def _number(value) -> float:
    return math.nan if value is None else float(value)


def fmt(value, spec: str) -> str:
    """Returns value formatted with spec, or "–" when it is None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def relative_url(path: Path, start: Path) -> str:
    """Returns the URL of path relative to the folder start (percent-encoded, forward slashes)."""
    return urllib.parse.quote(Path(os.path.relpath(path, start)).as_posix())


# ----------------------------------------------------------------------------------------------
# Files: the only functions that read images or write.


def write_report(workdir: Path, records: Sequence[RoundRecord], evaluations: list[dict] | None = None) -> Path:
    """Returns the path of `DIR/report.html`, (re)written with its PNGs under `DIR/report/`.

    Args:
      workdir: the run directory DIR; image paths in records are relative to it (or absolute).
      records: the round records written so far (any order, maybe none yet).
      evaluations: optional per-round metrics, e.g. {"round": r, "txt_aln": f, "img_aln": f,
        "ovf": f}; every numeric field is plotted and tabulated.
    """
    workdir = Path(workdir)
    records = check_records(records)
    summaries = round_summaries(records)
    links = _write_figures(workdir, records, summaries, evaluations) if records else {}
    page = render_html(f"GAL report: {workdir.resolve().name}", records, summaries, evaluations,
                       links)
    path = Workdir(workdir).report_html
    io_utils.atomic_write_bytes(path, page.encode("utf-8"))
    return path


def _write_figures(workdir: Path, records: Sequence[RoundRecord], summaries: Sequence[dict],
                   evaluations: Sequence[dict] | None) -> dict:
    """Returns the links render_html needs, after writing every figure and thumbnail they name."""
    out = Workdir(workdir).report_dir
    links = {"progress": _write_png(workdir, out / "progress.png",
                                    progress_figure(summaries, evaluations))}
    for record in records:
        links.update(_write_round_figures(workdir, out / f"round_{record.round:02d}", record))
        for entry in [*record.selected, *record.references]:
            image = entry.image
            thumbnail = _load_image(workdir, image, 2 * THUMB)
            links[("thumb", image)] = _write_png(workdir, out / "thumbs" / f"{_key(image)}.png",
                                                 thumbnail)
            links[("full", image)] = relative_url(io_utils.resolve(workdir, image), workdir)
    return links


def _write_round_figures(workdir: Path, out: Path, record: RoundRecord) -> dict:
    """Returns the links of one round's entropy chart and contact sheets, after writing them."""
    if not record.directions:
        return {}
    r, directions = record.round, record.directions
    selected_images = {s.image for s in record.selected}
    selected_prompts = {s.prompt for s in record.selected}
    links = {("entropy", r): _write_png(workdir, out / "entropy.png",
                                        entropy_figure(r, directions, selected_prompts))}
    for d, direction in enumerate(directions):
        thumbnails = [_load_image(workdir, image.path, THUMB) for image in direction.images]
        sheet = contact_sheet(direction, thumbnails, selected_images)
        links[("sheet", r, d)] = _write_png(workdir, out / f"direction_{d:02d}.png", sheet)
    return links


def _load_image(workdir: Path, path: str, size: int) -> Image.Image:
    """Returns the image at `path` (relative to workdir or absolute), shrunk to fit size x size."""
    full = io_utils.resolve(workdir, path)
    if not full.is_file():
        raise FileNotFoundError(f"image {path!r} named in a round record is missing: {full}")
    image = open_rgb(full, draft_size=size)  # JPEG: decoded at a reduced scale
    image.thumbnail((size, size))
    return image


def _write_png(workdir: Path, path: Path, figure: Figure | Image.Image) -> str:
    """Returns path's URL relative to workdir, after writing the figure or image there as PNG."""
    buffer = io.BytesIO()
    if isinstance(figure, Figure):
        figure.savefig(buffer, format="png", dpi=110)
    else:
        figure.save(buffer, format="PNG")
    io_utils.atomic_write_bytes(path, buffer.getvalue())
    return relative_url(path, workdir)


def _key(path: str) -> str:
    return hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:16]
