"""The report and the review page in headless Chromium: no console error, no broken image, and a
screenshot of each (under the test's tmp_path) to look at."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import chromium_driver
from gal_jax import report, review, review_server
from gal_jax.records import Direction, RoundRecord, from_json
from gal_jax.workdir import Workdir

PLACES = ["in park", "on the moon", "in a cave", "on the beach", "in a kitchen", "in desert",
          "under the night sky"]
# Per prompt_id, of 6 images: round 1 queries 0 and 5 (H = ln 2), round 2 queries 2 and 3 (equal H,
# pool order), and round 3's pool [1, 4, 6] has one direction with H > 0 (the rule would stop).
OVERFIT_COUNTS = [3, 6, 2, 4, 1, 3, 0]
IMAGES = 6
K = 2


def _draw(path: Path, seed: int, size: int = 64) -> None:
    """Draws a noisy colour field, so that thumbnails differ and a blank one would show."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, size=3)
    pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _directions(workdir: Path, r: int, pool: list[int]) -> list[dict]:
    directions = []
    for pid in pool:
        flags = [n < OVERFIT_COUNTS[pid] for n in range(IMAGES)]
        images = []
        for n, overfit in enumerate(flags):
            path = f"rounds/{r}/images/p{pid:03d}_s{n:02d}.png"
            _draw(workdir / path, 100 * r + 10 * pid + n)
            anchor = 0.24 + 0.01 * ((n * 7 + pid) % IMAGES)
            images.append({"path": path, "seed": n, "sim_anchor": anchor, "overfit": overfit,
                           "sim_plain": [anchor + (0.02 if overfit else -0.02)]})
        rate = sum(flags) / IMAGES
        entropy = 0.0 if rate in (0, 1) else -rate * math.log(rate) - (1 - rate) * math.log(1 - rate)
        directions.append({"prompt_id": pid, "prompt": f"a <tiny-teapot> teapot {PLACES[pid]}",
                           "overfit_rate": rate, "entropy": entropy, "images": images})
    return directions


def _run(tmp_path: Path) -> tuple[Path, list[RoundRecord], list[int]]:
    """Returns (workdir, records, the pool left) of a 3-round uncertainty run, with a JPEG
    reference outside the workdir."""
    workdir = tmp_path / "run"
    outside = tmp_path / "data" / "teapot.jpg"
    outside.parent.mkdir(parents=True)
    Image.new("RGB", (300, 200), (230, 160, 40)).save(outside)
    references = [{"image": str(outside), "prompt": "a <tiny-teapot> teapot on a table",
                   "plain_prompt": "a teapot on a table", "weight": 1.0, "source": "user"}]
    records, pool = [], list(range(len(PLACES)))
    for r in (1, 2, 3):
        directions = _directions(workdir, r, pool) if r < 3 else []
        ranked = sorted(directions, key=lambda d: -d["entropy"])[:K]
        openness = 0.005 * float(np.mean([d["entropy"] for d in directions])) if directions else 0.0
        selected = [{"prompt_id": d["prompt_id"], "prompt": d["prompt"], "weight": openness,
                     "image": max(d["images"], key=lambda i: i["sim_anchor"])["path"]}
                    for d in ranked]
        records.append(RoundRecord.from_json({
            "round": r, "feedback": "uncertainty", "balance": True, "lambda": 0.005, "k": K,
            "concept_phrase": "a <tiny-teapot> teapot", "plain_prompts": ["a teapot on a table"],
            "references": list(references), "directions": directions, "openness": openness,
            "selected": selected, "stopped": False,
            "timings": {"train": 20.0, "generate": 9.0, "score": 1.0, "write": 0.5},
            "train_loss": [{"step": s, "loss": 0.3 * math.exp(-s / 20) + 0.05 + 0.01 * r}
                           for s in range(0, 100, 5)]}))
        references += [{**s, "plain_prompt": None, "source": f"round-{r}"} for s in selected]
        pool = [pid for pid in pool if pid not in {s["prompt_id"] for s in selected}]
    return workdir, records, pool


EVALUATIONS = [{"round": r, "txt_aln": 0.29 + 0.01 * r, "img_aln": 0.8 - 0.01 * r,
                "ovf": 0.4 - 0.05 * r} for r in (1, 2, 3)]


@pytest.fixture(scope="module")
def browser():
    driver = chromium_driver.start()
    yield driver
    driver.quit()


def _check_page(browser, url: str, screenshot: Path) -> None:
    """Loads url, asserts no console error and no broken image, and saves a full-page screenshot."""
    chromium_driver.console_errors(browser)  # clears what an earlier page logged
    browser.set_window_size(1400, 900)
    browser.get(url)
    assert chromium_driver.broken_images(browser) == []
    assert chromium_driver.console_errors(browser) == []
    chromium_driver.full_page_screenshot(browser, screenshot)
    payload = screenshot.read_bytes()
    assert payload.startswith(chromium_driver.PNG_SIGNATURE) and len(payload) > 10_000
    with Image.open(screenshot) as image:
        assert image.width >= 1000 and image.height >= 600


def test_the_checks_catch_a_broken_image_and_a_console_error(browser, tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                    '<img src="missing.png"><script>console.error("boom")</script></body></html>')
    chromium_driver.console_errors(browser)
    browser.get(page.as_uri())
    assert [src.rsplit("/", 1)[-1] for src in chromium_driver.broken_images(browser)] == [
        "missing.png"]
    assert any("boom" in message for message in chromium_driver.console_errors(browser))


def test_final_report_renders_in_chromium(browser, tmp_path):
    workdir, records, _ = _run(tmp_path)
    page = report.write_report(workdir, records, EVALUATIONS, model_dir=workdir / "model")
    (workdir / "model").mkdir()
    _check_page(browser, page.as_uri(), tmp_path / "report.png")
    final = browser.find_element("id", "final-model")
    assert final.is_displayed() and "Final model (round 3)" in final.text
    rows = browser.find_elements("css selector", "#round-1 table.why tr.picked")
    assert len(rows) == K
    assert browser.find_element("css selector", "img.loss").get_property("naturalWidth") > 0


def test_report_awaiting_feedback_renders_and_links_the_review_page(browser, tmp_path):
    workdir, records, pool = _run(tmp_path)
    # Round 3 of a human-feedback run: its pool scored, waiting for a person.
    directions = [from_json(Direction, d) for d in _directions(workdir, 3, pool)]
    review_page = review.write_review_page(workdir, 3, directions, K)
    page = report.write_report(workdir, records[:2], review_page=review_page)
    _check_page(browser, page.as_uri(), tmp_path / "report_awaiting.png")
    banner = browser.find_element("id", "awaiting")
    assert banner.is_displayed() and banner.location["y"] < 300
    assert "waits for human feedback on round 3" in banner.text
    banner.find_element("link text", "review page of round 3").click()
    assert browser.current_url == review_page.as_uri()
    assert chromium_driver.broken_images(browser) == []
    assert chromium_driver.console_errors(browser) == []


def test_review_page_renders_as_a_file_and_served(browser, tmp_path):
    workdir, records, _ = _run(tmp_path)
    page = review.write_review_page(workdir, 1, records[0].directions, K)
    _check_page(browser, page.as_uri(), tmp_path / "review_file.png")
    assert len(browser.find_elements("css selector", "input.tick:checked")) == K
    server, url = review_server.serve_review(Workdir(workdir).root, 1)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        _check_page(browser, url, tmp_path / "review_served.png")
        assert browser.find_element("id", "count").text == str(K)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
