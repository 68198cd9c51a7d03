"""The status page and the API docs in a real browser: Debian's chromium, headless, driven by
Selenium through Debian's chromedriver (nothing is downloaded at test time).

Chromium resolves every host name except 127.0.0.1 to "not found", so each page here is loaded
with the network blocked: what renders came from the service itself. Each state is checked on
the page and on its screenshot (the badge's colour where the page says ready or not).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import AUTH, USER
from tests.fakes.local_host import FakePowerShell
from vezaprovisioner.api.app import create_app
from vezaprovisioner.config import Settings

pytestmark = pytest.mark.slow

BASE = "/VezaProvisioner"
GREEN = (0x1A, 0x7F, 0x37)
RED = (0xCF, 0x22, 0x2E)


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing: .ci/run installs chromium chromium-driver")
        pytest.skip("apt-get install chromium chromium-driver")
    return browser, driver


@pytest.fixture(scope="session")
def browser() -> Iterator[webdriver.Chrome]:
    """One headless chromium for the whole session."""
    binary, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1600",
        "--force-device-scale-factor=1",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # the network is blocked
    ):
        options.add_argument(argument)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.execute_cdp_cmd("Network.enable", {})
    try:
        yield chrome
    finally:
        chrome.quit()


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # connections queue from now on, so no wait for the server is needed
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}{BASE}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def show(browser: webdriver.Chrome, url: str, *, authenticated: bool = True) -> None:
    headers = AUTH if authenticated else {}
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
    browser.get(url)


def screenshot(browser: webdriver.Chrome, path: Path) -> Image.Image:
    png = base64.b64decode(browser.get_screenshot_as_base64())
    path.write_bytes(png)
    return Image.open(BytesIO(png)).convert("RGB")


def colour_of(image: Image.Image, element: WebElement) -> tuple[int, int, int]:
    """The most frequent colour inside the element's box on the screenshot."""
    rect = element.rect
    box = (
        int(rect["x"]),
        int(rect["y"]),
        int(rect["x"] + rect["width"]),
        int(rect["y"] + rect["height"]),
    )
    colours = image.crop(box).getcolors(maxcolors=1 << 16)
    assert colours, f"nothing drawn at {box}"
    _count, colour = max(colours)
    assert isinstance(colour, tuple)
    return (int(colour[0]), int(colour[1]), int(colour[2]))


def near(colour: tuple[int, int, int], expected: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 12 for a, b in zip(colour, expected, strict=True))


def visible_text(browser: webdriver.Chrome, css: str) -> str:
    element = browser.find_element(By.CSS_SELECTOR, css)
    assert element.is_displayed(), css
    return element.text


def test_a_ready_service_with_requests(
    browser: webdriver.Chrome, client: TestClient, tmp_path: Path
) -> None:
    for identity in ("CONTOSO\\plain", "Alex Smith", "CONTOSO\\plain", "CONTOSO\\山田太郎"):
        client.post(f"{BASE}/api/v1/emails", json={"identity": identity})
    with serving(client.app) as base:  # type: ignore[arg-type]
        show(browser, f"{base}/status")
        image = screenshot(browser, tmp_path / "ready.png")
        assert browser.title == "VezaProvisioner status: ready"
        assert visible_text(browser, "#overall") == "Ready"
        assert near(
            colour_of(image, browser.find_element(By.CSS_SELECTOR, "#overall .badge")), GREEN
        )
        checks = browser.find_elements(By.CSS_SELECTOR, "#checks tr.check")
        assert [c.get_attribute("data-check") for c in checks] == [
            "configuration",
            "backend",
            "journal",
            "logs",
        ]
        assert all("ok" in (c.get_attribute("class") or "") for c in checks)
        rows = browser.find_elements(By.CSS_SELECTOR, "#requests tr.request")
        assert len(rows) == 4
        cells = [cell.text for cell in rows[0].find_elements(By.TAG_NAME, "td")]
        assert cells[1:5] == [USER, "CONTOSO\\山田太郎", "created", ""]
        assert "AMBIGUOUS_IDENTITY" in visible_text(browser, "#counts")
        failure = visible_text(browser, "#failures .failure")
        assert "AMBIGUOUS_IDENTITY" in failure
        assert "send a unique form" in failure  # the fix, as the problem's detail said it
        link = rows[0].find_element(By.TAG_NAME, "a").get_attribute("href")
        assert link is not None
        assert "/api/v1/requests?request_id=" in link
        assert "http-equiv" in (browser.page_source or "")


def test_hosts_that_fail_to_start(
    browser: webdriver.Chrome,
    make_settings: Callable[..., Settings],
    fake_powershell: FakePowerShell,
    tmp_path: Path,
) -> None:
    fake_powershell.set(fault="rbac")
    limits = {"restart_backoff_seconds": 30, "restart_backoff_max_seconds": 30}
    app = create_app(make_settings(**fake_powershell.settings(**limits)))
    pool = app.state.services.exchange.pool
    try:
        pool.wait_for(lambda s: s.broken == 1, 20)
        with serving(app) as base:
            show(browser, f"{base}/status")
            image = screenshot(browser, tmp_path / "broken.png")
            assert visible_text(browser, "#overall") == "Not ready"
            badge = browser.find_element(By.CSS_SELECTOR, "#overall .badge")
            assert near(colour_of(image, badge), RED)
            assert visible_text(browser, "#hosts-broken") == "1"
            assert visible_text(browser, "#hosts-warm") == "0"
            error = visible_text(browser, "#startup-error")
            assert "Mail Recipients" in error
            assert "Recipient Management role group" in error  # what to do
            backend = browser.find_element(By.CSS_SELECTOR, 'tr.check[data-check="backend"]')
            assert "bad" in (backend.get_attribute("class") or "")
    finally:
        app.state.services.close()


def test_an_empty_journal(
    browser: webdriver.Chrome, make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    app = make_client().app
    with serving(app) as base:  # type: ignore[arg-type]
        show(browser, f"{base}/status")
        screenshot(browser, tmp_path / "empty.png")
        assert visible_text(browser, "#overall") == "Ready"
        assert visible_text(browser, "#empty") == "No requests in the journal yet."
        assert "No requests in the last 24 hours." in visible_text(browser, "#counts")
        assert "No failures" in visible_text(browser, "#failures")
        assert browser.find_elements(By.CSS_SELECTOR, "#requests tr.request") == []


@pytest.mark.parametrize(
    ("page", "rendered"),
    [
        ("docs", ".swagger-ui .info .title"),
        ("redoc", "redoc-wrap h1, .api-info h1"),
    ],
)
def test_the_api_docs_render_with_the_network_blocked(
    browser: webdriver.Chrome,
    make_client: Callable[..., TestClient],
    tmp_path: Path,
    page: str,
    rendered: str,
) -> None:
    with serving(make_client().app) as base:  # type: ignore[arg-type]
        show(browser, f"{base}/{page}", authenticated=False)

        def title(driver: Any) -> str:
            found = driver.find_elements(By.CSS_SELECTOR, rendered)
            return str(found[0].text) if found else ""

        WebDriverWait(browser, 30).until(lambda d: "VezaProvisioner" in title(d))
        screenshot(browser, tmp_path / f"{page}.png")
        if page == "docs":  # the operations rendered from the document
            paths = browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
            assert f"{BASE}/api/v1/emails" in {path.text.replace("\u200b", "") for path in paths}
