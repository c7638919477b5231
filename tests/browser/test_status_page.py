"""The status page in real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium)
against a running stack with tasks in flight: the token prompt, pools, GPUs, the replica set's queue,
running tasks whose token counts move without a reload, the recent error, and a screenshot (in the
test's tmp dir; ``LLORCH_UPDATE_SCREENSHOT=1`` also writes docs/status-page.png).

Without Chromium the test skips, or fails when ``LLORCH_REQUIRE_BROWSER=1`` (as ``make test`` sets it):
``scripts/ensure-chromium.sh`` installs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from tests.support.procs import wait_until
from tests.support.stack import ROOT, Client, Stack, mock_pool

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = ROOT / "docs" / "status-page.png"
SCREENSHOT_ENV = "LLORCH_UPDATE_SCREENSHOT"
"""Set to 1 to copy the screenshot over the README's docs/status-page.png (every run keeps its own in
the test's tmp dir, so `make test` leaves the tree clean)."""
GIB = 1 << 30
SECRET = "a prompt the status page must never show"
WAIT_S = 30


@contextmanager
def headless_chromium() -> Iterator[WebDriver]:
    """A Chromium driven by its WebDriver; skips the test when they are missing, or fails it when
    ``LLORCH_REQUIRE_BROWSER=1`` (a fixture would turn that failure into a setup error)."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        message = (
            f"headless Chromium is not installed: {', '.join(missing)} missing; "
            "run scripts/ensure-chromium.sh"
        )
        if os.environ.get("LLORCH_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


async def _status(http: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    async with http.get(f"{stack.url}/v1/status", headers=stack.headers) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def _busy_stack(stack_factory: Any, http: aiohttp.ClientSession) -> tuple[Stack, dict[str, str]]:
    """Two one-slot pools on two fake GPUs: a task that failed, two running, an interactive and a batch
    task waiting in the replica set's queue."""
    knobs = ["--token-delay-ms", "100", "--gpu-util"]
    stack = stack_factory(
        pools=[
            mock_pool("mock-a", devices=[0], args=[*knobs, "41", "--vram-used-bytes", str(3 * GIB)]),
            mock_pool("mock-b", devices=[1], args=[*knobs, "23", "--vram-used-bytes", str(2 * GIB)]),
        ],
        extra={
            "telemetry": {
                "gpu_provider": "fake",
                "fake_gpus": [
                    {"index": 0, "name": "Fake 24GB", "total_mib": 24576, "free_mib": 24576},
                    {"index": 1, "name": "Fake 12GB", "total_mib": 12288, "free_mib": 12288},
                ],
            }
        },
    )
    await stack.start()
    await stack.wait_pools_ready("mock-a", "mock-b")
    client = Client(stack, http)
    failed = await client.admit(prompt=SECRET, max_tokens=1000, deadline_ms=1500)
    assert (await client.events(failed))[-1].data["code"] == "DEADLINE_UNMET"
    tasks = {"failed": failed}
    for name in ("running-1", "running-2"):
        tasks[name] = await client.admit(prompt=SECRET, max_tokens=1000)
    tasks["interactive"] = await client.admit(prompt=SECRET, max_tokens=5)
    tasks["batch"] = await client.admit(prompt=SECRET, max_tokens=5, priority="batch")

    async def settled() -> bool:
        status = await _status(http, stack)
        return (
            {t["task_id"] for t in status["running"] if t["tokens_out"] > 0}
            == {tasks["running-1"], tasks["running-2"]}
            and [s["queue_depth"] for s in status["replica_sets"]] == [{"interactive": 1, "batch": 1}]
            and len([g for g in status["gpus"] if g["vram_used_bytes"] >= 2 * GIB]) == 2
            and [g["utilization"] for g in status["gpus"]] == [41.0, 23.0]  # the engines' own reports
            and [e["task_id"] for e in status["recent_errors"]] == [failed]
        )

    await wait_until(settled, WAIT_S, "two running tasks, a queue of two, both GPUs and the error")
    return stack, tasks


