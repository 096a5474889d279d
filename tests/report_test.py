"""Tests for the run report: figures from hand-made round records, and the HTML linking them."""

from __future__ import annotations

import math
import re
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from gal_jax import report
from gal_jax.records import Direction, RoundRecord, from_json

OVERFIT, SELECTED, NEUTRAL = report.OVERFIT_RGB, report.SELECTED_RGB, report.NEUTRAL_RGB
BLUE = (0, 0, 255)


def _png(path: Path, colour=BLUE, size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def _entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -p * math.log(p) - (1 - p) * math.log(1 - p)


def _direction(workdir: Path, r: int, pid: int, overfit: list[bool]) -> dict:
    """Returns a scored direction, its images drawn under workdir, sim_plain set to fit overfit."""
    images = []
    for n, is_overfit in enumerate(overfit):
        path = f"rounds/{r}/images/p{pid:03d}_s{n:02d}.png"
        _png(workdir / path, (40 * n, 100, 200))
        anchor = 0.25 + 0.01 * n  # the last image has the highest sim_anchor
        plain = [anchor + (0.02 if is_overfit else -0.02), 0.1]
        images.append({"path": path, "seed": n, "sim_anchor": anchor, "sim_plain": plain,
                       "overfit": is_overfit})
    rate = float(np.mean(overfit))
    return {"prompt": f"a <tiny-teapot> teapot {PLACES[pid]}", "prompt_id": pid,
            "overfit_rate": rate, "entropy": _entropy(rate), "images": images}


PLACES = ["in park", "on the moon", "in a cave"]
FLAGS = {0: [True, False, True, True], 1: [True, True, True, True], 2: [False, False, True, False]}
POOLS = {1: [0, 1, 2], 2: [1, 2], 3: []}  # round 1 picks prompt 0, round 2 prompt 1


@pytest.fixture
def run(tmp_path) -> tuple[Path, list[dict]]:
    """Returns (workdir, records) of a 3-round run: two scored rounds and a final training round.

    Each scored round selects its first direction's last image; one original reference lies
    outside the workdir, named by its absolute path.
    """
    workdir = tmp_path / "run"
    outside = tmp_path / "data" / "ref_abs.png"
    _png(outside, (250, 200, 0), 300)
    _png(workdir / "data" / "ref0.png", (250, 120, 0), 300)
    originals = [("data/ref0.png", "on a table"), (str(outside), "on a shelf")]
    references = [{"image": path, "prompt": f"a <tiny-teapot> teapot {where}", "weight": 1.0,
                   "plain_prompt": None, "source": "user"} for path, where in originals]
    records = []
    for r, pool in POOLS.items():
        directions = [_direction(workdir, r, pid, FLAGS[pid]) for pid in pool]
        openness = 0.005 * float(np.mean([d["entropy"] for d in directions])) if pool else 0.0
        selected = [{"prompt_id": d["prompt_id"], "prompt": d["prompt"],
                     "image": d["images"][-1]["path"], "weight": openness} for d in directions[:1]]
        records.append({
            "round": r, "feedback": "uncertainty", "balance": True, "lambda": 0.005, "k": 1,
            "concept_phrase": "a <tiny-teapot> teapot", "plain_prompts": ["a teapot on a table"], "references": list(references),
            "directions": directions, "openness": openness, "selected": selected, "stopped": False,
            "timings": {"train": 12.5 * r, "generate": 3.0, "score": 0.5, "write": 0.25}})
        references += [{**s, "plain_prompt": None, "source": f"round-{r}"} for s in selected]
    return workdir, records


def typed(records: list[dict]) -> list[RoundRecord]:
    """Returns the hand-made records as the typed records the report takes."""
    return [RoundRecord.from_json(record) for record in records]


EVALUATIONS = [{"round": r, "txt_aln": 0.29 + 0.01 * r, "img_aln": 0.8 - 0.01 * r,
                "ovf": 0.4 - 0.05 * r} for r in (1, 2, 3)]


def _links(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"#][^"]*)"', page)


def test_report_links_only_existing_files_by_relative_urls(run):
    workdir, records = run
    path = report.write_report(workdir, typed(records), EVALUATIONS)
    assert path == workdir / "report.html"
    links = _links(path.read_text())
    assert links
    for link in links:
        assert "://" not in link and not link.startswith("/"), link
        assert (workdir / urllib.parse.unquote(link)).resolve().is_file(), link
    assert any("data/ref_abs.png" in link and link.startswith("../") for link in links)


