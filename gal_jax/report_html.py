"""The report page's text: pure functions from round records (and their figures' URLs) to HTML.

`explain_round` says, for one scored round, why each direction was or was not queried and why its
image: the rows of the round's decision table, ranked as the uncertainty rule ranks them (entropy
H, highest first, ties by pool order). `weight_formula` writes the new references' weight with the
round's numbers. `render_html` assembles the page; `report.py` draws the figures and writes files.
This module imports neither matplotlib nor PIL, so the review page (review.py) can use it cheaply.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import urllib.parse
from pathlib import Path
from typing import Iterable, Sequence

from gal_jax import acquisition
from gal_jax.records import (NO_IDENTITY_CHECK, Direction, ImageScore, RecordError, ReferenceEntry, RoundRecord,
                             SelectedEntry)

OVERFIT_RGB = (214, 39, 40)  # matplotlib's tab:red
SELECTED_RGB = (44, 160, 44)  # tab:green
TIMING_KEYS = ("train", "generate", "score", "write")


@dataclasses.dataclass(frozen=True)
class DirectionWhy:
    """One row of a round's decision table: a scored direction and why it was or was not queried."""

    rank: int  # 1 = the highest entropy; ties ranked by pool order
    direction: Direction
    picked: SelectedEntry | None  # the new reference it gave, if queried
    reason: str  # why it was queried or not
    image: ImageScore | None  # the queried image
    image_reason: str  # why that image


@dataclasses.dataclass(frozen=True)
class FinalModel:
    """Where the final round's model was exported."""

    round: int
    link: str | None  # URL relative to DIR; None when the folder lies outside DIR
    path: str  # the folder, as the loading line names it
    # The pipeline methods that load what the folder carries beside its components, e.g.
    # ("load_lora_weights",) for a LoRA run, ("load_textual_inversion",) for learned tokens.
    loaders: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AwaitingFeedback:
    """The run paused for human feedback on a round's review page."""

    round: int
    link: str  # the review page's URL relative to DIR
    workdir: str  # DIR, as the commands name it


# ----------------------------------------------------------------------------------------------
# Why: the round's decisions, explained from its record.


def rank_order(directions: Sequence[Direction]) -> list[int]:
    """Returns the positions of the directions by rank: entropy H descending, ties by pool order."""
    if not directions:
        return []
    return acquisition.top_k_uncertain([d.entropy for d in directions], len(directions))


def explain_round(record: RoundRecord) -> list[DirectionWhy]:
    """Returns the round's scored directions by rank, each with why it was (not) queried."""
    picks = {s.prompt_id: s for s in record.selected}
    order = rank_order(record.directions)
    kth = record.directions[order[record.k - 1]].entropy if len(order) >= record.k else None
    rows = []
    for rank, position in enumerate(order, 1):
        direction = record.directions[position]
        pick = picks.get(direction.prompt_id)
        image = next((i for i in direction.images if pick and i.path == pick.image), None)
        if pick and image is None:
            raise RecordError(f"round {record.round}: selected image {pick.image!r} is not one of "
                              f"direction {direction.prompt_id}'s images")
        rows.append(DirectionWhy(rank, direction, pick,
                                 _direction_reason(record, direction, rank, pick is not None, kth),
                                 image, _image_reason(record, image)))
    return rows


def _direction_reason(record: RoundRecord, direction: Direction, rank: int, picked: bool,
                      kth_entropy: float | None) -> str:
    """Returns why a direction was queried or not, under the round's feedback mode."""
    if record.feedback == "random":
        return "chosen at random" if picked else "not drawn"
    if record.feedback == "human":
        if record.stopped:
            return "the person chose none: this round's model is final"
        return "chosen by a person" if picked else "not chosen by the person"
    if record.stopped:
        rule = "stop rule: fewer than k directions with H > 0"
        return f"H = 0; {rule}" if direction.entropy == 0 else rule
    if picked:
        return "top k by H" if rank <= record.k else "queried, though ranked below the k-th"
    if direction.entropy == 0:
        return "H = 0"
    if rank <= record.k:  # a record the rule would not have written: say so, do not explain it away
        return "not queried, though in the top k"
    if direction.entropy == kth_entropy:
        return f"below the k-th (same H, later by {record.tie_break})"
    return "below the k-th"


def _image_reason(record: RoundRecord, image: ImageScore | None) -> str:
    """Returns why a queried direction's image became the new reference."""
    if image is None:
        return ""
    if record.feedback == "human":
        return "the person's pick"
    if record.image_rule == acquisition.BEST_IMAGE_RULE:
        return f"highest sim_anchor = {image.sim_anchor:.3f}"
    if record.image_rule.startswith("random"):  # "random (seed 0)": the paper's random mode
        return "drawn at " + record.image_rule
    return f"{record.image_rule} (sim_anchor {image.sim_anchor:.3f})"


