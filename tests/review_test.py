"""Tests for human feedback: the review page, its server and the selections file it saves."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from gal_jax import review

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
PROMPT_IDS = (0, 4, 7)  # pool positions: the page must use these ids, not the list positions


def _record(workdir: Path) -> dict:
    """Returns a scored round-2 record of 3 directions x 3 images, drawn under workdir."""
    directions = []
    for d, pid in enumerate(PROMPT_IDS):
        images = []
        for n in range(3):
            path = f"rounds/2/images/p{pid:03d}_s{n:02d}.png"
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (80 * d, 60 * n, 120)).save(workdir / path)
            images.append({"path": path, "seed": n, "sim_anchor": 0.3 - 0.01 * n,
                           "sim_plain": [0.29, 0.28], "overfit": n == 2})
        directions.append({"prompt": f"a <tiny-teapot> teapot in place {pid}", "prompt_id": pid,
                           "overfit_rate": 1 / 3, "entropy": 0.6365, "images": images})
    return {"round": 2, "k": 2, "directions": directions, "selected": []}


@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def record(workdir) -> dict:
    return _record(workdir)


def _image(record: dict, direction: int, n: int) -> str:
    return record["directions"][direction]["images"][n]["path"]


def _choice(record: dict, direction: int, n: int) -> dict:
    d = record["directions"][direction]
    return {"prompt_id": d["prompt_id"], "prompt": d["prompt"],
            "image": _image(record, direction, n)}


def test_review_page_shows_every_direction_with_its_images_and_sims(workdir, record):
    page = review.write_review_page(workdir, record, k=2)
    assert page == workdir / "rounds" / "2" / "review.html"
    text = page.read_text()
    assert re.findall(r'data-prompt-id="(\d+)"', text) == [str(pid) for pid in PROMPT_IDS]
    paths = re.findall(r'data-path="([^"]+)"', text)
    assert paths == [image["path"] for d in record["directions"] for image in d["images"]]
    for src in re.findall(r'<img src="([^"]+)"', text):
        assert (page.parent / urllib.parse.unquote(src)).is_file(), src
    assert "a &lt;tiny-teapot&gt; teapot in place 4" in text and "<tiny-teapot>" not in text
    assert "anchor 0.290 · plain 0.290" in text
    assert text.count("<span class=ovf>OVF</span>") == 3
    assert "/ 2 directions chosen" in text
    assert json.loads((page.parent / "review.json").read_text())["k"] == 2


def test_review_page_refuses_a_round_without_directions(workdir, record):
    with pytest.raises(review.SelectionsError, match="no directions to review"):
        review.write_review_page(workdir, {**record, "directions": []}, k=2)


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_read_selections_returns_the_checked_entries_in_file_order(workdir, record):
    chosen = [_choice(record, 2, 1), _choice(record, 0, 0)]
    path = _write(workdir / "rounds/2/selections.json", {"round": 2, "selected": chosen})
    assert review.read_selections(path, record) == chosen


def test_read_selections_accepts_an_empty_choice(workdir, record):
    path = _write(workdir / "selections.json", {"round": 2, "selected": []})
    assert review.read_selections(path, record) == []


BAD_CHOICES = [  # (case, selected entries built from the record, what the error must say)
    pytest.param(lambda r: [_choice(r, 0, 0), {**_choice(r, 1, 0), "prompt_id": 3}],
                 r"selected\[1\]: unknown prompt_id 3", id="unknown prompt_id"),
    pytest.param(lambda r: [{**_choice(r, 0, 0), "prompt": r["directions"][1]["prompt"]}],
                 r"selected\[0\]: prompt .* is not direction 0's",
                 id="prompt of another direction"),
    pytest.param(lambda r: [_choice(r, 0, 0), _choice(r, 0, 1)],
                 r"selected\[1\]: direction 0 .* selected twice", id="direction twice"),
    pytest.param(lambda r: [{**_choice(r, 0, 0), "image": _image(r, 2, 0)}],
                 r"selected\[0\]: image .*p007_s00.png' belongs to direction 7, not 0",
                 id="image of another direction"),
    pytest.param(lambda r: [{**_choice(r, 0, 0), "image": "rounds/2/images/nope.png"}],
                 r"selected\[0\]: image .* not an image generated", id="unknown image"),
    pytest.param(lambda r: [{"prompt_id": 0, "prompt": r["directions"][0]["prompt"]}],
                 r"selected\[0\]: 'image' must be str", id="missing field"),
    pytest.param(lambda r: [{**_choice(r, 0, 0), "prompt_id": "0"}],
                 r"selected\[0\]: 'prompt_id' must be int", id="id given as text"),
]


@pytest.mark.parametrize("make_selected, message", BAD_CHOICES)
def test_read_selections_names_the_file_and_entry_of_a_bad_choice(workdir, record, make_selected,
                                                                  message):
    path = _write(workdir / "rounds/2/selections.json",
                  {"round": 2, "selected": make_selected(record)})
    with pytest.raises(review.SelectionsError, match=re.escape(str(path)) + ": " + message):
        review.read_selections(path, record)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('[{"prompt_id": 0}]', 'expected {"round": r, "selected": \\[...\\]}'),
    ('{"round": 1, "selected": []}', "round 1 does not match round 2"),
])
def test_read_selections_refuses_malformed_files_naming_them(workdir, record, content, message):
    path = _write(workdir / "rounds/2/selections.json", content)
    with pytest.raises(review.SelectionsError, match=re.escape(str(path)) + ": " + message):
        review.read_selections(path, record)


def test_read_selections_of_a_missing_file_raises_file_not_found(workdir, record):
    with pytest.raises(FileNotFoundError):
        review.read_selections(workdir / "rounds/2/selections.json", record)


@pytest.fixture
def served(workdir, record):
    """Yields (page url, selections path) of a running review server for round 2."""
    review.write_review_page(workdir, record, k=2)
    server, url = review.serve_review(workdir, 2)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield url, workdir / "rounds" / "2" / "selections.json"
    server.shutdown()
    server.server_close()
    thread.join()


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _endpoint(url: str) -> str:
    return urllib.parse.urljoin(url, "/selections")


def test_server_serves_the_page_and_its_images(served, record):
    url, _ = served
    assert url.startswith("http://127.0.0.1:") and url.endswith("/rounds/2/review.html")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert "pick directions and images" in response.read().decode()
    image_url = urllib.parse.urljoin(url, "/" + _image(record, 1, 2))
    with urllib.request.urlopen(image_url, timeout=10) as response:
        assert response.read().startswith(b"\x89PNG")


def test_server_writes_a_valid_post_to_selections_json(served, record, workdir):
    url, target = served
    body = {"round": 2, "selected": [_choice(record, 1, 2), _choice(record, 2, 0)]}
    status, reply = _post(_endpoint(url), json.dumps(body).encode())
    assert (status, reply) == (200, {"saved": str(target.resolve()), "selected": 2})
    assert review.read_selections(target, record) == body["selected"]
    assert not list(target.parent.glob("*.tmp"))


@pytest.mark.parametrize("body, headers, code, message", [
    (b"{broken", {}, 400, "Expecting property name"),
    (b'{"round": 2, "selected": [{"prompt_id": 9, "prompt": "x", "image": "y"}]}', {}, 400,
     "POST /selections: selected[0]: unknown prompt_id 9"),
    (b'{"round": 2, "selected": []}', {"Origin": "http://evil.example"}, 403, "cross-origin"),
])
def test_server_refuses_bad_posts_and_writes_nothing(served, body, headers, code, message):
    url, target = served
    status, reply = _post(_endpoint(url), body, headers)
    assert status == code and message in reply["error"]
    assert not target.exists()


def test_server_answers_404_to_a_post_elsewhere(served):
    url, target = served
    assert _post(urllib.parse.urljoin(url, "/record.json"), b"{}")[0] == 404
    assert not target.exists()


def test_serve_review_writes_the_page_from_the_record_when_none_exists(workdir, record):
    _write(workdir / "rounds/2/record.json", record)
    server, url = review.serve_review(workdir, 2)
    server.server_close()
    assert (workdir / "rounds/2/review.html").is_file()
    assert json.loads((workdir / "rounds/2/review.json").read_text())["k"] == record["k"]


def test_serve_review_of_an_unknown_round_names_the_missing_files(workdir):
    with pytest.raises(FileNotFoundError, match="round 5: neither .*review.json nor .*record.json"):
        review.serve_review(workdir, 5)


# ----------------------------------------------------------------------------------------------
# In a browser.


def _browser(download_dir: Path):
    """Returns a headless Chromium webdriver; skips the test when Chromium or selenium is absent."""
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install selenium)")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture
def browser(tmp_path):
    driver = _browser(tmp_path / "downloads")
    yield driver
    driver.quit()


def _section(browser, pid: int):
    return browser.find_element("css selector", f'section.direction[data-prompt-id="{pid}"]')


def _wait(browser, condition, timeout: float = 10.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda _: condition())


def _pick_two_directions(browser) -> None:
    """Ticks direction 0 then clicks its third image; clicks direction 7's second image directly."""
    save = browser.find_element("id", "save")
    assert not save.is_enabled()
    _section(browser, 0).find_element("css selector", "input.tick").click()
    assert "need an image" in browser.find_element("id", "warn").text and not save.is_enabled()
    _section(browser, 0).find_elements("css selector", ".pick")[2].click()
    _section(browser, 7).find_elements("css selector", ".pick")[1].click()
    assert _section(browser, 7).find_element("css selector", "input.tick").is_selected()
    assert browser.find_element("id", "count").text == "2"
    assert browser.find_element("id", "warn").text == "" and save.is_enabled()


def test_review_page_in_headless_chromium_saves_the_choice_through_the_server(served, record,
                                                                             browser):
    url, target = served
    browser.get(url)
    _pick_two_directions(browser)
    browser.find_element("id", "save").click()
    _wait(browser, lambda: "Saved 2 selection(s)" in browser.find_element("id", "status").text)
    expected = [_choice(record, 0, 2), _choice(record, 2, 1)]
    assert json.loads(target.read_text()) == {"round": 2, "selected": expected}
    assert review.read_selections(target, record) == expected


def test_review_page_opened_as_a_file_downloads_selections_json(workdir, record, browser, tmp_path):
    page = review.write_review_page(workdir, record, k=2)
    browser.get(page.as_uri())
    _pick_two_directions(browser)
    browser.find_element("id", "save").click()
    downloaded = tmp_path / "downloads" / "selections.json"
    _wait(browser, downloaded.is_file)
    assert "move it into" in browser.find_element("id", "status").text
    expected = [_choice(record, 0, 2), _choice(record, 2, 1)]
    assert review.read_selections(downloaded, record) == expected
