"""The seller's journey in a real browser: Debian's headless Chromium, driven by Selenium, through
the broker and the simulator served over HTTP on 127.0.0.1; and the API docs under their CSP.

Both servers run in the test's event loop and Selenium blocks, so every browser step runs in a
worker thread (`asyncio.to_thread`) while the loop keeps serving the pages the browser asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from tests.support import Broker, Simulator

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TIMEOUT = 15  # seconds for any one page: a hung flow fails instead of stalling the suite

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason=f"REAL-BROWSER TEST NOT RUN: {CHROMIUM} or {CHROMEDRIVER} is missing; install "
        "Debian's chromium and chromium-driver (.ci/run does)",
    ),
]

# Headless, with Chromium's own background traffic (updates, sync, QUIC) switched off.
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # /dev/shm is small in containers
)

SELLER = "billing/seller-42"
USER_ID = 555001  # typed into the consent page instead of the simulator's default

Launch = Callable[[str], WebDriver]


@pytest.fixture
def launch() -> Iterator[Launch]:
    """Starts Chromiums, each with its own fresh profile (no shared cookies); quits them all."""
    quits = contextlib.ExitStack()  # every driver is quit, even if one quit fails

    def start(language: str) -> WebDriver:
        options = Options()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        # Accept-Language comes from this pref; headless Chromium ignores --lang for it.
        options.add_experimental_option("prefs", {"intl.accept_languages": language})
        # An explicit driver path and binary: Selenium Manager never runs, nothing is downloaded.
        driver = webdriver.Chrome(options, Service(executable_path=str(CHROMEDRIVER)))
        quits.callback(driver.quit)
        driver.set_page_load_timeout(TIMEOUT)
        return driver

    with quits:
        yield start


@dataclass
class Page:
    lang: str
    title: str
    text: str
    resources: list[str]  # every subresource the page loaded (Resource Timing)


def open_consent(driver: WebDriver, url: str) -> None:
    """Open a URL that should end on the simulator's consent page."""
    driver.get(url)
    WebDriverWait(driver, TIMEOUT).until(
        expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "button.allow"))
    )


def decide(
    driver: WebDriver, decision: str, broker_url: str, callback: str = "/oauth/callback"
) -> Page:
    """Click Allow or Deny as the seller; returns the broker page the redirects end on (on
    `callback`, the application's Redirect URL)."""
    field = driver.find_element(By.ID, "user_id")
    field.clear()
    field.send_keys(str(USER_ID))
    driver.find_element(By.CSS_SELECTOR, f'button[value="{decision}"]').click()
    WebDriverWait(driver, TIMEOUT).until(
        lambda d: (
            d.current_url.startswith(f"{broker_url}{callback}?")
            and d.execute_script("return document.readyState") == "complete"
        )
    )
    return Page(
        lang=driver.execute_script("return document.documentElement.lang"),
        title=driver.find_element(By.TAG_NAME, "h1").text,
        text=driver.find_element(By.TAG_NAME, "body").text,
        resources=driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        ),
    )


