"""Headless Chromium for the page tests: start it, read its console errors, find broken images.

Used by review_test.py and browser_test.py. A test that needs it skips, saying why, when selenium,
Chromium or chromedriver is missing (Debian: apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
# No GPU, no sandbox (containers), and none of the browser's own traffic (updates, sync, field
# trials), so a test sees only the requests its page makes.
ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--no-first-run", "--window-size=1400,900")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def start(download_dir: Path | None = None):
    """Returns a headless Chromium webdriver that keeps console messages; skips when absent."""
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install selenium)")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.exists():
            pytest.skip(f"{binary} is missing (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    # Chromium's profile and its singleton socket folders (/tmp/org.chromium.Chromium.*) go into a
    # folder of our own, deleted on quit: left in /tmp, every test run added a few.
    scratch = Path(tempfile.mkdtemp(prefix="gal-jax-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ARGUMENTS + (f"--user-data-dir={scratch / 'profile'}",):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if download_dir is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                                  "download.prompt_for_download": False})
    service = Service(str(CHROMEDRIVER), env={**os.environ, "TMPDIR": str(scratch)})
    try:
        driver = webdriver.Chrome(service=service, options=options)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    quit_browser = driver.quit

    def quit_and_clean():
        try:
            quit_browser()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    driver.quit = quit_and_clean
    return driver


def console_errors(driver) -> list[str]:
    """Returns the SEVERE console messages logged since the last call (reading clears them)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def broken_images(driver, timeout: float = 10.0) -> list[str]:
    """Returns the src of every img that failed to load, after bringing each (lazy ones too) into
    view and waiting until the browser is done with it."""
    from selenium.webdriver.support.ui import WebDriverWait

    images = driver.find_elements("css selector", "img")
    for image in images:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", image)
        WebDriverWait(driver, timeout).until(
            lambda _: driver.execute_script("return arguments[0].complete;", image))
    driver.execute_script("window.scrollTo(0, 0);")
    return [image.get_attribute("src") for image in images
            if not driver.execute_script("return arguments[0].naturalWidth;", image)]


def full_page_screenshot(driver, path: Path, width: int = 1400, max_height: int = 12000) -> Path:
    """Returns path, after saving a PNG of the whole page (up to max_height pixels) there."""
    driver.set_window_size(width, 900)
    height, chrome = driver.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight];")
    driver.set_window_size(width, min(max(height, 600), max_height) + chrome)
    driver.save_screenshot(str(path))
    return path
