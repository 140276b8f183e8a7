"""The chat page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import pytest

from chatstream.settings import Settings

from .apps import stream_traces, wait_until

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@contextlib.contextmanager
def chromium():
    """Debian's Chromium, headless, launched through Playwright; closed after the block."""
    if CHROMIUM is None:
        pytest.fail("Debian chromium is not installed (scripts/system-deps.sh installs it)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture
def page(serve):
    srv = serve(Settings(), max_new_tokens=64)
    with chromium() as browser:
        pg = browser.new_page()
        pg.goto(srv.url + "/")
        pg.chat_stream = srv.chat_stream
        yield pg


def answers(page):
    return page.locator(".assistant")


def test_chat_page_streams_regenerates_stops_and_clears(page):
    # Record every text the answer bubble shows, inside the page: a short answer streams in well under a
    # second, faster than polling from the test could see its pieces.
    page.evaluate("""() => {
        window.answerStates = [];
        new MutationObserver(() => {
            const all = document.querySelectorAll('.assistant');
            if (all.length) window.answerStates.push(all[all.length - 1].textContent);
        }).observe(document.querySelector('#log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", "What is the capital of France?")
    page.keyboard.press("Enter")
    page.wait_for_function("[...document.querySelectorAll('.assistant')].pop()?.textContent.includes('Paris')",
                           timeout=60_000)
    states = [s for s in dict.fromkeys(page.evaluate("window.answerStates")) if s]
    assert len(states) >= 2, f"the answer appeared in pieces as it streamed: {states}"
    assert all(later.startswith(earlier) for earlier, later in zip(states, states[1:])), states
    page.wait_for_selector("#send:not([disabled])")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"))

    page.fill("#input", "Write a very long story about a dragon.")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.assistant')[1].textContent.length > 10")
    page.click("#stop")
    page.wait_for_selector("#send:not([disabled])")
    stopped = answers(page).nth(1).inner_text()
    time.sleep(0.5)
    assert answers(page).nth(1).inner_text() == stopped, "nothing arrives after Stop"
    cs = page.chat_stream
    deadline = time.monotonic() + 10
    while (cs.admission.processing, cs.engine.scheduler.active) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (cs.admission.processing, cs.engine.scheduler.active) == (0, 0), "Stop ended the generation on the server"
    # Stop cut the stream short (a stream that had already finished would say "success").
    wait_until(lambda: stream_traces(cs, "client_disconnected_while_streaming"), 10)

    page.click("#regenerate")
    page.wait_for_function("document.querySelectorAll('.assistant')[1].textContent.length > 0")
    page.wait_for_selector("#send:not([disabled])")
    assert answers(page).count() == 2

    page.click("#clear")
    page.wait_for_function("document.querySelectorAll('.msg').length === 0")
    page.fill("#input", "What is the capital of France?")
    page.keyboard.press("Enter")
    page.wait_for_function("(document.querySelector('.assistant') || {}).textContent?.includes('Paris')")


def test_chat_page_shows_errors(page):
    cs = page.chat_stream
    cs.stop_admitting()
    page.fill("#input", "hello")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.error")
    assert "503" in page.locator(".msg.error").inner_text()


@pytest.fixture
def keyed_browser(serve, tmp_path):
    """A server that needs an API key, and a browser to open it with."""
    (tmp_path / "keys").write_text(API_KEY + "\n")
    srv = serve(Settings(api_keys_file=str(tmp_path / "keys")), max_new_tokens=24)
    with chromium() as browser:
        browser.url = srv.url
        yield browser


API_KEY = "cs-page-4b9d2e71"


def open_with_answers(browser, replies: list[str]):
    """A fresh tab (its own sessionStorage) whose key prompts are answered with ``replies`` in turn."""
    page = browser.new_context().new_page()
    page.prompts = []

    def answer(dialog):
        page.prompts.append(dialog.message)
        dialog.accept(replies[len(page.prompts) - 1])

    page.on("dialog", answer)
    page.goto(browser.url + "/")
    return page


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.keyboard.press("Enter")
    page.wait_for_selector("#send:not([disabled])")


def test_chat_page_asks_for_the_key_once_and_keeps_it_for_the_session(keyed_browser):
    page = open_with_answers(keyed_browser, [API_KEY])
    send(page, "What is the capital of France?")
    page.wait_for_function("document.querySelector('.assistant').textContent.includes('Paris')", timeout=60_000)
    assert len(page.prompts) == 1 and "API key" in page.prompts[0]
    assert page.evaluate("sessionStorage.getItem('chatstream-api-key')") == API_KEY
    send(page, "And of Italy?")
    assert answers(page).count() == 2 and answers(page).nth(1).inner_text()
    with page.expect_response("**/clear_context") as cleared:
        page.click("#clear")
    assert cleared.value.status == 200
    page.goto(keyed_browser.url + "/traces")  # same tab, same session: the traces page uses the key too
    page.wait_for_selector("#streams tr")
    assert len(page.prompts) == 1, "asked once for the whole session"
    assert not page.locator(".msg.error").count()


def test_chat_page_with_a_wrong_key_shows_401_and_asks_again(keyed_browser):
    page = open_with_answers(keyed_browser, ["not-the-key", API_KEY])
    send(page, "What is the capital of France?")
    error = page.locator(".msg.error")
    assert "401" in error.inner_text() and "not valid" in error.inner_text()
    assert API_KEY not in page.content()
    send(page, "What is the capital of France?")
    page.wait_for_function("[...document.querySelectorAll('.assistant')].pop().textContent.includes('Paris')",
                           timeout=60_000)
    assert len(page.prompts) == 2
