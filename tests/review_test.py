"""Tests for human feedback: the review page, its server and the selections file it saves."""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import chromium_driver
from gal_jax import review, review_server
from gal_jax.records import Direction, from_json
from gal_jax.workdir import Workdir

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


def _directions(record: dict) -> list[Direction]:
    return [from_json(Direction, d) for d in record["directions"]]


def write_page(workdir: Path, record: dict, k: int) -> Path:
    return review.write_review_page(workdir, record["round"], _directions(record), k)


def read_selections(path: Path, record: dict) -> list[dict]:
    return review.read_selections(path, record["round"], _directions(record))


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
    page = write_page(workdir, record, k=2)
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


def _with_entropies(record: dict, rates: list[float]) -> dict:
    """Returns the record with its directions' overfit rates (and so entropies) replaced."""
    directions = [{**d, "overfit_rate": rate, "entropy": _entropy(rate)}
                  for d, rate in zip(record["directions"], rates)]
    return {**record, "directions": directions}


def _entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -p * math.log(p) - (1 - p) * math.log(1 - p)


def _page_order(text: str) -> list[tuple[int, int]]:
    return [(int(pid), int(rank)) for pid, rank in
            re.findall(r'data-prompt-id="(\d+)" data-prompt="[^"]*" data-rank="(\d+)"', text)]


def test_review_page_ranks_directions_by_entropy_ties_by_pool_order(workdir, record):
    tied = _with_entropies(record, [0.25, 0.5, 0.75])  # H: 0.562, 0.693, 0.562
    text = write_page(workdir, tied, k=1).read_text()
    assert _page_order(text) == [(4, 1), (0, 2), (7, 3)]
    assert "#1</span> <b>a &lt;tiny-teapot&gt; teapot in place 4" in text
    assert "overfit rate p 0.50 · H 0.693" in text
    reviewed = json.loads((workdir / "rounds/2/review.json").read_text())
    assert [d["prompt_id"] for d in reviewed["directions"]] == [4, 0, 7]


def _suggested(text: str) -> dict[int, list[str]]:
    """Returns {prompt_id: [paths of pre-selected images]} of the pre-ticked directions."""
    suggested = {}
    for section in re.findall(r"<section class=direction.*?</section>", text, re.S):
        if "class=tick checked>" in section:
            pid = int(re.search(r'data-prompt-id="(\d+)"', section).group(1))
            suggested[pid] = re.findall(r'class="pick[^"]* selected" data-path="([^"]+)"', section)
    return suggested


def test_review_page_pre_ticks_the_top_k_with_their_best_images(workdir, record):
    ranked = _with_entropies(record, [0.1, 0.5, 0.25])  # ranks: 4, 7, 0
    ranked["directions"][2]["images"][1]["sim_anchor"] = 0.5  # direction 7's best: its second
    text = write_page(workdir, ranked, k=2).read_text()
    assert _suggested(text) == {4: [_image(ranked, 1, 0)], 7: [_image(ranked, 2, 1)]}
    assert text.count("class=suggested>") == 2 and "suggested by the uncertainty rule" in text
    assert "Nothing is pre-ticked" not in text


