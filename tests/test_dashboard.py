"""The operator dashboard in a real browser: Debian's chromium, driven by Playwright, against a real
server (in-process, dispatching) fed by real traffic, with a real local destination that fails in
programmed ways — so the pages show succeeded, retried, dead-lettered and duplicate executions.

SQLite only: the HTTP API underneath is tested on both backends elsewhere, and one backend keeps
the browser runs short. Screenshots of each main view land in tests/artifacts/ (gitignored), for a
person to look at. Without chromium or Playwright the browser tests skip and say why; with
CI=true (`.ci/run` installs both) a missing browser is a failure.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_TOKEN, create_trigger
from destinations import Destination, Reply, send, wait_until
from processes import start_server

from server.app import make_app
from server.config import Settings

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # the `browser` extra is not installed
    async_playwright = None

if TYPE_CHECKING:
    from playwright.async_api import Browser, Locator, Page

# One browser serves the whole module (a launch per test would double its time), so the tests
# and their fixtures run on the module's event loop; each test still gets its own server.
pytestmark = [
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
    pytest.mark.asyncio(loop_scope="module"),
]
fixture = pytest_asyncio.fixture(loop_scope="module")

CHROMIUM = Path(os.environ.get("HOOKLEDGER_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
FAST = {"max_attempts": 3, "base_s": 0.01, "cap_s": 0.05}
REPLAY_INTERVAL_S = 6  # long enough to see a 429 after a replay, short enough to wait out
PAGE_SIZE = 50  # executions.js asks for pages of 50
TRIGGERS = ("billing", "crm", "legacy", "shop")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true needs the browser tests to run (.ci/run installs them)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Path:
    if async_playwright is None:
        _unavailable("Playwright is not installed (pip install -e '.[browser]')")
    if not CHROMIUM.exists():
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@fixture
async def destination() -> AsyncIterator[Destination]:
    running = Destination()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", running.handle)
    running.server = TestServer(app, host="127.0.0.1")
    await running.server.start_server()
    try:
        yield running
    finally:
        running.release()
        await running.server.close()


@dataclass
class Dashboard:
    url: str
    api: aiohttp.ClientSession  # the admin API, with the token
    destination: Destination

    async def get(self, path: str, **query: Any) -> Any:
        async with self.api.get(path, params=query) as response:
            assert response.status == 200, await response.text()
            return await response.json()


@fixture
async def dashboard(settings: Settings, destination: Destination) -> AsyncIterator[Dashboard]:
    """A dispatching server on a free port, with its access log on (the token must not reach it)."""
    settings = replace(
        settings,
        dispatch=True,
        dispatch_poll_s=0.05,
        lease_s=1.0,
        replay_interval_s=REPLAY_INTERVAL_S,
    )
    runner = web.AppRunner(make_app(settings), shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        # A request that hangs fails in a minute and says which, instead of eating the test's
        # whole 300 s timeout (aiohttp's own default) with nothing to show.
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(base_url=url, headers=headers, timeout=timeout) as api:
            yield Dashboard(url, api, destination)
    finally:
        await runner.cleanup()


@dataclass
class Traffic:
    """Execution ids of the seeded deliveries, by what happened to them."""

    shop: list[str]  # succeeded at once; order-1 repeated with its body, order-2 with another
    retried: str  # billing: 503 then 200
    dead_permanent: str  # crm: 400, dead-lettered at once; a replay gets 200
    dead_exhausted: str  # legacy: 503 until the attempts run out


@fixture
async def traffic(dashboard: Dashboard) -> Traffic:
    api, destination = dashboard.api, dashboard.destination
    scripts = {
        "shop": (Reply(200),),
        "billing": (Reply(503), Reply(200)),
        "crm": (Reply(400), Reply(200)),
        "legacy": (Reply(503),),
    }
    for trigger_id, steps in scripts.items():
        url = destination.script(f"/{trigger_id}", *steps)
        retry = FAST | ({"max_attempts": 2} if trigger_id == "legacy" else {})
        await create_trigger(api, id=trigger_id, destination={"url": url}, retry=retry)
    shop = [
        await send(api, "shop", f'{{"order": {n}, "total": 12.5}}', Idempotency_Key=f"order-{n}")
        for n in (1, 2, 3)
    ]
    await _repeat(api, "shop", '{"order": 1, "total": 12.5}', "order-1")
    await _repeat(api, "shop", '{"order": 2, "total": 99}', "order-2")
    traffic = Traffic(
        shop=shop,
        retried=await send(api, "billing", '{"invoice": "in_1"}', Idempotency_Key="in_1"),
        dead_permanent=await send(api, "crm", '{"lead": 42}', Idempotency_Key="lead-42"),
        dead_exhausted=await send(api, "legacy", '{"ping": true}'),
    )
    for execution_id in [*shop, traffic.retried, traffic.dead_permanent, traffic.dead_exhausted]:
        await wait_until(api, execution_id)
    return traffic


async def _repeat(api: aiohttp.ClientSession, trigger_id: str, body: str, key: str) -> None:
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    async with api.post(f"/webhooks/{trigger_id}", data=body, headers=headers) as response:
        assert response.status == 200 and response.headers["Idempotent-Replayed"] == "true"


@fixture
async def page(browser: Browser, dashboard: Dashboard) -> AsyncIterator[Page]:
    """A fresh browser session on the dashboard; any script error or CSP refusal fails the test."""
    context = await browser.new_context(
        base_url=dashboard.url,
        viewport={"width": 1280, "height": 800},
        locale="en-GB",
        timezone_id="Europe/Paris",  # times must be shown in the viewer's zone, not UTC
    )
    opened = await context.new_page()
    opened.set_default_timeout(10_000)
    problems: list[str] = []
    # Chrome logs each 4xx answer as "Failed to load resource"; the 401 and 429 here are on purpose.
    opened.on(
        "console",
        lambda message: (
            problems.append(message.text)
            if message.type == "error" and not message.text.startswith("Failed to load resource")
            else None
        ),
    )
    opened.on("pageerror", lambda error: problems.append(str(error)))
    try:
        yield opened
    finally:
        await context.close()
    assert not problems, problems


async def sign_in(page: Page, route: str = "#/triggers") -> None:
    await page.goto(f"/#token={ADMIN_TOKEN}")
    await expect(page.get_by_test_id("view-triggers")).to_be_visible()
    await expect(page.get_by_test_id("live-status")).to_have_attribute("data-state", "live")
    if route != "#/triggers":
        await go(page, route)


async def go(page: Page, route: str) -> None:
    """Follow an in-app link, as a click on one does: the page is not reloaded."""
    await page.evaluate("route => { location.hash = route; }", route)


async def shoot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def on_a_phone(page: Page, name: str) -> None:
    """Narrow the window to a phone's: nothing may stick out sideways. Then a screenshot."""
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.wait_for_timeout(200)  # charts redraw at their new width on the next frames
    sideways = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    assert await page.evaluate(sideways) <= 0
    await shoot(page, name)


