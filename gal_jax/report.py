"""The run report: `DIR/report.html` with its PNGs under `DIR/report/`, rewritten after every round.

Per round: why each scored direction was or was not queried (rank by entropy, the rule's reason,
the image chosen and why, the new weight's formula with the round's numbers), a contact sheet per
direction (overfit images framed red, the chosen image green), an entropy chart and the references
the round trained on. Across rounds: openness, reference count, mean overfit rate, training loss
and the evaluation metrics. On top: where the final model was exported, or, while the run waits
for human feedback, the review page and what to do. Everything comes from the round records
(`DIR/rounds/<r>/record.json`), so the report can be rebuilt from them alone at any time.

Every link stays inside DIR, so a moved or copied workdir keeps a working report: reference images
that lie outside DIR (the user's data, the tiny default's cache) are copied to
`DIR/report/references/` under content-hash names.

The pure helpers here (`round_summaries`, `contact_sheet`, `entropy_figure`, `progress_figure`,
`loss_figure`) turn record data into figures; `report_html` turns it into text; `write_report`
reads images and writes files.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from gal_jax import io_utils
from gal_jax.images import open_rgb
from gal_jax.records import Direction, ImageScore, RecordError, RoundRecord
from gal_jax.report_html import (
    OVERFIT_RGB, SELECTED_RGB, TIMING_KEYS, AwaitingFeedback, FinalModel, fmt, metric_names,
    rank_order, relative_url, render_html, url_inside,
)
from gal_jax.workdir import LORA_WEIGHTS, TOKEN_EMBEDDINGS, Workdir

if TYPE_CHECKING:  # matplotlib takes about a second to import: only the report's plots need it
    from matplotlib.figure import Figure

THUMB = 128  # pixels per image in contact sheets
# A round's figures are redrawn when its record, its images or this version change.
_ROUND_FIGURES_VERSION = 1
_FIGURES_INDEX = "figures.json"
NEUTRAL_RGB = (205, 205, 205)
_UNSELECTED_BAR = "#8fa8c8"
# Formats a browser shows as they are: such reference files are copied byte for byte.
_WEB_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"})


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
    """Returns per round: references, directions, mean overfit rate and H, openness, choices,
    the last training loss and the timings.

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
            "last_loss": record.train_loss[-1].loss if record.train_loss else None,
            "timings": {key: timings.get(key) for key in TIMING_KEYS},
        })
    return summaries


def contact_sheet(direction: Direction, thumbnails: Sequence[Image.Image], selected: set[str],
                  thumb: int = THUMB) -> Image.Image:
    """Returns a direction's images in a row: overfit ones framed red + "OVF" (subjects mixed,
    with the identity check: red + "MIX"), chosen ones green.

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
        frame = SELECTED_RGB if chosen else OVERFIT_RGB if info.overfit or info.identity_mixed else NEUTRAL_RGB
        draw.rectangle((x, header, x + cell - 1, header + cell - 1), fill=frame)
        square = ImageOps.pad(thumbnail.convert("RGB"), (thumb, thumb), color="white")
        sheet.paste(square, (x + border, header + border))
        _draw_caption(draw, info, chosen, (x, header + cell + 3), cell)
    return sheet


def entropy_figure(round_index: int, directions: Sequence[Direction],
                   selected_prompts: set[str]) -> Figure:
    """Returns a horizontal bar chart of H per direction, top to bottom as given, the selected
    ones green (the report gives them by rank)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

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
    from matplotlib.figure import Figure

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


def loss_figure(records: Sequence[RoundRecord]) -> Figure | None:
    """Returns the training loss against step, one line per round; None when no round has a curve.

    Rounds without a curve (records written before schema 2) are left out of the legend's lines.
    """
    curves = [(record.round, record.train_loss) for record in records if record.train_loss]
    if not curves:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2, 2.8), layout="constrained")
    axes = figure.add_subplot()
    for round_index, curve in curves:
        axes.plot([p.step for p in curve], [p.loss for p in curve], marker="." if len(curve) < 30
                  else None, linewidth=1.2, label=f"round {round_index}")
    axes.set_title("training loss per round (every round trains from the base model)", fontsize=9)
    axes.set_xlabel("step", fontsize=8)
    axes.set_ylabel("weighted loss", fontsize=8)
    axes.tick_params(labelsize=8)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure


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
    tags = [("CHOSEN", SELECTED_RGB, chosen), ("OVF", OVERFIT_RGB, info.overfit),
            ("MIX", OVERFIT_RGB, info.identity_mixed)]
    right = x + width - 2
    for text, colour, shown in tags:  # right to left
        if shown:
            right -= int(bold.getlength(text))
            draw.text((right, y + 28), text, fill=colour, font=bold)
            right -= 6


