"""Tests for the run report: figures from hand-made round records, and the HTML linking them."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from gal_jax import report, report_html
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
POOLS = {1: [0, 1, 2], 2: [1, 2], 3: []}  # round 1 picks prompt 0 (a tie, won by pool order), 2 prompt 2


@pytest.fixture
def run(tmp_path) -> tuple[Path, list[dict]]:
    """Returns (workdir, records) of a 3-round run: two scored rounds and a final training round.

    Each scored round queries (k = 1) its most uncertain direction's last image, as the
    uncertainty rule does; one original reference lies outside the workdir, named by its absolute
    path. Every round records a training loss curve.
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
        top = sorted(directions, key=lambda d: -d["entropy"])[:1]  # stable: ties in pool order
        selected = [{"prompt_id": d["prompt_id"], "prompt": d["prompt"],
                     "image": d["images"][-1]["path"], "weight": openness} for d in top]
        records.append({
            "round": r, "feedback": "uncertainty", "balance": True, "lambda": 0.005, "k": 1,
            "concept_phrase": "a <tiny-teapot> teapot", "plain_prompts": ["a teapot on a table"], "references": list(references),
            "directions": directions, "openness": openness, "selected": selected, "stopped": False,
            "timings": {"train": 12.5 * r, "generate": 3.0, "score": 0.5, "write": 0.25},
            "train_loss": [{"step": 10 * s, "loss": 0.5 / (s + 1) + 0.01 * r} for s in range(5)]})
        references += [{**s, "plain_prompt": None, "source": f"round-{r}"} for s in selected]
    return workdir, records


def typed(records: list[dict]) -> list[RoundRecord]:
    """Returns the hand-made records as the typed records the report takes."""
    return [RoundRecord.from_json(record) for record in records]


EVALUATIONS = [{"round": r, "txt_aln": 0.29 + 0.01 * r, "img_aln": 0.8 - 0.01 * r,
                "ovf": 0.4 - 0.05 * r} for r in (1, 2, 3)]


def _links(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"#][^"]*)"', page)


def _assert_links_resolve_inside(workdir: Path, page: str) -> list[str]:
    """Returns the page's links after checking each is relative and names a file inside workdir."""
    links = _links(page)
    assert links
    root = workdir.resolve()
    for link in links:
        assert "://" not in link and not link.startswith("/"), link
        target = (workdir / urllib.parse.unquote(link)).resolve()
        assert target.is_relative_to(root) and target != root, f"{link} leaves the workdir"
        assert target.exists(), link
    return links


def test_report_links_only_files_inside_the_workdir_by_relative_urls(run):
    workdir, records = run
    path = report.write_report(workdir, typed(records), EVALUATIONS)
    assert path == workdir / "report.html"
    links = _assert_links_resolve_inside(workdir, path.read_text())
    outside = workdir.parent / "data" / "ref_abs.png"
    copies = list((workdir / "report" / "references").iterdir())
    assert [c.read_bytes() for c in copies] == [outside.read_bytes()]  # the original bytes
    assert copies[0].suffix == ".png" and f"report/references/{copies[0].name}" in links
    assert "data/ref0.png" in links  # inside the workdir: linked where it lies, not copied


def test_report_links_still_resolve_in_a_copy_of_the_workdir(run, tmp_path):
    workdir, records = run
    model = workdir / "model"
    _png(model / "unet" / "sample.png")
    review_page = workdir / "rounds" / "3" / "review.html"
    review_page.parent.mkdir(parents=True)
    review_page.write_text("<html></html>")
    report.write_report(workdir, typed(records[:2]), EVALUATIONS, review_page=review_page)
    copy = tmp_path / "elsewhere" / "moved run"  # a space: links must be percent-encoded
    shutil.copytree(workdir, copy)
    shutil.rmtree(workdir)
    _assert_links_resolve_inside(copy, (copy / "report.html").read_text())
    report.write_report(copy, typed(records), model_dir=copy / "model")  # rewritten there
    shutil.rmtree(tmp_path / "data")  # the user's data is gone too: the report keeps its copy
    links = _assert_links_resolve_inside(copy, (copy / "report.html").read_text())
    assert "model/" in links


def test_the_link_check_catches_a_link_that_leaves_the_workdir(run):
    """The check above must fail on the old report's "../" links to the user's data."""
    workdir, _ = run
    page = '<img src="../data/ref_abs.png">'
    with pytest.raises(AssertionError, match="leaves the workdir"):
        _assert_links_resolve_inside(workdir, page)


