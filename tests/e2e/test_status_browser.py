"""The /status page in a real headless browser (Debian's chromium, driven through chromedriver).

The server runs as a child process with live SMTP sessions held open by the test. The page
must list them, then show a session opened after it loaded, by reloading itself (the test
does not navigate again). The screenshot is saved in the test's tmp folder, its path printed,
and checked to be a real PNG of the window's size.

With ``[admin] token`` set, the page's kick button (a form POST, under the page's
Content-Security-Policy) closes a session, and the page says so.
"""

from __future__ import annotations

import json
import os
import smtplib
import struct
import time

import gevent
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from qpgevent.testing import wait_until
from test_admin import get

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDTH, HEIGHT = 1400, 800


@pytest.fixture
def browser(tmp_path):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    assert not missing, f"{missing} missing: run tools/install-test-deps (Debian chromium, chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # This machine's network is closed: without the background-networking flags Chromium
    # keeps trying Google's hosts. A fresh profile each time, so no state leaks between runs.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-dev-shm-usage", f"--window-size={WIDTH},{HEIGHT}",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


#: Read in one go, inside the page: it reloads every second, which makes element handles
#: taken before a reload stale.
READ_PAGE = """
const rows = Array.from(document.querySelectorAll("#sessions tbody tr[data-session]"));
return {title: document.title, totals: (document.getElementById("totals") || {}).innerText || "",
        rows: rows.map(tr => Array.from(tr.cells).map(td => td.innerText))};
"""


def page(driver) -> dict:
    """The page as shown now: title, the totals line, and HELO -> the row's cells."""
    shown = driver.execute_script(READ_PAGE)
    shown["rows"] = {cells[3]: cells for cells in shown["rows"]}
    return shown


def rows(driver) -> dict[str, list[str]]:
    return page(driver)["rows"]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        gevent.sleep(0.1)


def client(server, source: str, helo: str) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", server.port, local_hostname=helo, source_address=(source, 0), timeout=30)
    smtp.ehlo()
    return smtp


def test_the_status_page_lists_live_sessions_and_refreshes_itself(server_process, browser, tmp_path):
    server = server_process(admin_listen="127.0.0.1:0", refresh=1)
    assert server.admin_url, server.log()
    first = client(server, "127.0.0.2", "first.browser.test")
    second = client(server, "127.0.0.3", "second.browser.test")
    second.mail("alice@client.test")
    second.rcpt("bob@example.test")
    second.rcpt("carol@example.test")
    third = None
    try:
        browser.get(server.admin_url + "/status")
        shown = wait_for(lambda: (lambda r: r if {"first.browser.test", "second.browser.test"} <= set(r) else None)(
            rows(browser)), 15, "both sessions on the page")
        workers = {str(pid) for pid in server.worker_pids()}
        pid, ip, rdns, helo, state, doing, sender, rcpts, size, age, conn = shown["second.browser.test"]
        assert (pid in workers, ip, rdns, state, doing, sender, rcpts) == (
            True, "127.0.0.3", "-", "rcpt", "waiting", "<alice@client.test>", "2")
        assert conn.strip().startswith(f"{int(pid):x}.")  # the conn= id; no kick button without a token
        assert size.endswith(" B") and age.endswith("s")
        assert shown["first.browser.test"][1:8] == ["127.0.0.2", "-", "first.browser.test", "ready", "waiting",
                                                    "-", "0"]
        shown = page(browser)
        assert "2 live sessions" in shown["totals"]
        assert shown["title"] == "qpgevent mx.example.test: 2 sessions"

        # A session that starts after the page loaded: the page must find it by itself.
        third = client(server, "127.0.0.4", "third.browser.test")
        wait_for(lambda: "third.browser.test" in rows(browser), 15, "the page to reload and show the third session")
        assert "3 live sessions" in page(browser)["totals"]

        screenshot = tmp_path / "status-page.png"
        assert browser.save_screenshot(str(screenshot))
        print(f"\nscreenshot of /status: {screenshot}")
    finally:
        for smtp in (first, second, third):
            if smtp is not None:
                smtp.close()
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 800 and height > 400, (width, height)
    assert len(png) > 10_000  # a rendered table, not a blank page


def test_the_kick_button_closes_a_session(server_process, browser):
    server = server_process(admin_listen="127.0.0.1:0", admin_token="browser-token", refresh=1)
    held = client(server, "127.0.0.5", "kicked.browser.test")
    try:
        browser.get(server.admin_url + "/status?token=browser-token")
        shown = wait_for(lambda: rows(browser).get("kicked.browser.test"), 15, "the session on the page")
        conn_id = shown[10].split()[0]
        # One script, so that the click lands on the page as loaded (it reloads every second).
        browser.execute_script(f'document.querySelector(\'tr[data-session="{conn_id}"] button\').click();')
        said = wait_for(lambda: browser.execute_script(
            "return (document.getElementById('done') || {}).innerText || '';"), 15, "the page to say what it did")
        assert said.startswith(f"kicked {conn_id}"), said
        assert "token=browser-token" in browser.current_url
        assert held.getreply()[0] == 421
    finally:
        held.close()
    rows_now = json.loads(get(server.admin_url + "/status.json", "browser-token")[2])["sessions"]
    assert all(r["id"] != conn_id for r in rows_now)
    wait_until(lambda: f"conn={conn_id} kicked by the operator" in server.log(), 10, "the log line")