def weight_formula(record: RoundRecord) -> str:
    """Returns the new references' weight as its formula with the round's numbers (plain text).

    Balance on: "O = λ × mean H = 0.005 × 0.41 = 0.00205"; off: "1 (balance off; ...)".
    """
    entropies = [d.entropy for d in record.directions]
    mean_entropy = math.fsum(entropies) / len(entropies) if entropies else math.nan
    openness = (f"O = λ × mean H = {record.openness_lambda:g} × {fmt(mean_entropy, '.3g')} = "
                f"{fmt(record.openness, '.3g')}")
    if record.balance:
        return openness
    return f"1 (balance off; the round's {openness} is not used)"


def positive_count(record: RoundRecord) -> int:
    """Returns how many of the round's directions have H > 0."""
    return sum(d.entropy > 0 for d in record.directions)


def rule_text(record: RoundRecord) -> str:
    """Returns the round's selection rule and its outcome in one or two sentences (HTML)."""
    k, count, positive = record.k, len(record.directions), positive_count(record)
    if record.feedback == "random":
        text = (f"Random feedback: k = {k} of the {count} directions drawn at random; the image of "
                f"each by the rule “{_e(record.image_rule)}”.")
    elif record.feedback == "human":
        text = "Human feedback: a person chose the directions and their images on the review page."
        if record.stopped:
            text += " <b>The person chose none: this round's model is final.</b>"
    else:
        text = (f"Uncertainty rule: rank the {count} directions by entropy H (ties: "
                f"{_e(record.tie_break)}); query the top k = {k} when at least k have H &gt; 0 "
                f"({positive} do), the image of each by the rule “{_e(record.image_rule)}”.")
        if record.stopped:
            text += (f" <b>Stop rule fired: fewer than k = {k} directions have H &gt; 0: nothing "
                     "worth querying, this round's model is final.</b>")
    if record.selected:
        text += f" Weight of the new references: <b>{_e(weight_formula(record))}</b>."
    else:
        text += f" Nothing queried; openness {_e(weight_formula(record))}."
    return text


# ----------------------------------------------------------------------------------------------
# The page.


def render_html(title: str, records: Sequence[RoundRecord], summaries: Sequence[dict],
                evaluations: Sequence[dict] | None, links: dict, *,
                final: FinalModel | None = None, awaiting: AwaitingFeedback | None = None,
                method: str = "") -> str:
    """Returns the report page; `links` maps figure and image keys to URLs relative to DIR;
    `method` is the run's personalization method (config.train.method; '': not known).

    Keys: "progress"; "loss" (absent when no round recorded its loss); ("entropy", r);
    ("sheet", r, d) for direction position d; ("thumb", path); ("full", path).
    """
    head = [_HEAD.format(title=_e(title), selected=SELECTED_RGB), f"<h1>{_e(title)}</h1>",
            _awaiting_html(awaiting) if awaiting else "", _final_html(final) if final else ""]
    if not records:
        return "\n".join([*head, "<p>No round has finished yet; this page fills in as rounds "
                                  "finish.</p></body></html>\n"])
    latest_scored = next((r for r in reversed(records) if r.directions), None)
    nav = " · ".join(f'<a href="#round-{r.round}">round {r.round}</a>' for r in records)
    final_round = final.round if final else None
    parts = [
        *head,
        f"<p class=meta>{_settings(records[-1], summaries[-1], method)}</p><p class=meta>{nav}</p>",
        f'<h2>Across rounds</h2><img class=wide src="{links["progress"]}" alt="progress plots">',
        (f'<img class=loss src="{links["loss"]}" alt="training loss per round">' if "loss" in links
         else "<p class=meta>No training loss recorded (records written before schema 2).</p>"),
        _summary_table(summaries),
        _evaluation_table(evaluations) if evaluations else "",
        *(_round_section(record, summary, links, open_sheets=record is latest_scored,
                         final=record.round == final_round)
          for record, summary in zip(records, summaries)),
        "</body></html>\n",
    ]
    return "\n".join(parts)


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1500px;
       padding: 0 1em; color: #222; line-height: 1.4; }}