def test_report_writes_progress_entropy_and_one_contact_sheet_per_direction(run):
    workdir, records = run
    report.write_report(workdir, typed(records))
    out = workdir / "report"
    expected = {"progress.png", "loss.png", "round_01/entropy.png", "round_02/entropy.png",
                *(f"round_01/direction_{d:02d}.png" for d in range(3)),
                *(f"round_02/direction_{d:02d}.png" for d in range(2))}
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.png")
               if not {"thumbs", "references"} & set(p.parts)}
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
    assert f"<td>{weight:.3g}</td></tr>" in page  # the queried direction's row ends with it
    assert "<td>37.5</td>" in page  # round 3 train seconds
    assert "<td>0.13</td>" in page  # round 3 last train loss: 0.5 / 5 + 0.03
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


def test_contact_sheet_frames_an_identity_mixed_image_red():
    images = [{"path": "a.png", "overfit": False, "sim_anchor": 0.3, "sim_plain": [0.2], "seed": 0,
               "sim_subjects": [[0.9, 0.1], [0.8, 0.2]], "identity_mixed": True},
              {"path": "b.png", "overfit": False, "sim_anchor": 0.3, "sim_plain": [0.2], "seed": 1,
               "sim_subjects": [[0.9, 0.1], [0.1, 0.9]], "identity_mixed": False}]
    direction = {"prompt_id": 0, "prompt": "{a} and {b} in park", "overfit_rate": 0.5, "entropy": 0.69,
                 "images": images}
    thumbnails = [Image.new("RGB", (40, 30), BLUE) for _ in images]
    sheet = report.contact_sheet(from_json(Direction, direction), thumbnails, selected=set(), thumb=32)
    assert _frame_colours(sheet) == [OVERFIT, OVERFIT, NEUTRAL, NEUTRAL]


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


# ----------------------------------------------------------------------------------------------
# Why: the decision table of a round.

H = {p: _entropy(p) for p in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)}


def _scored(rates: list[float], picks: dict[int, int], *, feedback="uncertainty", k=2,
            stopped=False, balance=True, image_rule="highest sim_anchor") -> RoundRecord:
    """Returns a round-4 record of directions with these overfit rates (prompt_id = position).

    Each direction has 3 images, seeds 10-12, the middle one with the highest sim_anchor; picks
    maps a prompt_id to the image index queried from it.
    """
    directions = [{"prompt_id": pid, "prompt": f"a <tiny-teapot> teapot {pid}", "overfit_rate": rate,
                   "entropy": _entropy(rate),
                   "images": [{"path": f"rounds/4/images/p{pid:03d}_s{n:02d}.png", "seed": 10 + n,
                               "sim_anchor": (0.21, 0.3125, 0.2)[n], "sim_plain": [0.25],
                               "overfit": n != 1} for n in range(3)]}
                  for pid, rate in enumerate(rates)]
    openness = 0.005 * float(np.mean([d["entropy"] for d in directions]))
    weight = openness if balance else 1.0
    selected = [{"prompt_id": pid, "prompt": directions[pid]["prompt"],
                 "image": directions[pid]["images"][n]["path"], "weight": weight}
                for pid, n in picks.items()]
    return RoundRecord.from_json({
        "round": 4, "feedback": feedback, "balance": balance, "lambda": 0.005, "k": k,
        "concept_phrase": "a <tiny-teapot> teapot", "plain_prompts": ["a teapot"], "references": [],
        "directions": directions, "openness": openness, "selected": selected, "stopped": stopped,
        "image_rule": image_rule})


def _table(record: RoundRecord) -> list[tuple]:
    return [(row.rank, row.direction.prompt_id, row.reason, row.image and row.image.seed,
             row.image_reason) for row in report_html.explain_round(record)]


def test_uncertainty_round_explains_rank_ties_and_the_k_th():
    # H: 0.693, 0.562, 0, 0.562 (a tie with prompt 1, later in the pool), 0.325.
    record = _scored([0.5, 0.25, 0.0, 0.75, 0.1], picks={0: 1, 1: 1})
    assert _table(record) == [
        (1, 0, "top k by H", 11, "highest sim_anchor = 0.312"),
        (2, 1, "top k by H", 11, "highest sim_anchor = 0.312"),
        (3, 3, "below the k-th (same H, later by pool order)", None, ""),
        (4, 4, "below the k-th", None, ""),
        (5, 2, "H = 0", None, ""),
    ]
    # mean H = (0.6931 + 2 x 0.5623 + 0.3251) / 5 = 0.4286
    assert report_html.weight_formula(record) == "O = λ × mean H = 0.005 × 0.429 = 0.00214"
    text = report_html.rule_text(record)
    assert "query the top k = 2 when at least k have H &gt; 0 (4 do)" in text
    assert "Weight of the new references: <b>O = λ × mean H = 0.005 × 0.429 = 0.00214</b>" in text