class StatusPage:
    """The page in the browser (Selenium blocks: every call runs in a worker thread)."""

    def __init__(self, driver: WebDriver, stack: Stack) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.stack = stack
        self.wait = WebDriverWait(driver, WAIT_S)

    # The page re-renders every second: DOM reads run as one script in the page, so none of them can
    # meet an element that a render has just replaced.
    def attr(self, selector: str, name: str) -> str | None:
        """``name`` of the first element that ``selector`` finds (None: no such element or attribute)."""
        script = (
            "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;"
        )
        value = self.driver.execute_script(script, selector, name)
        return None if value is None else str(value)

    def texts(self, selector: str, key: str) -> dict[str, str]:
        """The text of every element that ``selector`` finds, by its ``key`` attribute."""
        script = (
            "return Object.fromEntries([...document.querySelectorAll(arguments[0])]"
            ".map((e) => [e.getAttribute(arguments[1]), e.innerText]));"
        )
        return dict(self.driver.execute_script(script, selector, key))

    def until(self, what: Callable[[], bool]) -> None:
        self.wait.until(lambda _: what())

    def stored_token(self) -> object:
        return self.driver.execute_script("return sessionStorage.getItem('llorch.apiToken')")

    def sign_in(self, token: str) -> None:
        from selenium.webdriver.common.by import By

        self.until(lambda: self.attr("#login", "hidden") is None)
        self.driver.find_element(By.ID, "token").send_keys(token)
        self.driver.find_element(By.ID, "sign-in").click()

    def open_and_sign_in(self) -> None:
        from selenium.webdriver.common.by import By

        self.driver.get(f"{self.stack.url}/")
        assert self.attr("body", "data-conn") == "signed-out"  # no token yet: the page asks for one
        self.sign_in("not-the-token")
        self.wait.until(lambda d: "FORBIDDEN" in d.find_element(By.ID, "login-error").text)
        assert self.stored_token() is None  # a refused token is not kept
        self.sign_in(self.stack.token)
        self.until(lambda: self.attr("body", "data-conn") == "live")

    def check_live_data(self, tasks: dict[str, str]) -> None:
        """Pools, replicas, GPUs, the queue, running tasks and the error, all from the stream."""
        for pool in ("mock-a", "mock-b"):
            self.until(lambda p=pool: self.attr(f'[data-pool-id="{p}"]', "data-state") == "Ready")
            assert self.attr(f'[data-replica-id="{pool}-r0"]', "data-state") == "Ready"
        self.until(lambda: self.attr("[data-rs-id]", "data-queue-interactive") == "1")
        assert self.attr("[data-rs-id]", "data-queue-batch") == "1"
        gpus = self.texts("[data-gpu-device]", "data-gpu-device")
        assert set(gpus) == {"0", "1"} and "Fake 24GB" in gpus["0"] and "Fake 12GB" in gpus["1"]
        assert "24.0 GiB" in gpus["0"] and "utilization 41%" in gpus["0"]
        assert self.attr(f'[data-error-task-id="{tasks["failed"]}"]', "data-code") == "DEADLINE_UNMET"
        assert self.attr(f'[data-task-id="{tasks["running-2"]}"]', "data-tokens-out") is not None
        running = f'[data-task-id="{tasks["running-1"]}"]'
        self.until(lambda: self.attr(running, "data-tokens-out") not in (None, "0"))
        seen = int(self.attr(running, "data-tokens-out") or 0)  # live: the count moves with no reload
        self.until(lambda: int(self.attr(running, "data-tokens-out") or 0) > seen)
        source = self.driver.page_source
        assert SECRET not in source and self.stack.token not in source  # never a prompt nor the token

    def screenshot(self, path: Path) -> None:
        """The whole page in one picture: a viewport as tall as the document (a headless window
        cannot grow past its screen)."""
        height = int(self.driver.execute_script("return document.documentElement.scrollHeight"))
        metrics = {"width": 1400, "height": max(900, height), "deviceScaleFactor": 1, "mobile": False}
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        path.parent.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(path)), path
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    def check_token_lifetime(self) -> None:
        """The token lives in this tab's sessionStorage: a reload goes straight back to live data,
        until it is forgotten."""
        from selenium.webdriver.common.by import By

        assert self.stored_token() == self.stack.token
        self.driver.refresh()
        self.until(lambda: self.attr("body", "data-conn") == "live")
        assert self.attr("#login", "hidden") is not None
        self.driver.find_element(By.ID, "forget").click()
        self.until(lambda: self.attr("body", "data-conn") == "signed-out")
        assert self.attr("#login", "hidden") is None and self.stored_token() is None

    def check_polling(self) -> None:
        """Where the stream cannot be had, the page polls /v1/status instead."""
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/status/stream*"]})
        self.sign_in(self.stack.token)
        self.until(lambda: self.attr("body", "data-conn") == "polling")
        polled = self.attr("body", "data-generated-at")
        self.until(lambda: self.attr("body", "data-generated-at") not in (None, polled))
        assert self.attr('[data-pool-id="mock-a"]', "data-state") == "Ready"


async def test_status_page_in_headless_chromium(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    with headless_chromium() as browser:
        await _check_page(stack_factory, http, browser, tmp_path)


async def _check_page(
    stack_factory: Any, http: aiohttp.ClientSession, browser: WebDriver, tmp_path: Path
) -> None:
    stack, tasks = await _busy_stack(stack_factory, http)
    page = StatusPage(browser, stack)
    await asyncio.to_thread(page.open_and_sign_in)
    await asyncio.to_thread(page.check_live_data, tasks)
    shot = tmp_path / "status-page.png"
    await asyncio.to_thread(page.screenshot, shot)
    assert shot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get(SCREENSHOT_ENV) == "1":  # refresh the README's picture on request only
        shutil.copyfile(shot, SCREENSHOT)
    await asyncio.to_thread(page.check_token_lifetime)
    await asyncio.to_thread(page.check_polling)
    client = Client(stack, http)
    for name in ("running-1", "running-2", "interactive", "batch"):  # a quick stop
        assert await client.cancel(tasks[name]) == 204
