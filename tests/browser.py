"""A real headless Chromium for the dashboard's browser tests: Debian's `chromium` and `chromium-driver`,
driven by Selenium; nothing is downloaded at run time.

Where no browser can be had, `chromium` skips the test with the commands that install one.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ENABLE = (
    "the browser tests need Chromium, its driver and Selenium: "
    "`apt-get install --no-install-recommends chromium chromium-driver` and `pip install -e '.[dev]'` "
    "(.ci/run installs them)"
)
# Headless in a sandbox-less container; no background connections (a closed network refuses them and
# Chromium then stalls), no first-run or sync machinery.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]
WAIT_S = 30


def chromium(profile: Path):
    """A Selenium driver of a fresh headless Chromium (its profile in `profile`), or a skip saying how to get one."""
    webdriver = pytest.importorskip("selenium.webdriver", reason=ENABLE)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(ENABLE)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for `console_errors`
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def console_errors(driver) -> list[str]:
    """The browser console's errors since last asked (failed requests, script errors)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_until(condition: Callable[[], object], what: str, timeout: float = WAIT_S, on_timeout=lambda: ""):
    """The first truthy value of `condition()`, polled; an AssertionError saying `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - an element not there yet, or replaced while read
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{on_timeout()}")
        time.sleep(0.2)


class Screenshots:
    """Saves a numbered PNG of the page for each step into `folder`."""

    def __init__(self, driver, folder: Path):
        self.driver, self.folder, self.count = driver, folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def take(self, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path