h1 {{ margin-bottom: .2em; }}
h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }}
.meta {{ color: #555; margin: .2em 0; }}
.notice {{ padding: .7em 1em; margin: .8em 0; border-radius: 6px; }}
.notice.awaiting {{ background: #fff4d6; border: 3px solid #e0a000; font-size: 17px; }}
.notice.final {{ background: #eef8ee; border: 2px solid rgb{selected}; }}
.notice ol {{ margin: .3em 0; }}
table {{ border-collapse: collapse; margin: .6em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: middle; }}
th {{ background: #f3f3f3; text-align: center; }} td.text {{ text-align: left; }}
tr.picked td {{ background: #eef8ee; }} tr.picked td.pick {{ color: rgb{selected}; font-weight: 700; }}
td.thumb img {{ border: 3px solid rgb{selected}; width: 56px; height: auto; display: block; }}
img.wide {{ max-width: 100%; height: auto; }} img.loss {{ max-width: 560px; width: 100%; }}
.sheet {{ margin: .4em 0 1em; }} .sheet img {{ max-width: 100%; height: auto; }}
.legend span {{ padding: 0 .4em; border: 3px solid; margin-right: .6em; }}
.badge {{ background: rgb{selected}; color: #fff; border-radius: 4px; padding: 0 .4em;
          font-size: 15px; vertical-align: middle; }}
details > summary {{ cursor: pointer; font-weight: 600; margin: .5em 0; }}
</style></head><body>"""


def _awaiting_html(awaiting: AwaitingFeedback) -> str:
    r, workdir = awaiting.round, _e(awaiting.workdir)
    return (f'<div class="notice awaiting" id=awaiting><b>The run waits for human feedback on '
            f'round {r}.</b><ol><li>Open the <a href="{awaiting.link}">review page of round {r}'
            f"</a>.</li><li>Tick the directions to add as references and pick one image in each "
            f"(the uncertainty rule's suggestion is pre-ticked; change it freely).</li>"
            f"<li><b>Save</b>: when the page is served by <code>gal-jax review --workdir={workdir}"
            f" --round={r}</code>, Save writes <code>rounds/{r}/selections.json</code>; opened as "
            f"a file, it downloads <code>selections.json</code>: move it into "
            f"<code>{workdir}/rounds/{r}/</code>.</li><li>Rerun the same <code>gal-jax run</code> "
            f"command: it continues with round {r}.</li></ol></div>")


def _final_html(final: FinalModel) -> str:
    where = (f'<a href="{final.link}">model/</a>' if final.link
             else f"<code>{_e(final.path)}</code>")
    path = f"&quot;{_e(final.path)}&quot;"
    extra = "".join(f"; pipe.{loader}({path})" for loader in final.loaders)
    return (f'<div class="notice final" id=final-model><b>Final model (round {final.round}): '
            f"{where}</b>, a diffusers Stable Diffusion folder. Load it with:<br><code>from "
            f"diffusers import StableDiffusionPipeline; pipe = StableDiffusionPipeline."
            f"from_pretrained({path}){extra}</code></div>")


def _settings(last: RoundRecord, summary: dict, method: str) -> str:
    items = [f"concept <b>{_e(last.concept_phrase)}</b>"] + ([f"method <b>{_e(method)}</b>"] if method else [])
    items += [f"feedback <b>{_e(last.feedback)}</b>", f"balance <b>{'on' if last.balance else 'off'}</b>",
              f"λ <b>{_e(last.openness_lambda)}</b>", f"k <b>{_e(last.k)}</b>",
              f"{summary['round']} round(s) so far"]
    return " · ".join(items + (["<b>stopped early</b>"] if summary["stopped"] else []))


def _summary_table(summaries: Sequence[dict]) -> str:
    names = ["round", "references", "directions", "mean overfit rate", "mean H", "openness",
             "selected", "new weight", "stopped", "last train loss",
             *(f"{key} s" for key in TIMING_KEYS), "total s"]
    rows = []
    for s in summaries:
        times = [s["timings"][key] for key in TIMING_KEYS]
        known = [t for t in times if t is not None]
        total = sum(known) if known else None
        cells = [s["round"], s["references"], s["directions"], fmt(s["mean_overfit_rate"], ".3f"),
                 fmt(s["mean_entropy"], ".3f"), fmt(s["openness"], ".3g"), s["selected"],
                 fmt(s["new_weight"], ".3g"), "yes" if s["stopped"] else "no",
                 fmt(s["last_loss"], ".4g"), *(fmt(t, ".1f") for t in times), fmt(total, ".1f")]
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


def _round_section(record: RoundRecord, summary: dict, links: dict, open_sheets: bool,
                   final: bool) -> str:
    r, refs = record.round, summary["references"]
    badge = " <span class=badge>final model</span>" if final else ""
    if record.directions:
        facts = (f"trained on {_count(refs, 'reference')} · "
                 f"{_count(summary['directions'], 'direction')} scored · "
                 f"openness {fmt(summary['openness'], '.4g')}"
                 + (" · <b>stop rule fired</b>" if summary["stopped"] else ""))
    else:
        facts = f"trained on {_count(refs, 'reference')} · no direction scored (last round)"
    parts = [f'<section id="round-{r}"><h2>Round {r}{badge}</h2><p class=meta>{facts}</p>']
    if record.directions:
        parts.append(f"<h3>Why these directions</h3><p>{rule_text(record)}</p>")
        parts.append(_decision_table(explain_round(record), links))
        parts.append(_sheets(record, links, open_sheets))
    parts.append(_references_table(record.references, links, r))
    parts.append("</section>")
    return "\n".join(parts)


def _decision_table(rows: Sequence[DirectionWhy], links: dict) -> str:
    header = _row(["rank", "direction", "overfit rate p", "H", "queried", "why", "image",
                   "why this image", "new weight"], "th")
    body = []
    for row in rows:
        d, pick, image = row.direction, row.picked, row.image
        thumb = (f'<td class=thumb>{_linked_thumb(links, pick.image, f"seed {image.seed}")}'
                 f"seed {image.seed}</td>" if pick else "<td></td>")
        body.append(
            f'<tr{" class=picked" if pick else ""}><td>{row.rank}</td>'
            f"<td class=text>{_e(d.prompt)}</td><td>{fmt(d.overfit_rate, '.2f')}</td>"
            f"<td>{fmt(d.entropy, '.3f')}</td><td class=pick>{'yes' if pick else 'no'}</td>"
            f"<td class=text>{_e(row.reason)}</td>{thumb}<td class=text>{_e(row.image_reason)}"
            f"</td><td>{fmt(pick.weight, '.3g') if pick else ''}</td></tr>")
    return f"<table class=why>{header}{''.join(body)}</table>"


def _linked_thumb(links: dict, image: str, alt: str, width: str = "") -> str:
    return (f'<a href="{links[("full", image)]}"><img src="{links[("thumb", image)]}"{width} '
            f'alt="{_e(alt)}"></a>')


def _sheets(record: RoundRecord, links: dict, open_sheets: bool) -> str:
    r = record.round
    legend = (f'<p class="meta legend"><span style="border-color: rgb{OVERFIT_RGB}">OVF</span>'
              "overfit: sim_anchor ≤ max sim_plain "
              + (f'<span style="border-color: rgb{OVERFIT_RGB}">MIX</span>subjects mixed: the image\'s '
                 "strips do not each look most like a different subject "
                 if record.identity_check != NO_IDENTITY_CHECK else "")
              + f'<span style="border-color: rgb{SELECTED_RGB}">chosen</span>new reference · '
              "under each image: sim_anchor, max sim_plain, seed · by rank</p>")
    sheets = [f'<div class=sheet><img src="{links[("sheet", r, d)]}" '
              f'alt="{_e(record.directions[d].prompt)}"></div>'
              for d in rank_order(record.directions)]
    chart = (f'<img class=wide src="{links[("entropy", r)]}" '
             f'alt="entropy per direction, round {r}">')
    return (f"<details{' open' if open_sheets else ''}><summary>Entropy chart and contact sheets "
            f"({len(sheets)} directions)</summary>{chart}{legend}{''.join(sheets)}</details>")


def _references_table(references: Sequence[ReferenceEntry], links: dict, r: int) -> str:
    rows = [f'<tr><td>{_linked_thumb(links, ref.image, "reference", " width=64")}</td>'
            f'<td class=text>{_e(ref.prompt)}</td><td>{fmt(ref.weight, ".4g")}'
            f'</td><td class=text>{_e(ref.source)}</td></tr>' for ref in references]
    header = _row(["image", "prompt", "weight", "source"], "th")
    return (f"<details><summary>References trained on in round {r} ({len(references)})</summary>"
            f"<table>{header}{''.join(rows)}</table></details>")


# ----------------------------------------------------------------------------------------------
# Small pure utilities, shared with report.py and review.py.


def metric_names(evaluations: Iterable[dict]) -> list[str]:
    """Returns the numeric metric keys of the evaluation entries, in first-seen order."""
    names: dict[str, None] = {}
    for entry in evaluations:
        if "round" not in entry:
            raise RecordError(f"evaluation entry {entry!r} has no 'round'")
        for key, value in entry.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                names[key] = None
    return list(names)


def fmt(value, spec: str) -> str:
    """Returns value formatted with spec, or "–" when it is None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def relative_url(path: Path, start: Path) -> str:
    """Returns the URL of path relative to the folder start (percent-encoded, forward slashes)."""
    return urllib.parse.quote(Path(os.path.relpath(path, start)).as_posix())


def url_inside(path: Path, root: Path) -> str | None:
    """Returns path's URL relative to root when path lies inside root (links resolved), else None."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return relative_url(path, root) if path.is_relative_to(root) and path != root else None


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _e(value) -> str:
    return html.escape(str(value), quote=True)