def test_stop_round_says_the_stop_rule_fired_for_every_direction():
    record = _scored([0.0, 1.0, 0.5], picks={}, k=2, stopped=True)
    rule = "stop rule: fewer than k directions with H > 0"
    assert _table(record) == [(1, 2, rule, None, ""), (2, 0, f"H = 0; {rule}", None, ""),
                              (3, 1, f"H = 0; {rule}", None, "")]
    text = report_html.rule_text(record)
    assert "Stop rule fired: fewer than k = 2 directions have H &gt; 0" in text
    assert "(1 do)" in text and "Nothing queried; openness O = λ × mean H" in text


def test_random_round_says_chosen_at_random_and_weight_one_without_balance():
    record = _scored([0.5, 0.25, 0.1], picks={2: 0}, k=1, feedback="random", balance=False,
                     image_rule="random (seed 7)")
    assert _table(record) == [(1, 0, "not drawn", None, ""), (2, 1, "not drawn", None, ""),
                              (3, 2, "chosen at random", 10, "drawn at random (seed 7)")]
    assert report_html.weight_formula(record).startswith("1 (balance off; the round's O = λ × ")
    assert "k = 1 of the 3 directions drawn at random" in report_html.rule_text(record)
    best = dataclasses.replace(record, image_rule="highest sim_anchor")  # random directions only
    assert _table(best)[2][3:] == (10, "highest sim_anchor = 0.210")


def test_human_round_says_chosen_by_a_person_and_the_persons_pick():
    record = _scored([0.5, 0.25, 0.1], picks={1: 2}, feedback="human")
    assert _table(record) == [(1, 0, "not chosen by the person", None, ""),
                              (2, 1, "chosen by a person", 12, "the person's pick"),
                              (3, 2, "not chosen by the person", None, "")]
    stopped = _scored([0.5, 0.25], picks={}, feedback="human", stopped=True)
    assert {row.reason for row in report_html.explain_round(stopped)} == {
        "the person chose none: this round's model is final"}


def test_a_selected_image_not_among_its_directions_images_is_refused():
    record = _scored([0.5, 0.25], picks={0: 1})
    broken = dataclasses.replace(record, selected=(dataclasses.replace(
        record.selected[0], image="rounds/4/images/p001_s00.png"),))
    with pytest.raises(report.RecordError, match="is not one of direction 0's images"):
        report_html.explain_round(broken)


def _why_rows(page: str, round_index: int) -> list[list[str]]:
    """Returns the text of the cells of a round's decision table in the page."""
    section = page.split(f'id="round-{round_index}"')[1].split("</section>")[0]
    table = re.search(r"<table class=why>(.*?)</table>", section, re.S).group(1)
    return [[re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table)[1:]]


def test_report_page_shows_each_rounds_decision_table_by_rank(run):
    workdir, records = run
    page = report.write_report(workdir, typed(records)).read_text()
    first = _why_rows(page, 1)
    assert [row[:6] for row in first] == [
        ["1", "a &lt;tiny-teapot&gt; teapot in park", "0.75", "0.562", "yes", "top k by H"],
        ["2", "a &lt;tiny-teapot&gt; teapot in a cave", "0.25", "0.562", "no",
         "below the k-th (same H, later by pool order)"],
        ["3", "a &lt;tiny-teapot&gt; teapot on the moon", "1.00", "0.000", "no", "H = 0"]]
    weight = records[0]["openness"]
    assert first[0][6:] == ["seed 3", "highest sim_anchor = 0.280", f"{weight:.3g}"]
    assert [row[0] + row[5] for row in _why_rows(page, 2)] == ["1top k by H", "2H = 0"]
    mean_h = 2 * H[0.25] / 3
    assert f"0.005 × {mean_h:.3g} = {0.005 * mean_h:.3g}</b>" in page
    assert "class=why" not in page.split('id="round-3"')[1]  # the last round scored nothing


# ----------------------------------------------------------------------------------------------
# Training loss, final model, awaiting feedback.


def test_loss_figure_draws_one_line_per_round_with_a_curve(run):
    _, records = run
    typed_records = typed(records)
    typed_records[1] = dataclasses.replace(typed_records[1], train_loss=())  # a schema 1 record
    figure = report.loss_figure(typed_records)
    lines = figure.axes[0].lines
    assert [line.get_label() for line in lines] == ["round 1", "round 3"]
    np.testing.assert_array_equal(lines[1].get_xdata(), [0, 10, 20, 30, 40])
    np.testing.assert_allclose(lines[1].get_ydata(), [0.5 / (s + 1) + 0.03 for s in range(5)])
    assert report.loss_figure([dataclasses.replace(r, train_loss=()) for r in typed_records]) is None