@functools.lru_cache(maxsize=None)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    # DejaVu ships with matplotlib, so sheets and plots share one font on every machine.
    import matplotlib

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


def _shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % rgb


# ----------------------------------------------------------------------------------------------
# Files: the only functions that read images or write.


def write_report(workdir: Path, records: Sequence[RoundRecord], evaluations: list[dict] | None = None,
                 *, model_dir: Path | None = None, review_page: Path | None = None) -> Path:
    """Returns the path of `DIR/report.html`, (re)written with its PNGs under `DIR/report/`.

    Args:
      workdir: the run directory DIR; image paths in records are relative to it (or absolute).
      records: the round records written so far (any order, maybe none yet).
      evaluations: optional per-round metrics, e.g. {"round": r, "txt_aln": f, "img_aln": f,
        "ovf": f}; every numeric field is plotted and tabulated.
      model_dir: where the last record's round's model was exported (DIR/model), once it was:
        the page says so on top, with a link and the line that loads it.
      review_page: the review page of the round after the last record, while the run waits for
        human feedback on it: the page says so on top, with a link and what to do.
    """
    workdir = Path(workdir)
    records = check_records(records)
    summaries = round_summaries(records)
    links = _write_figures(workdir, records, summaries, evaluations) if records else {}
    page = render_html(f"GAL report: {workdir.resolve().name}", records, summaries, evaluations,
                       links, final=_final_model(workdir, records, model_dir),
                       awaiting=_awaiting(workdir, records, review_page), method=_method(workdir))
    path = Workdir(workdir).report_html
    io_utils.atomic_write_bytes(path, page.encode("utf-8"))
    return path


def _method(workdir: Path) -> str:
    """Returns the run's config.train.method from DIR/config.json ('' without one, and
    'dreambooth' for configs of versions before the methods)."""
    try:
        config = io_utils.read_json(Workdir(workdir).config)
    except (FileNotFoundError, ValueError):
        return ""
    train = config.get("train") if isinstance(config, dict) else None
    return str(train.get("method", "dreambooth")) if isinstance(train, dict) else ""


def _final_model(workdir: Path, records: Sequence[RoundRecord],
                 model_dir: Path | None) -> FinalModel | None:
    """Returns what the page says about the exported model, None before there is one."""
    if model_dir is None:
        return None
    if not records:
        raise ValueError(f"model_dir {model_dir} given, but no round has finished")
    folder = io_utils.resolve(workdir, model_dir)
    link = url_inside(folder, workdir)
    loaders = tuple(loader for name, loader in ((LORA_WEIGHTS, "load_lora_weights"),
                                                 (TOKEN_EMBEDDINGS, "load_textual_inversion"))
                    if (folder / name).is_file())
    return FinalModel(round=records[-1].round, link=link and link + "/",
                      path=str(folder.resolve()), loaders=loaders)


def _awaiting(workdir: Path, records: Sequence[RoundRecord],
              review_page: Path | None) -> AwaitingFeedback | None:
    """Returns what the page says about the pending review, None when the run does not wait."""
    if review_page is None:
        return None
    round_index = records[-1].round + 1 if records else 1
    page = io_utils.resolve(workdir, review_page)
    expected = Workdir(workdir).round(round_index).review_html
    if page.resolve() != expected.resolve():
        raise ValueError(f"review_page {review_page} is not the review page of round "
                         f"{round_index}, the round after the last record ({expected})")
    return AwaitingFeedback(round=round_index, link=relative_url(expected, workdir),
                            workdir=str(Path(workdir).resolve()))


