"""Headless Chromium for the page tests: the system's browser and driver (Debian's ``chromium``
and ``chromium-driver``, installed by ``.ci/run``), driven through Selenium; nothing is
downloaded. A test that fails leaves a screenshot and the page's HTML in its folder."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver", "chromium-driver")


def system_browser() -> tuple[str, str]:
    """Paths of the system's Chromium and its driver; raises naming what is missing."""
    browser = next((p for n in CHROMIUM_NAMES if (p := shutil.which(n))), None)
    driver = next((p for n in DRIVER_NAMES if (p := shutil.which(n))), None)
    if browser is None or driver is None:
        raise RuntimeError(
            "the browser tests need the system's Chromium and its driver "
            "(apt-get install chromium chromium-driver; .ci/run installs them)"
        )
    return browser, driver


@contextlib.contextmanager
def chromium(out: Path, width: int = 1400, height: int = 1600):
    """A headless Chromium WebDriver; on an exception, ``out/failure.png`` and
    ``out/failure.html`` keep what the page showed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = system_browser()
    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--metrics-recording-only", "--no-default-browser-check",
                f"--user-data-dir={out / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    except BaseException:
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(out / "failure.png"))
            (out / "failure.html").write_text(driver.page_source)
        raise
    finally:
        driver.quit()


def wait_until(driver, condition: Callable, seconds: float, what: str):
    """Poll ``condition(driver)`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + seconds
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition(driver)
            if value:
                return value
        except Exception as exc:  # the page is still rendering: elements come and go
            last_error = exc
        time.sleep(0.3)
    raise AssertionError(f"waited {seconds:g} s for {what} ({last_error or 'not there'})")


def act_when(driver, find: Callable, action: Callable, seconds: float, what: str) -> None:
    """Wait for the first element ``find(driver)`` returns and do ``action`` on it, again if
    the page re-rendered it meanwhile (a stale element, or one covered for a moment)."""

    def done(d) -> bool:
        found = find(d)
        if found:
            action(found[0])
        return bool(found)

    wait_until(driver, done, seconds, what)


def body_text(driver) -> str:
    return driver.find_element("tag name", "body").text