@pytest.mark.parametrize("rates", [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
def test_review_page_pre_ticks_nothing_when_fewer_than_k_have_positive_entropy(workdir, record,
                                                                              rates):
    text = write_page(workdir, _with_entropies(record, rates), k=2).read_text()
    assert _suggested(text) == {} and "class=suggested>" not in text
    assert "Nothing is pre-ticked: fewer than k = 2 directions have H &gt; 0" in text
    assert write_page(workdir, _with_entropies(record, rates), k=1).read_text().count(
        "class=tick checked>") == (1 if 0.5 in rates else 0)


def test_review_page_refuses_a_round_without_directions(workdir, record):
    with pytest.raises(review.SelectionsError, match="no directions to review"):
        write_page(workdir, {**record, "directions": []}, k=2)


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_read_selections_returns_the_checked_entries_in_file_order(workdir, record):
    chosen = [_choice(record, 2, 1), _choice(record, 0, 0)]
    path = _write(workdir / "rounds/2/selections.json", {"round": 2, "selected": chosen})
    assert read_selections(path, record) == chosen


def test_read_selections_accepts_an_empty_choice(workdir, record):
    path = _write(workdir / "selections.json", {"round": 2, "selected": []})
    assert read_selections(path, record) == []


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
        read_selections(path, record)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('[{"prompt_id": 0}]', 'expected {"round": r, "selected": \\[...\\]}'),
    ('{"round": 1, "selected": []}', "round 1 does not match round 2"),
])
def test_read_selections_refuses_malformed_files_naming_them(workdir, record, content, message):
    path = _write(workdir / "rounds/2/selections.json", content)
    with pytest.raises(review.SelectionsError, match=re.escape(str(path)) + ": " + message):
        read_selections(path, record)


def test_read_selections_of_a_missing_file_raises_file_not_found(workdir, record):
    with pytest.raises(FileNotFoundError):
        read_selections(workdir / "rounds/2/selections.json", record)


@pytest.fixture
def served(workdir, record, monkeypatch):
    """Yields (page url, selections path) of a running review server for round 2."""
    monkeypatch.setattr(review_server._ReviewHandler, "timeout", 1.0)  # a stalled body fails fast
    write_page(workdir, record, k=2)
    server, url = review_server.serve_review(workdir, 2)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield url, workdir / "rounds" / "2" / "selections.json"
    server.shutdown()
    server.server_close()
    thread.join()