def row_of(page: Page, execution_id: str) -> Locator:
    return page.locator(f'[data-testid="execution-row"][data-execution-id="{execution_id}"]')


async def shown_execution_ids(page: Page) -> list[str]:
    rows = page.get_by_test_id("execution-row")
    return [str(await row.get_attribute("data-execution-id")) for row in await rows.all()]


async def expect_order(page: Page, execution_ids: list[str]) -> None:
    """The table shows exactly these executions, in this order (once it has re-rendered)."""
    rows = page.get_by_test_id("execution-row")
    await expect(rows).to_have_count(len(execution_ids))
    for n, execution_id in enumerate(execution_ids):
        await expect(rows.nth(n)).to_have_attribute("data-execution-id", execution_id)


async def test_the_dashboard_is_revalidated_and_may_run_only_its_own_code(
    dashboard: Dashboard,
) -> None:
    async with aiohttp.ClientSession(base_url=dashboard.url) as session:
        async with session.get("/") as response:
            assert response.status == 200
            assert response.headers["Content-Security-Policy"] == (
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
            )
            assert response.headers["Cache-Control"] == "no-cache"
            page = await response.text()
        for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', page):
            async with session.get("/" + asset) as response:
                assert response.status == 200, asset
                assert response.headers["Cache-Control"] == "no-cache"