def _write_figures(workdir: Path, records: Sequence[RoundRecord], summaries: Sequence[dict],
                   evaluations: Sequence[dict] | None) -> dict:
    """Returns the links render_html needs, after writing every figure and image they name."""
    out = Workdir(workdir).report_dir
    links = {"progress": _write_png(workdir, out / "progress.png",
                                    progress_figure(summaries, evaluations))}
    loss = loss_figure(records)
    if loss is not None:
        links["loss"] = _write_png(workdir, out / "loss.png", loss)
    for record in records:
        links.update(_write_round_figures(workdir, out / f"round_{record.round:02d}", record))
        for entry in [*record.selected, *record.references]:
            image = entry.image
            if ("thumb", image) in links:
                continue
            thumbnail = _load_image(workdir, image, 2 * THUMB)
            links[("thumb", image)] = _write_png(workdir, out / "thumbs" / f"{_key(image)}.png",
                                                 thumbnail)
            links[("full", image)] = _full_image_link(workdir, image)
    return links


def _full_image_link(workdir: Path, image: str) -> str:
    """Returns the URL, relative to DIR, of an image in full: itself inside DIR, else a copy."""
    path = io_utils.resolve(workdir, image)
    return url_inside(path, workdir) or relative_url(_copy_reference(workdir, path), workdir)


def _copy_reference(workdir: Path, path: Path) -> Path:
    """Returns the copy of an image outside DIR in `DIR/report/references/`, named by its content.

    Formats browsers show are copied byte for byte; others are written as PNG, as read for training.
    """
    payload = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix not in _WEB_SUFFIXES:
        buffer = io.BytesIO()
        open_rgb(path).save(buffer, format="PNG")
        payload, suffix = buffer.getvalue(), ".png"
    copy = Workdir(workdir).report_dir / "references" / f"{hashlib.sha256(payload).hexdigest()[:20]}{suffix}"
    if not copy.is_file():  # the name is the content: an existing copy is already right
        io_utils.atomic_write_bytes(copy, payload)
    return copy


def _write_round_figures(workdir: Path, out: Path, record: RoundRecord) -> dict:
    """Returns the links of one round's entropy chart and contact sheets, after writing them, or
    of those already written for this very record and images (`out/figures.json` holds what they
    were drawn from): a report rewritten after every round redraws only the new round."""
    if not record.directions:
        return {}
    r, directions = record.round, record.directions
    names = {("entropy", r): "entropy.png"} | {("sheet", r, d): f"direction_{d:02d}.png" for d in range(len(directions))}
    links = {key: relative_url(out / name, workdir) for key, name in names.items()}
    drawn_from = _round_figures_key(workdir, record)
    if _figures_written(out, drawn_from, names.values()):
        return links
    selected_images = {s.image for s in record.selected}
    selected_prompts = {s.prompt for s in record.selected}
    ranked = [directions[d] for d in rank_order(directions)]
    _write_png(workdir, out / names[("entropy", r)], entropy_figure(r, ranked, selected_prompts))
    for d, direction in enumerate(directions):
        thumbnails = [_load_image(workdir, image.path, THUMB) for image in direction.images]
        sheet = contact_sheet(direction, thumbnails, selected_images)
        _write_png(workdir, out / names[("sheet", r, d)], sheet)
    io_utils.atomic_write_bytes(out / _FIGURES_INDEX, json.dumps({"key": drawn_from}).encode("utf-8"))
    return links


def _round_figures_key(workdir: Path, record: RoundRecord) -> str:
    """Returns a digest of what a round's figures are drawn from: the record, the drawing code's
    version and each image file's size and modification time (a missing image is left to the
    drawing, which names it)."""
    digest = hashlib.sha256(json.dumps([_ROUND_FIGURES_VERSION, THUMB, record.to_json()], sort_keys=True).encode())
    for direction in record.directions:
        for image in direction.images:
            try:
                stat = io_utils.resolve(workdir, image.path).stat()
            except OSError:
                return ""
            digest.update(f"{image.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _figures_written(out: Path, drawn_from: str, names: Iterable[str]) -> bool:
    """Returns whether `out` holds every named figure, drawn from `drawn_from`."""
    if not drawn_from:
        return False
    try:
        index = json.loads((out / _FIGURES_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: draw again
        return False
    return isinstance(index, dict) and index.get("key") == drawn_from and all((out / n).is_file() for n in names)


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
    # zlib level 1: 3.5x faster to write than PIL's default 6, files about 20% larger.
    if isinstance(figure, Image.Image):
        figure.save(buffer, format="PNG", compress_level=1)
    else:  # a matplotlib Figure
        figure.savefig(buffer, format="png", dpi=110, pil_kwargs={"compress_level": 1})
    io_utils.atomic_write_bytes(path, buffer.getvalue())
    return relative_url(path, workdir)


def _key(path: str) -> str:
    return hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:16]