def _token(url: str) -> str:
    """Returns the token in the review page the server at url sends."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return re.search(r'<meta name="gal-review-token" content="([^"]+)">',
                         response.read().decode()).group(1)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """Returns (status, JSON reply) of a POST sent as the served page sends it, unless headers
    (None values drop one) say otherwise."""
    headers = {"Content-Type": "application/json", "Origin": _origin(url),
               review_server.TOKEN_HEADER: _token(_page(url)), **(headers or {})}
    headers = {key: value for key, value in headers.items() if value is not None}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _page(url: str) -> str:
    return urllib.parse.urljoin(url, "/rounds/2/review.html")


def _endpoint(url: str) -> str:
    return urllib.parse.urljoin(url, "/selections")


def _raw(url: str, head: str, body: bytes = b"", wait: bool = True) -> tuple[int, dict | None]:
    """Returns (status, JSON reply or None) of a request sent byte for byte to the server at url.

    head is the request line and headers, one a line (CRLF and the blank line are added). With
    wait=False the connection is half-closed after the body, as by a client that gave up.
    """
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n" + body)
        if not wait:
            connection.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(payload) if payload else None


def _valid_body(record: dict) -> bytes:
    return json.dumps({"round": 2, "selected": [_choice(record, 1, 2)]}).encode()


def test_server_serves_the_page_and_its_images(served, record):
    url, _ = served
    assert url.startswith("http://127.0.0.1:") and url.endswith("/rounds/2/review.html")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert "pick directions and images" in response.read().decode()
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    image_url = urllib.parse.urljoin(url, "/" + _image(record, 1, 2))
    with urllib.request.urlopen(image_url, timeout=10) as response:
        assert response.read().startswith(b"\x89PNG")
        assert response.headers["Content-Type"] == "image/png"


def test_server_writes_a_valid_post_to_selections_json(served, record, workdir):
    url, target = served
    body = {"round": 2, "selected": [_choice(record, 1, 2), _choice(record, 2, 0)]}
    status, reply = _post(_endpoint(url), json.dumps(body).encode())
    assert (status, reply) == (200, {"saved": str(target.resolve()), "selected": 2})
    assert read_selections(target, record) == body["selected"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp")]
    with Workdir(workdir).lock("gal-jax run"):  # the save released the lock
        pass


def test_server_puts_a_new_token_into_the_page_it_sends_and_none_into_the_file(served, workdir,
                                                                             record):
    url, _ = served
    token = _token(url)
    assert len(token) >= 32 and _token(url) == token
    on_disk = (workdir / "rounds/2/review.html").read_text()
    assert token not in on_disk and "gal-review-token\" content" not in on_disk
    other, other_url = review_server.serve_review(workdir, 2)
    thread = threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        assert _token(other_url) != token
        # A page sent by an earlier server (or a guessed token) does not save.
        status, reply = _post(_endpoint(other_url), _valid_body(record),
                              {review_server.TOKEN_HEADER: token})
        assert status == 403 and review_server.TOKEN_HEADER in reply["error"]
    finally:
        other.shutdown()
        other.server_close()
        thread.join()


@pytest.mark.parametrize("body, headers, code, message", [
    (b"{broken", {}, 400, "not JSON (Expecting property name"),
    (b'{"round": 2, "selected": "\xff"}', {}, 400, "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, {}, 400, "nested too deeply"),
    (b'{"round": 2, "selected": [{"prompt_id": 9, "prompt": "x", "image": "y"}]}', {}, 400,
     "POST /selections: selected[0]: unknown prompt_id 9"),
    (None, {"Origin": "http://evil.example"}, 403, "cross-origin POST from 'http://evil.example'"),
    (None, {"Origin": None}, 403, "cross-origin POST from None"),
    (None, {"Origin": "null"}, 403, "cross-origin"),
    (None, {"Origin": "http://127.0.0.1:1"}, 403, "cross-origin"),
    (None, {review_server.TOKEN_HEADER: None}, 403, "missing or wrong X-GAL-Review-Token"),
    (None, {review_server.TOKEN_HEADER: "guess"}, 403, "missing or wrong X-GAL-Review-Token"),
], ids=["bad JSON", "not UTF-8", "nested", "unknown direction", "other origin", "no origin",
        "null origin", "other port", "no token", "wrong token"])
def test_server_refuses_bad_posts_and_writes_nothing(served, record, body, headers, code,
                                                     message):
    url, target = served
    status, reply = _post(_endpoint(url), body or _valid_body(record), headers)
    assert status == code and message in reply["error"]
    assert not target.exists()


def test_server_accepts_the_page_served_as_localhost(served, record):
    url, target = served
    local_url = url.replace("127.0.0.1", "localhost")
    assert _post(_endpoint(local_url), _valid_body(record))[0] == 200
    assert target.is_file()


@pytest.mark.parametrize("host", [
    "evil.example:{port}", "127.0.0.1", "localhost", "127.0.0.1:1", "localhost.evil:{port}",
    "127.0.0.1:{port}.evil", "[::1]:{port}", "LOCALHOST:{port}", None,
])
def test_server_refuses_requests_addressed_to_another_host(served, record, host):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: its requests carry that Host."""
    url, target = served
    port = urllib.parse.urlsplit(url).port
    host_line = "" if host is None else f"\nHost: {host.format(port=port)}"
    status, reply = _raw(url, f"GET /rounds/2/review.html HTTP/1.1{host_line}")
    assert status == 400 and "this server answers only" in reply["error"]
    body = _valid_body(record)
    status, reply = _raw(url, f"POST /selections HTTP/1.1{host_line}\nOrigin: http://"
                              f"{host and host.format(port=port)}\n{review_server.TOKEN_HEADER}: "
                              f"{_token(url)}\nContent-Length: {len(body)}", body)
    assert status == 400 and "this server answers only" in reply["error"]
    assert not target.exists()


def test_server_refuses_two_host_headers(served):
    url, _ = served
    netloc = urllib.parse.urlsplit(url).netloc
    status, reply = _raw(url, f"GET /rounds/2/review.html HTTP/1.1\nHost: {netloc}\n"
                              f"Host: evil.example")
    assert status == 400 and "this server answers only" in reply["error"]