def test_report_writes_progress_entropy_and_one_contact_sheet_per_direction(run):
    workdir, records = run
    report.write_report(workdir, typed(records))
    out = workdir / "report"
    expected = {"progress.png", "round_01/entropy.png", "round_02/entropy.png",
                *(f"round_01/direction_{d:02d}.png" for d in range(3)),
                *(f"round_02/direction_{d:02d}.png" for d in range(2))}
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.png") if "thumbs" not in p.parts}
    assert written == expected
    assert not list(workdir.rglob("*.tmp")), "a temporary file was left behind"
    assert not (out / "round_03").exists(), "the final round scored nothing and needs no figures"


def test_report_page_escapes_placeholders_and_needs_no_javascript(run):
    workdir, records = run
    page = report.write_report(workdir, typed(records)).read_text()
    assert "<tiny-teapot>" not in page
    assert "a &lt;tiny-teapot&gt; teapot in park" in page
    assert "<script" not in page


def test_report_shows_weights_timings_references_and_evaluation(run):
    workdir, records = run
    page = report.write_report(workdir, typed(records), EVALUATIONS).read_text()
    weight = records[0]["selected"][0]["weight"]
    assert f"weight <b>{weight:.4g}</b>" in page
    assert "<td>37.5</td>" in page  # round 3 train seconds
    assert "<td>41.2</td>" in page  # round 3 total: 37.5 + 3 + 0.5 + 0.25
    assert page.count("References trained on in round") == 3
    assert "<td>round-1</td>" in page.replace('<td class=text>', "<td>")
    assert "<h2>Evaluation</h2>" in page and "<td>0.3000</td>" in page


def test_report_is_rewritten_with_each_new_round(run):
    workdir, records = run
    first = report.write_report(workdir, typed(records[:1])).read_text()
    second = report.write_report(workdir, typed(records[:2])).read_text()
    assert 'id="round-2"' not in first
    assert 'id="round-2"' in second
    assert (workdir / "report" / "round_02" / "entropy.png").is_file()


def test_round_summaries_match_hand_computation(run):
    _, records = run
    first, second, last = report.round_summaries(typed(records))
    assert first["references"] == 2 and second["references"] == 3 and last["references"] == 4
    np.testing.assert_allclose(first["mean_overfit_rate"], (0.75 + 1.0 + 0.25) / 3)
    np.testing.assert_allclose(second["mean_overfit_rate"], (1.0 + 0.25) / 2)
    h = -0.75 * math.log(0.75) - 0.25 * math.log(0.25)
    np.testing.assert_allclose(first["mean_entropy"], 2 * h / 3)
    np.testing.assert_allclose(first["openness"], 0.005 * 2 * h / 3)
    np.testing.assert_allclose(second["openness"], 0.005 * h / 2)
    assert first["new_weight"] == records[0]["selected"][0]["weight"]
    assert math.isnan(last["openness"]) and math.isnan(last["mean_overfit_rate"])
    assert last["new_weight"] is None and last["selected"] == 0


def _frame_colours(sheet: Image.Image) -> list[tuple]:
    """Returns the frame colours met left to right along the row with the most thumbnail blue."""
    pixels = np.asarray(sheet)
    row = pixels[np.argmax((pixels == BLUE).all(-1).sum(1))]
    colours = [tuple(int(c) for c in p) for p in row]
    runs = [c for i, c in enumerate(colours) if i == 0 or c != colours[i - 1]]
    return [c for c in runs if c not in {(255, 255, 255), BLUE}]


def test_contact_sheet_frames_overfit_red_and_the_chosen_image_green():
    images = [{"path": "a.png", "overfit": True, "sim_anchor": 0.2, "sim_plain": [0.3], "seed": 0},
              {"path": "b.png", "overfit": True, "sim_anchor": 0.25, "sim_plain": [0.3], "seed": 1},
              {"path": "c.png", "overfit": False, "sim_anchor": 0.3, "sim_plain": [0.2], "seed": 2}]
    direction = {"prompt_id": 0, "prompt": "a <x> cat in park", "overfit_rate": 2 / 3, "entropy": 0.64,
                 "images": images}
    thumbnails = [Image.new("RGB", (40, 30), BLUE) for _ in images]
    sheet = report.contact_sheet(from_json(Direction, direction), thumbnails, selected={"b.png"}, thumb=32)
    # Each frame is crossed twice (left, right edge); the chosen frame is green even when overfit.
    assert _frame_colours(sheet) == [OVERFIT, OVERFIT, SELECTED, SELECTED, NEUTRAL, NEUTRAL]
    wider = report.contact_sheet(from_json(Direction, {**direction, "images": images * 3}), thumbnails * 3,
                                 set(), thumb=32)
    assert wider.width > sheet.width and wider.height == sheet.height