async def test_the_link_signs_in_and_the_token_stays_out_of_the_access_log(
    dashboard: Dashboard, traffic: Traffic, page: Page, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    await sign_in(page)
    assert page.url == f"{dashboard.url}/#/triggers"  # the token left the address bar
    assert await page.evaluate("sessionStorage.getItem('hookledger.token')") == ADMIN_TOKEN

    rows = page.get_by_test_id("trigger-row")
    await expect(rows).to_have_count(len(TRIGGERS))
    for trigger in (await dashboard.get("/api/triggers"))["triggers"]:
        row = page.locator(f'[data-testid="trigger-row"][data-trigger-id="{trigger["id"]}"]')
        counts = trigger["counts"]
        await expect(row.get_by_test_id("trigger-state")).to_have_text("active")
        await expect(row.get_by_test_id("trigger-count-received")).to_have_text(
            str(counts["received"])
        )
        await expect(row.get_by_test_id("trigger-count-duplicates")).to_have_text(
            str(counts["duplicates"])
        )
        await expect(row.get_by_test_id("trigger-count-dead-lettered")).to_have_text(
            str(counts["dead_lettered"])
        )
        await expect(row.get_by_test_id("trigger-webhook-url")).to_have_text(
            f"{dashboard.url}/webhooks/{trigger['id']}"
        )
    await shoot(page, "triggers")

    await page.reload()  # the token is kept for the browser session
    await expect(page.get_by_test_id("trigger-row")).to_have_count(len(TRIGGERS))
    await on_a_phone(page, "triggers-phone")

    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any('"GET / ' in line for line in access), access  # the access log was on
    assert ADMIN_TOKEN not in caplog.text


async def test_the_link_hookledger_serve_prints_opens_the_dashboard(
    database_url: str, tmp_path: Path, browser: Browser
) -> None:
    server = await start_server(database_url, tmp_path, env={"HOOKLEDGER_ADMIN_TOKEN": ""})
    try:
        printed = server.log.read_text()
        link = re.search(r"dashboard: (http://\S+/#token=(\S+))", printed)
        assert link, printed
        context = await browser.new_context()
        try:
            page = await context.new_page()
            await page.goto(link[1])
            await expect(page.get_by_test_id("view-triggers")).to_be_visible()
            await expect(page.get_by_test_id("live-status")).to_have_attribute("data-state", "live")
            assert page.url == f"{server.url}/#/triggers"
            await page.reload()
            await expect(page.get_by_test_id("empty-state")).to_contain_text("No triggers yet")
        finally:
            await context.close()
    finally:
        server.stop()
    # Printed once to the operator (the link and the token lines); never logged.
    logged = [line for line in server.log.read_text().splitlines() if link[2] in line]
    assert [line.split(":", 1)[0].strip() for line in logged] == ["dashboard", "admin token"]


async def test_without_a_token_the_dashboard_asks_for_one(dashboard: Dashboard, page: Page) -> None:
    await page.goto("/")
    await expect(page.get_by_test_id("view-login")).to_be_visible()
    await expect(page.get_by_test_id("login-token")).to_be_focused()
    await shoot(page, "login")

    await page.get_by_test_id("login-token").fill("not-the-token")
    await page.get_by_test_id("login-submit").click()
    await expect(page.get_by_test_id("login-message")).to_have_text("This token was refused.")

    await page.get_by_test_id("login-token").fill(ADMIN_TOKEN)
    await page.get_by_test_id("login-token").press("Enter")
    await expect(page.get_by_test_id("view-triggers")).to_be_visible()
    await expect(page.get_by_test_id("empty-state")).to_contain_text("No triggers yet")

    heading = page.get_by_role("heading", name="Triggers")
    await expect(heading).to_be_focused()  # the keyboard goes on from the page, not from nowhere
    await page.keyboard.press("Tab")
    await expect(page.get_by_test_id("trigger-create")).to_be_focused()
    await page.reload()
    await page.keyboard.press("Tab")  # the first stop skips the navigation
    await expect(page.locator("#skip")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(heading).to_be_focused()

    await page.get_by_test_id("logout").click()
    await expect(page.get_by_test_id("view-login")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('hookledger.token')") is None


async def test_filters_narrow_the_executions_as_the_api_does(
    dashboard: Dashboard, traffic: Traffic, page: Page
) -> None:
    await sign_in(page, "#/executions")
    everything = (await dashboard.get("/api/executions"))["executions"]
    await expect_order(page, [e["execution_id"] for e in everything])
    await expect(page.get_by_test_id("executions-count")).to_have_text("6 executions shown (all)")

    await _check_local_time(page, everything[0])
    retried = row_of(page, traffic.retried)
    await expect(retried.get_by_test_id("execution-status")).to_have_text("succeeded")
    await expect(retried.get_by_test_id("execution-attempts")).to_have_text("2")
    await expect(retried.get_by_test_id("execution-status-code")).to_have_text("200")
    await expect(row_of(page, traffic.shop[1]).get_by_test_id("execution-duplicates")).to_have_text(
        "1"
    )
    await shoot(page, "executions")

    await page.get_by_test_id("filter-status").select_option("dead_lettered")
    await page.get_by_test_id("filter-apply").click()
    await expect(page).to_have_url(re.compile(r"#/executions\?status=dead_lettered$"))
    await expect(page.get_by_test_id("execution-row")).to_have_count(2)
    await page.get_by_test_id("filter-error-category").select_option("permanent")
    await page.get_by_test_id("filter-apply").click()
    await expect(page.get_by_test_id("execution-row")).to_have_count(1)
    await expect(row_of(page, traffic.dead_permanent)).to_be_visible()
    await expect(page.get_by_test_id("execution-error-category")).to_have_text("permanent")
    await shoot(page, "executions-dead-lettered")

    await page.get_by_test_id("filter-reset").click()
    await page.get_by_test_id("filter-trigger").select_option("shop")
    await page.get_by_test_id("filter-key").fill("order-2")
    await page.get_by_test_id("filter-key").press("Enter")
    await expect(page.get_by_test_id("execution-row")).to_have_count(1)
    await expect(row_of(page, traffic.shop[1])).to_be_visible()

    await go(page, "#/executions?trigger_id=shop")
    await expect_order(page, traffic.shop[::-1])  # newest first
    await page.get_by_test_id("sort-received").click()
    await expect(page.get_by_test_id("sort-received")).to_contain_text("▲")
    await expect_order(page, traffic.shop)

    await page.get_by_test_id("filter-until").fill("2000-01-01T00:00")
    await page.get_by_test_id("filter-apply").click()
    await expect(page.get_by_test_id("empty-state")).to_contain_text("No executions match")


async def _check_local_time(page: Page, execution: dict[str, Any]) -> None:
    """Shown in the viewer's zone (this browser is in Paris), the exact UTC instant on hover."""
    shown = row_of(page, execution["execution_id"]).locator("time").first
    utc = execution["received_at"][11:19]
    await expect(shown).to_have_attribute("title", re.compile(rf" {utc}\.\d{{3}} UTC$"))
    paris = await page.evaluate(
        "iso => new Date(iso).toLocaleTimeString('en-GB', {timeZone: 'Europe/Paris'})",
        execution["received_at"],
    )
    assert paris != utc
    await expect(shown).to_contain_text(paris)


async def test_executions_page_by_cursor(dashboard: Dashboard, page: Page) -> None:
    await create_trigger(dashboard.api, id="archive")  # no destination: recorded only
    for n in range(PAGE_SIZE + 1):
        await send(dashboard.api, "archive", f'{{"n": {n}}}')
    await sign_in(page, "#/executions?status=recorded")
    await expect(page.get_by_test_id("execution-row")).to_have_count(PAGE_SIZE)
    await expect(page.get_by_test_id("executions-count")).to_have_text(
        f"{PAGE_SIZE} executions shown"
    )
    await page.get_by_test_id("executions-load-more").click()
    await expect(page.get_by_test_id("execution-row")).to_have_count(PAGE_SIZE + 1)
    await expect(page.get_by_test_id("executions-count")).to_have_text(
        f"{PAGE_SIZE + 1} executions shown (all)"
    )
    await expect(page.get_by_test_id("executions-load-more")).to_be_hidden()
    first_page = (await dashboard.get("/api/executions", limit=PAGE_SIZE))["executions"]
    shown = await shown_execution_ids(page)
    assert shown[:PAGE_SIZE] == [e["execution_id"] for e in first_page]
    assert len(set(shown)) == PAGE_SIZE + 1


async def test_the_timeline_tells_each_execution_from_its_log(
    dashboard: Dashboard, traffic: Traffic, page: Page
) -> None:
    await sign_in(page, "#/executions?trigger_id=shop")
    await row_of(page, traffic.shop[1]).get_by_test_id("execution-link").click()
    await expect(page.get_by_test_id("view-execution")).to_be_visible()
    detail = await dashboard.get(f"/api/executions/{traffic.shop[1]}")
    steps = page.get_by_test_id("timeline-event")
    await expect(steps).to_have_count(len(detail["events"]))
    assert [await s.get_attribute("data-type") for s in await steps.all()] == [
        e["type"] for e in detail["events"]
    ]
    duplicate = page.locator('[data-type="webhook.duplicate"]')
    await expect(duplicate.get_by_test_id("duplicate-body-matches")).to_have_text("different body")
    await expect(page.get_by_test_id("event-headers").first).to_contain_text("order-2")
    await expect(page.get_by_test_id("execution-detail-duplicates")).to_have_text("1")
    await expect(page.locator('[data-type="execution.succeeded"]')).to_contain_text("HTTP 200")
    await shoot(page, "execution")

    await page.locator('[data-type="webhook.received"]').get_by_test_id("event-raw-link").click()
    await expect(page.get_by_test_id("view-event")).to_be_visible()
    await expect(page.get_by_test_id("event-type")).to_have_text("webhook.received")
    await expect(page.get_by_test_id("event-execution-link")).to_have_text(traffic.shop[1])
    await shoot(page, "event")

    await go(page, f"#/executions/{traffic.dead_exhausted}")
    await expect(page.get_by_test_id("execution-detail-status")).to_have_text("dead lettered")
    failures = page.locator('[data-type="execution.failed"]')
    await expect(failures).to_have_count(2)
    await expect(failures.first).to_contain_text("HTTP 503")
    await expect(failures.first).to_contain_text("transient")
    await expect(page.get_by_test_id("dead-letter-reason")).to_be_visible()
    await shoot(page, "execution-dead-lettered")
    await on_a_phone(page, "execution-phone")


async def test_a_replay_succeeds_live_and_a_second_one_counts_down(
    dashboard: Dashboard, traffic: Traffic, page: Page
) -> None:
    await sign_in(page, f"#/executions/{traffic.dead_permanent}")
    status = page.get_by_test_id("execution-detail-status")
    await expect(status).to_have_text("dead lettered")
    await page.get_by_test_id("replay-button").click()
    dialog = page.get_by_test_id("replay-dialog")
    await expect(dialog.get_by_test_id("replay-destination")).to_have_text(
        f"POST {dashboard.destination.url('/crm')}"
    )
    await expect(dialog.get_by_test_id("replay-body")).to_contain_text('"lead": 42')
    await shoot(page, "replay-dialog")
    await dialog.get_by_test_id("confirm-ok").click()

    await expect(status).to_have_text("succeeded")  # live, without a reload
    await expect(page.get_by_test_id("replay-progress-status")).to_have_text("succeeded")
    await expect(page.get_by_test_id("execution-detail-replays")).to_have_text("1")
    replayed = page.locator('[data-type="execution.replay_requested"]')
    await expect(replayed).to_contain_text("Replay requested by admin-api")
    await expect(page.locator('[data-type="execution.succeeded"]')).to_contain_text("HTTP 200")
    row = await dashboard.get(f"/api/executions/{traffic.dead_permanent}")
    assert (row["status"], row["replay_count"]) == ("succeeded", 1)

    await page.get_by_test_id("replay-button").click()
    await page.get_by_test_id("replay-dialog").get_by_test_id("confirm-ok").click()
    button = page.get_by_test_id("replay-button")
    await expect(button).to_have_text(re.compile(r"^Replay again in \d+ s$"))
    await expect(button).to_be_disabled()
    await expect(page.get_by_test_id("replay-message")).to_contain_text("Rate limited")
    first = int(str(await button.get_attribute("data-cooldown")))
    async with dashboard.api.post(f"/api/executions/{traffic.dead_permanent}/replay") as refused:
        assert refused.status == 429
        assert 0 < int(refused.headers["Retry-After"]) <= first <= REPLAY_INTERVAL_S
    await shoot(page, "replay-rate-limited")
    counted_down = "n => Number(document.querySelector('[data-testid=replay-button]')"
    await page.wait_for_function(f"{counted_down}.dataset.cooldown) < n", arg=first)
    await expect(button).to_be_enabled(timeout=REPLAY_INTERVAL_S * 1000 + 2000)
    await expect(page.get_by_test_id("replay-message")).to_have_text("You can replay again now.")


async def test_a_bulk_replay_counts_the_dead_letters_first(
    dashboard: Dashboard, traffic: Traffic, page: Page
) -> None:
    await sign_in(page)
    legacy = page.locator('[data-testid="trigger-row"][data-trigger-id="legacy"]')
    await legacy.get_by_test_id("trigger-bulk-replay").click()
    dialog = page.get_by_test_id("bulk-replay-dialog")
    await expect(dialog.get_by_test_id("bulk-replay-would")).to_have_text("1")  # the dry run
    await expect(dialog.get_by_test_id("bulk-replay-confirm")).to_have_text("Replay 1")
    assert (await dashboard.get(f"/api/executions/{traffic.dead_exhausted}"))["replay_count"] == 0
    await shoot(page, "bulk-replay-dialog")
    await dialog.get_by_test_id("bulk-replay-confirm").click()
    await expect(dialog.get_by_test_id("bulk-replay-result")).to_contain_text(
        "Replayed 1 execution"
    )
    row = await dashboard.get(f"/api/executions/{traffic.dead_exhausted}")
    assert row["replay_count"] == 1
    replayed = [e for e in row["events"] if e["type"] == "execution.replay_requested"]
    assert replayed[0]["data"]["bulk_id"] is not None


async def test_a_new_delivery_appears_live_without_a_reload(
    dashboard: Dashboard, traffic: Traffic, page: Page
) -> None:
    await sign_in(page)
    await page.evaluate("window.sameDocument = true")
    shop = page.locator('[data-testid="trigger-row"][data-trigger-id="shop"]')
    await expect(shop.get_by_test_id("trigger-count-received")).to_have_text("3")
    await send(dashboard.api, "shop", '{"order": 4}', Idempotency_Key="order-4")
    await expect(shop.get_by_test_id("trigger-count-received")).to_have_text("4")

    await go(page, "#/executions")
    await expect(page.get_by_test_id("execution-row")).to_have_count(7)
    execution_id = await send(dashboard.api, "shop", '{"order": 5}', Idempotency_Key="order-5")
    row = row_of(page, execution_id)
    await expect(row).to_be_visible()
    await expect(row.get_by_test_id("execution-status")).to_have_text("succeeded")
    assert (await shown_execution_ids(page))[0] == execution_id
    await expect(page.get_by_test_id("executions-count")).to_contain_text("1 new since")
    await shoot(page, "executions-live")
    assert await page.evaluate("window.sameDocument") is True
    await on_a_phone(page, "executions-phone")


async def test_the_stats_show_what_the_api_counts(
    dashboard: Dashboard, traffic: Traffic, page: Page
) -> None:
    await sign_in(page, "#/stats")
    for days in (7, 1, 30):
        if days != 7:
            await page.get_by_test_id(f"stats-days-{days}").click()
        await expect(page.get_by_test_id(f"stats-days-{days}")).to_have_attribute(
            "aria-pressed", "true"
        )
        answer = await dashboard.get("/api/stats", days=days)
        await expect(page.get_by_test_id("stats-trigger-section")).to_have_count(len(TRIGGERS))
        for trigger_id in TRIGGERS:
            await _check_trigger_stats(page, trigger_id, answer)
        if days == 7:
            await shoot(page, "stats")

    await page.get_by_test_id("stats-trigger").select_option("crm")
    await expect(page.get_by_test_id("stats-trigger-section")).to_have_count(1)
    await _check_trigger_stats(page, "crm", await dashboard.get("/api/stats", days=30))
    await on_a_phone(page, "stats-phone")


async def _check_trigger_stats(page: Page, trigger_id: str, answer: dict[str, Any]) -> None:
    section = page.locator(f'[data-testid="stats-trigger-section"][data-trigger-id="{trigger_id}"]')
    rows = [row for row in answer["stats"] if row["trigger_id"] == trigger_id]
    totals = answer["totals"][trigger_id]
    for name in ("received", "duplicates", "succeeded", "failed_transient", "failed_permanent"):
        assert sum(row[name] for row in rows) == totals[name]
        await expect(section.get_by_test_id(f"stats-total-{name}")).to_have_attribute(
            "data-value", str(totals[name])
        )
    await expect(section.get_by_test_id("stats-total-dead_lettered")).to_have_attribute(
        "data-value", str(totals["dead_lettered_events"])
    )
    for row in rows:
        day = section.locator(f'[data-testid="stats-table"] tr[data-day="{row["day"]}"]')
        for name in ("received", "duplicates", "dead_lettered"):
            await expect(day.locator(f'td[data-field="{name}"]')).to_have_attribute(
                "data-value", str(row[name])
            )
        for name in ("latency_p50_ms", "latency_p95_ms"):
            shown = await day.locator(f'td[data-field="{name}"]').get_attribute("data-value")
            assert (float(shown) if shown else None) == row[name]
    await expect(section.locator('[data-testid="chart-received"] rect.bar').first).to_be_attached()


async def test_a_trigger_is_created_with_its_secret_shown_once_then_paused_and_deleted(
    dashboard: Dashboard, page: Page
) -> None:
    await sign_in(page)
    await page.get_by_test_id("trigger-create-empty").click()
    dialog = page.get_by_test_id("create-trigger-dialog")
    await dialog.get_by_test_id("create-trigger-id").fill("github-main")
    await dialog.get_by_test_id("create-trigger-source").select_option("github")
    await dialog.get_by_test_id("create-trigger-destination-url").fill(
        dashboard.destination.url("/gh")
    )
    await dialog.get_by_test_id("create-trigger-submit").click()
    secret = dialog.get_by_test_id("created-secret")
    await expect(secret).to_have_value(re.compile(r".{16,}"))
    await expect(dialog.get_by_test_id("created-webhook-url")).to_have_text(
        f"{dashboard.url}/webhooks/github-main"
    )
    await shoot(page, "trigger-created")
    await dialog.get_by_test_id("create-trigger-done").click()

    row = page.locator('[data-testid="trigger-row"][data-trigger-id="github-main"]')
    await expect(row.get_by_test_id("trigger-source")).to_contain_text("signed")
    await row.get_by_test_id("trigger-pause").click()
    await expect(row.get_by_test_id("trigger-state")).to_have_text("paused")
    assert (await dashboard.get("/api/triggers/github-main"))["paused"] is True
    await row.get_by_test_id("trigger-resume").click()
    await expect(row.get_by_test_id("trigger-state")).to_have_text("active")

    await row.get_by_test_id("trigger-delete").click()
    await page.get_by_test_id("delete-dialog").get_by_test_id("confirm-ok").click()
    await expect(row).to_have_count(0)
    await expect(page.get_by_test_id("empty-state")).to_be_visible()