@pytest.mark.parametrize("path", [
    "/", "/config.json", "/.lock", "/rounds/", "/rounds/2/", "/rounds/2/images/",
    "/rounds/2/review.json", "/rounds/2/record.json", "/rounds/2/selections.json",
    "/rounds/1/review.html", "/rounds/1/images/p000_s00.png", "/rounds/2/checkpoints/state",
    "/rounds/2/images/../../../config.json", "/rounds/2/images/%2e%2e/%2e%2e/%2e%2e/config.json",
    "/rounds/2/images/..%2f..%2f..%2fconfig.json", "/rounds/2/./review.json", "/selections",
    "/rounds/2/review.html/", "/rounds/2/images/p000_s00.png%00", "/../run/config.json",
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_server_sends_nothing_but_the_page_and_its_images(served, workdir, path, method):
    url, _ = served
    for name in ("config.json", "rounds/2/record.json", "rounds/1/review.html",
                 "rounds/1/images/p000_s00.png", "rounds/2/checkpoints/state"):
        _write(workdir / name, '{"secret": 1}')
    netloc = urllib.parse.urlsplit(url).netloc
    status, reply = _raw(url, f"{method} {path} HTTP/1.1\nHost: {netloc}")
    assert status == 404
    assert reply is None if method == "HEAD" else "not found" in reply["error"]


def test_server_answers_head_like_get_without_the_body(served, record, workdir):
    url, _ = served
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=10)
    try:
        connection.request("HEAD", "/" + _image(record, 0, 0))
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"")
        size = (workdir / _image(record, 0, 0)).stat().st_size
        assert int(response.headers["Content-Length"]) == size
    finally:
        connection.close()


def test_server_refuses_an_image_linked_to_a_file_outside_the_workdir(workdir, record,
                                                                      tmp_path):
    outside = _write(tmp_path / "private.txt", "secret")
    linked = workdir / _image(record, 0, 0)
    linked.unlink()
    linked.symlink_to(outside)
    (workdir / "rounds/2/images").rename(workdir / "rounds/2/real_images")
    (workdir / "rounds/2/images").symlink_to(workdir / "rounds/2/real_images")  # inside: fine
    write_page(workdir, record, k=2)
    server, url = review_server.serve_review(workdir, 2)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(urllib.parse.urljoin(url, "/" + _image(record, 0, 0)),
                                   timeout=10)
        with urllib.request.urlopen(urllib.parse.urljoin(url, "/" + _image(record, 0, 1)),
                                    timeout=10) as response:
            assert response.read().startswith(b"\x89PNG")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"])
def test_server_refuses_other_methods(served, method):
    url, target = served
    netloc = urllib.parse.urlsplit(url).netloc
    status, reply = _raw(url, f"{method} /selections HTTP/1.1\nHost: {netloc}\nOrigin: "
                              f"http://{netloc}")
    assert status in (405, 501) and method in reply["error"]
    assert not target.exists()


def test_server_answers_a_malformed_request_with_a_json_error(served):
    url, _ = served
    status, reply = _raw(url, "NOT A REQUEST LINE AT ALL")
    assert status == 400 and "Bad request" in reply["error"]


def _post_head(url: str, length_lines: str) -> str:
    netloc = urllib.parse.urlsplit(url).netloc
    return (f"POST /selections HTTP/1.1\nHost: {netloc}\nOrigin: http://{netloc}\n"
            f"Content-Type: application/json\n{review_server.TOKEN_HEADER}: {_token(url)}"
            + (f"\n{length_lines}" if length_lines else ""))


@pytest.mark.parametrize("length_lines, code, message", [
    ("", 411, "needs a Content-Length"),
    ("Transfer-Encoding: chunked", 411, "not a Transfer-Encoding"),
    ("Content-Length: -5", 400, "Content-Length must be one number"),
    ("Content-Length: 1e3", 400, "Content-Length must be one number"),
    ("Content-Length: +50", 400, "Content-Length must be one number"),
    ("Content-Length: 0x20", 400, "Content-Length must be one number"),
    ("Content-Length: 5 0", 400, "Content-Length must be one number"),
    ("Content-Length: \xb2", 400, "Content-Length must be one number"),  # "²".isdigit()
    ("Content-Length: 50\nContent-Length: 50", 400, "Content-Length must be one number"),
    ("Content-Length: 1048577", 413, "too large"),
    ("Content-Length: 99999999999999999999999999", 413, "too large"),
])
def test_server_parses_content_length_strictly(served, length_lines, code, message):
    url, target = served
    status, reply = _raw(url, _post_head(url, length_lines), wait=False)
    assert status == code and message in reply["error"]
    assert not target.exists()