def test_report_without_loss_curves_says_so_and_writes_no_loss_figure(run):
    workdir, records = run
    for record in records:
        del record["train_loss"]
    page = report.write_report(workdir, typed(records)).read_text()
    assert "No training loss recorded" in page and "loss.png" not in page
    assert not (workdir / "report" / "loss.png").exists()


def test_report_marks_the_final_model_and_how_to_load_it(run):
    workdir, records = run
    page = report.write_report(workdir, typed(records), model_dir=workdir / "model").read_text()
    top = page.split("<h2>")[0]
    assert 'Final model (round 3): <a href="model/">model/</a>' in top
    path = (workdir / "model").resolve()
    assert f"StableDiffusionPipeline.from_pretrained(&quot;{path}&quot;)" in top
    assert page.count("final model</span>") == 1
    assert "final model</span>" in page.split('id="round-3"')[1]
    assert "Final model" not in report.write_report(workdir, typed(records)).read_text()


def test_report_says_prominently_that_the_run_waits_for_human_feedback(run):
    workdir, records = run
    review_page = workdir / "rounds" / "3" / "review.html"
    page = report.write_report(workdir, typed(records[:2]), review_page=review_page).read_text()
    top = page.split("<h2>")[0]
    assert "The run waits for human feedback on round 3" in top
    assert '<a href="rounds/3/review.html">review page of round 3</a>' in top
    resolved = workdir.resolve()
    assert f"gal-jax review --workdir={resolved} --round=3" in top
    assert f"move it into <code>{resolved}/rounds/3/</code>" in top
    assert "Rerun the same <code>gal-jax run</code> command" in top
    first = report.write_report(workdir, [], review_page=workdir / "rounds/1/review.html")
    assert "waits for human feedback on round 1" in first.read_text()


def test_report_refuses_a_review_page_of_another_round(run):
    workdir, records = run
    with pytest.raises(ValueError, match="not the review page of round 3"):
        report.write_report(workdir, typed(records[:2]),
                            review_page=workdir / "rounds" / "2" / "review.html")


def test_a_choice_that_contradicts_the_rule_is_shown_as_such():
    record = _scored([0.5, 0.25, 0.1], picks={2: 1}, k=1)  # the rule would query prompt 0
    assert [row[2] for row in _table(record)] == [
        "not queried, though in the top k", "below the k-th", "queried, though ranked below the k-th"]


def test_a_rewritten_report_redraws_only_the_rounds_whose_record_or_images_changed(run, monkeypatch):
    workdir, records = run
    drawn = []
    contact_sheet = report.contact_sheet
    monkeypatch.setattr(report, "contact_sheet", lambda direction, *a, **k: drawn.append(direction.prompt_id)
                        or contact_sheet(direction, *a, **k))
    report.write_report(workdir, typed(records[:1]))
    assert drawn == [0, 1, 2]
    drawn.clear()
    page = report.write_report(workdir, typed(records[:2])).read_text()
    assert drawn == [1, 2]  # round 2's sheets only: round 1's are as drawn
    _assert_links_resolve_inside(workdir, page)
    assert 'round_01/direction_02.png' in page

    # A changed record (another pick), a changed image, a deleted sheet or a damaged index: redrawn.
    changed = [dict(records[0], selected=[dict(records[0]["selected"][0], weight=0.5)]), records[1]]
    drawn.clear()
    report.write_report(workdir, typed(changed))
    assert drawn == [0, 1, 2]
    _png(workdir / records[1]["directions"][0]["images"][0]["path"], (9, 9, 9))
    drawn.clear()
    report.write_report(workdir, typed(changed))
    assert drawn == [1, 2]
    (workdir / "report" / "round_01" / "direction_01.png").unlink()
    (workdir / "report" / "round_02" / "figures.json").write_text("{not json")
    drawn.clear()
    report.write_report(workdir, typed(changed))
    assert drawn == [0, 1, 2, 1, 2]
    assert (workdir / "report" / "round_01" / "direction_01.png").is_file()


def test_a_cached_round_still_names_an_image_deleted_since(run):
    workdir, records = run
    report.write_report(workdir, typed(records[:1]))
    missing = records[0]["directions"][0]["images"][0]["path"]
    (workdir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        report.write_report(workdir, typed(records[:1]))