async def test_a_seller_allows_in_chromium_and_the_platform_gets_the_token(
    broker: Broker, simulator: Simulator, launch: Launch
) -> None:
    chromium = await asyncio.to_thread(launch, "en-US")
    await asyncio.to_thread(open_consent, chromium, await broker.start_link(SELLER))
    page = await asyncio.to_thread(decide, chromium, "allow", broker.url)

    assert page.lang == "en"
    assert page.title == "Your account is linked"
    assert "Security > Connected apps" in page.text  # where to remove access later
    assert page.resources == []  # no external (or any) assets
    # The binder really was a cookie the page's scripts cannot read.
    cookie = await asyncio.to_thread(chromium.get_cookie, "mpb_link")
    assert cookie is not None
    assert cookie["httpOnly"] is True
    script_cookies = await asyncio.to_thread(chromium.execute_script, "return document.cookie")
    assert "mpb_link" not in script_cookies

    reply = await broker.token(SELLER)
    assert reply.status_code == 200
    assert reply.json()["mp_user_id"] == USER_ID
    # What the broker serves is the access token the simulator issued for this seller's grant.
    token = reply.json()["access_token"]
    me = await simulator.http.get("/users/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200
    assert me.json()["id"] == USER_ID
    assert (await simulator.http.get("/_control/grants")).json()[str(USER_ID)]["grants"] == 1
    assert await simulator.token_requests() == 1


async def test_a_seller_denies_in_a_spanish_chromium_and_nothing_is_stored(
    broker: Broker, simulator: Simulator, launch: Launch
) -> None:
    chromium = await asyncio.to_thread(launch, "es-AR")
    await asyncio.to_thread(open_consent, chromium, await broker.start_link(SELLER))
    page = await asyncio.to_thread(decide, chromium, "deny", broker.url)

    assert page.lang == "es"
    assert page.title == "No se vinculó nada"
    assert "Rechazaste el acceso en Mercado Pago" in page.text
    assert page.resources == []

    reply = await broker.token(SELLER)
    assert reply.status_code == 404
    assert reply.json()["code"] == "seller_not_found"
    assert await simulator.token_requests() == 0


async def test_a_callback_in_another_browser_is_refused_and_the_first_still_links(
    broker: Broker, simulator: Simulator, launch: Launch
) -> None:
    first = await asyncio.to_thread(launch, "en-US")
    other = await asyncio.to_thread(launch, "en-US")
    await asyncio.to_thread(open_consent, first, await broker.start_link(SELLER))
    # The consent URL copied into another browser, without the first one's cookie: Mercado Pago
    # sends that browser to the callback, and the broker turns it away.
    await asyncio.to_thread(open_consent, other, first.current_url)
    refused = await asyncio.to_thread(decide, other, "allow", broker.url)

    assert refused.title == "Please finish in the browser where you started"
    assert "Reference: unbound_browser" in refused.text
    assert refused.resources == []
    assert (await broker.token(SELLER)).status_code == 404
    assert await simulator.token_requests() == 0  # the code never reached Mercado Pago

    # Refused before anything changed: the browser that opened the link can still finish.
    linked = await asyncio.to_thread(decide, first, "allow", broker.url)
    assert linked.title == "Your account is linked"
    assert (await broker.token(SELLER)).status_code == 200


# Every Content-Security-Policy refusal on a page, recorded from before its first script runs.
RECORD_VIOLATIONS = """
window.violations = [];
document.addEventListener("securitypolicyviolation",
    (e) => window.violations.push(`${e.effectiveDirective} ${e.blockedURI}`));
"""


@dataclass
class DocsSeen:
    title: str
    violations: list[str]
    resources: list[str]


def read_the_docs(driver: WebDriver, broker_url: str) -> DocsSeen:
    """Open /docs and run its first operation as a reader would (Try it out, Execute)."""
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_VIOLATIONS})
    driver.get(f"{broker_url}/docs")
    wait = WebDriverWait(driver, TIMEOUT)
    for button in (".opblock-summary", ".try-out__btn", ".execute"):
        wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, button))).click()
    located = expected_conditions.presence_of_element_located
    wait.until(located((By.CSS_SELECTOR, ".live-responses-table")))
    return DocsSeen(
        title=driver.find_element(By.CSS_SELECTOR, ".info .title").text,
        violations=driver.execute_script("return window.violations"),
        resources=driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        ),
    )


async def test_the_api_docs_render_in_chromium_with_nothing_refused_by_their_policy(
    broker: Broker, launch: Launch
) -> None:
    chromium = await asyncio.to_thread(launch, "en-US")
    seen = await asyncio.to_thread(read_the_docs, chromium, broker.url)

    assert broker.app.title in seen.title
    assert "OAS 3.1" in seen.title  # Swagger UI 4 could not render the document at all
    assert seen.violations == []  # the strict policy (no inline styles) costs the page nothing
    assert seen.resources  # the script, the stylesheet, the document, the operation's call
    assert all(url.startswith(f"{broker.url}/") for url in seen.resources), seen.resources