def test_server_refuses_a_body_shorter_than_announced_when_the_client_stops(served, record):
    url, target = served
    body = _valid_body(record)
    status, reply = _raw(url, _post_head(url, f"Content-Length: {len(body) + 10}"), body,
                         wait=False)
    assert status == 400 and f"the body has {len(body)} bytes" in reply["error"]
    assert not target.exists()


def test_server_times_out_a_stalled_body_and_serves_others_meanwhile(served, record):
    url, target = served
    body = _valid_body(record)
    head, results = _post_head(url, f"Content-Length: {len(body) + 10}"), []
    start = time.monotonic()
    stalled = threading.Thread(target=lambda: results.append(_raw(url, head, body)))
    stalled.start()
    with urllib.request.urlopen(url, timeout=10) as response:  # not blocked by the stalled POST
        assert response.status == 200
    stalled.join(timeout=15)
    assert not stalled.is_alive() and time.monotonic() - start < 10
    (status, reply), = results
    assert status == 400 and "stalled" in reply["error"]
    assert not target.exists()


def test_server_does_not_save_while_a_run_holds_the_workdir(served, record, workdir):
    url, target = served
    with Workdir(workdir).lock("gal-jax run --workdir=x"):
        status, reply = _post(_endpoint(url), _valid_body(record))
    assert status == 409 and "in use by" in reply["error"] and "gal-jax run" in reply["error"]
    assert not target.exists()
    assert _post(_endpoint(url), _valid_body(record))[0] == 200


def test_server_answers_404_to_a_post_elsewhere(served):
    url, target = served
    assert _post(urllib.parse.urljoin(url, "/record.json"), b"{}")[0] == 404
    assert not target.exists()


_SERVE_WITHOUT_JAX = """
import sys, threading
from gal_jax import review_server
imported_by_review = "jax" in sys.modules
server, url = review_server.serve_review(sys.argv[1], 2)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(url, flush=True)
sys.stdin.readline()
print(imported_by_review, "jax" in sys.modules, flush=True)
"""


def test_review_command_saves_without_importing_jax(workdir, record):
    write_page(workdir, record, k=2)
    process = subprocess.Popen([sys.executable, "-c", _SERVE_WITHOUT_JAX, str(workdir)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).parents[1])
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        assert _post(_endpoint(url), _valid_body(record))[0] == 200
        output, _ = process.communicate("\n", timeout=30)
    finally:
        process.kill()
    assert output.split() == ["False", "False"]  # jax neither imported by review nor by saving
    assert read_selections(workdir / "rounds/2/selections.json", record)


def test_serve_review_writes_the_page_from_the_record_when_none_exists(workdir, record):
    full_record = {**record, "feedback": "human", "balance": True, "lambda": 0.005,
                   "concept_phrase": "a <tiny-teapot> teapot", "plain_prompts": ["a teapot"],
                   "references": [], "openness": 0.0, "stopped": False}
    _write(workdir / "rounds/2/record.json", full_record)
    server, url = review_server.serve_review(workdir, 2)
    server.server_close()
    assert (workdir / "rounds/2/review.html").is_file()
    assert json.loads((workdir / "rounds/2/review.json").read_text())["k"] == record["k"]


def test_serve_review_of_an_unknown_round_names_the_missing_files(workdir):
    with pytest.raises(FileNotFoundError, match="round 5: neither .*review.json nor .*record.json"):
        review_server.serve_review(workdir, 5)


# ----------------------------------------------------------------------------------------------
# In a browser.