def test_contact_sheet_rejects_a_thumbnail_count_that_differs_from_the_images():
    image = {"path": "a.png", "overfit": True, "sim_anchor": 0.2, "sim_plain": [0.3], "seed": 0}
    direction = from_json(Direction, {"prompt_id": 0, "prompt": "p", "overfit_rate": 1.0, "entropy": 0.0,
                                      "images": [image, {**image, "path": "b.png"}]})
    with pytest.raises(ValueError, match="1 thumbnails for 2 images"):
        report.contact_sheet(direction, [Image.new("RGB", (8, 8))], set())


def test_entropy_figure_draws_one_bar_per_direction_and_highlights_the_selected(run):
    _, records = run
    directions = typed(records)[0].directions
    figure = report.entropy_figure(1, directions, {directions[2].prompt})
    bars = figure.axes[0].patches
    np.testing.assert_allclose([b.get_width() for b in bars], [d.entropy for d in directions])
    colours = [to_rgb(b.get_facecolor()) for b in bars]
    green = tuple(c / 255 for c in SELECTED)
    assert [np.allclose(c, green) for c in colours] == [False, False, True]


def test_progress_figure_plots_rounds_with_a_gap_where_nothing_was_scored(run):
    _, records = run
    summaries = report.round_summaries(typed(records))
    figure = report.progress_figure(summaries)
    assert len(figure.axes) == 3
    openness_x, openness_y = figure.axes[0].lines[0].get_data()
    np.testing.assert_array_equal(openness_x, [1, 2, 3])
    np.testing.assert_allclose(openness_y, [records[0]["openness"], records[1]["openness"], np.nan])
    np.testing.assert_array_equal(figure.axes[1].lines[0].get_ydata(), [2, 3, 4])
    with_metrics = report.progress_figure(summaries, EVALUATIONS)
    assert len(with_metrics.axes) == 4
    labels = [line.get_label() for line in with_metrics.axes[3].lines]
    assert labels == ["txt_aln", "img_aln", "ovf (lower is better)"]
    np.testing.assert_allclose(with_metrics.axes[3].lines[2].get_ydata(), [0.35, 0.3, 0.25])


def test_a_record_without_a_required_field_is_refused_naming_round_and_field(run):
    workdir, records = run
    del records[1]["openness"]
    with pytest.raises(report.RecordError, match=r"missing field 'openness'"):
        report.write_report(workdir, typed(records))


def test_records_repeating_a_round_are_refused(run):
    workdir, records = run
    with pytest.raises(report.RecordError, match="repeat a round"):
        report.write_report(workdir, typed([records[0], records[0]]))


def test_a_missing_image_is_reported_by_its_path(run):
    workdir, records = run
    missing = records[0]["directions"][2]["images"][1]["path"]
    (workdir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        report.write_report(workdir, typed(records))


def test_a_report_before_any_finished_round_says_so(tmp_path):
    page = report.write_report(tmp_path, []).read_text()
    assert "No round has finished yet" in page
    assert not (tmp_path / "report").exists()


MATH_LOOKING_PROMPTS = ["a $5 teapot", "a cost of $x$", "$$", "two $5 and $6 teapots", "$x^$",
                        r"$\notacommand$", "back\\slash", "snake_case ^ caret_"]


def test_figures_draw_prompts_and_metric_names_with_dollars_literally(run, tmp_path):
    """matplotlib reads "$...$" as mathtext: "$x^$" would not render, "$5 and $6" would garble."""
    directions = [from_json(Direction, {"prompt_id": i, "prompt": prompt, "entropy": 0.5, "overfit_rate": 0.2,
                                        "images": []})
                  for i, prompt in enumerate(MATH_LOOKING_PROMPTS)]
    figure = report.entropy_figure(1, directions, {"$$"})
    figure.savefig(tmp_path / "entropy.png")
    labels = figure.axes[0].get_yticklabels()
    assert [label.get_text() for label in labels] == MATH_LOOKING_PROMPTS
    assert not any(label.get_parse_math() for label in labels)
    _, records = run
    evaluations = [{"round": 1, "$x^$": 0.3, "cost $5 and $6": 0.2}]
    progress = report.progress_figure(report.round_summaries(typed(records)), evaluations)
    progress.savefig(tmp_path / "progress.png")
    legend = progress.axes[-1].get_legend().get_texts()
    assert [text.get_text() for text in legend] == ["$x^$", "cost $5 and $6"]
    assert not any(text.get_parse_math() for text in legend)
    assert (tmp_path / "entropy.png").read_bytes().startswith(b"\x89PNG")