@pytest.fixture
def browser(tmp_path):
    driver = chromium_driver.start(tmp_path / "downloads")
    yield driver
    driver.quit()


def _section(browser, pid: int):
    return browser.find_element("css selector", f'section.direction[data-prompt-id="{pid}"]')


def _wait(browser, condition, timeout: float = 10.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda _: condition())


def _ticked(browser) -> dict[int, int | None]:
    """Returns {prompt_id: index of the selected image or None} of the ticked directions."""
    ticked = {}
    for section in browser.find_elements("css selector", "section.direction"):
        if section.find_element("css selector", "input.tick").is_selected():
            picks = section.find_elements("css selector", ".pick")
            chosen = [i for i, pick in enumerate(picks) if "selected" in pick.get_attribute("class")]
            ticked[int(section.get_attribute("data-prompt-id"))] = chosen[0] if chosen else None
    return ticked


def _pick_two_directions(browser) -> None:
    """Starts from the suggestion (directions 0 and 4, first images), unticks both, ticks 7 and
    clicks its second image, then clicks direction 0's third image (which ticks it again)."""
    save, warn = browser.find_element("id", "save"), browser.find_element("id", "warn")
    assert _ticked(browser) == {0: 0, 4: 0}  # equal H: the first k in pool order, best anchor
    assert browser.find_element("id", "count").text == "2" and save.is_enabled()
    for pid in (0, 4):
        _section(browser, pid).find_element("css selector", "input.tick").click()
    assert "nothing ticked" in warn.text and save.is_enabled()  # saving nothing stops GAL
    _section(browser, 7).find_element("css selector", "input.tick").click()
    assert "need an image" in warn.text and not save.is_enabled()
    _section(browser, 7).find_elements("css selector", ".pick")[1].click()
    _section(browser, 0).find_elements("css selector", ".pick")[2].click()
    assert _ticked(browser) == {0: 2, 7: 1}
    assert browser.find_element("id", "count").text == "2"
    assert warn.text == "" and save.is_enabled()


def test_review_page_in_headless_chromium_saves_the_choice_through_the_server(served, record,
                                                                             browser):
    url, target = served
    browser.get(url)
    _pick_two_directions(browser)
    browser.find_element("id", "save").click()
    _wait(browser, lambda: "Saved 2 selection(s)" in browser.find_element("id", "status").text)
    expected = [_choice(record, 0, 2), _choice(record, 2, 1)]
    assert json.loads(target.read_text()) == {"round": 2, "selected": expected}
    assert read_selections(target, record) == expected


def test_review_page_opened_as_a_file_downloads_selections_json(workdir, record, browser, tmp_path):
    page = write_page(workdir, record, k=2)
    browser.get(page.as_uri())
    _pick_two_directions(browser)
    browser.find_element("id", "save").click()
    downloaded = tmp_path / "downloads" / "selections.json"
    _wait(browser, downloaded.is_file)
    assert "move it into" in browser.find_element("id", "status").text
    expected = [_choice(record, 0, 2), _choice(record, 2, 1)]
    assert read_selections(downloaded, record) == expected


def test_review_page_lays_a_directions_images_in_one_row(workdir, record, browser):
    """Twelve images do not fit a 900 px window: they stay in one row that scrolls sideways."""
    first = record["directions"][0]
    images = []
    for n in range(12):
        path = f"rounds/2/images/p000_s{n:02d}.png"
        Image.new("RGB", (16, 16), (20 * n, 90, 90)).save(workdir / path)
        images.append({**first["images"][0], "path": path, "seed": n})
    wide = {**record, "directions": [{**first, "images": images}, *record["directions"][1:]]}
    browser.set_window_size(900, 800)
    browser.get(write_page(workdir, wide, k=2).as_uri())
    grid = _section(browser, 0).find_element("css selector", ".grid")
    tops = browser.execute_script(
        "return Array.from(arguments[0].querySelectorAll('.pick'), p => p.offsetTop);", grid)
    assert len(tops) == 12 and len(set(tops)) == 1, tops
    assert browser.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth;",
                                  grid)
