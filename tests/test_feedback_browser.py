"""The annotation page in real headless Chromium (Debian's `chromium`, driven by Playwright for Python).

Signs in, labels a pair with clicks and one with the keyboard, ranks three responses, writes a
demonstration, checks the export, and shows that a response holding <script> and <img onerror> is
displayed as text and runs nothing. The Makefile installs chromium (apt) and playwright (dev extra);
without them the test is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from rlhf.feedback.export import preference_rows, sft_rows
from rlhf.feedback.server import create_app
from rlhf.feedback.store import ItemSpec
from test_feedback import PASSWORD, config, make_store, user_prompt

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(os.environ.get("RLHF_ANNOTATE_SCREENSHOT", "/tmp/annotate.png"))
XSS = 'Sure! <script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2"> done.'
GOOD = ("Find its process id with `ps aux | grep python`, then run `kill PID`. If it ignores that, "
        "`kill -9 PID` stops it at once (without letting it clean up).\n\nOn Windows: `taskkill /PID PID /F`.")

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (make install does, with apt-get)", allow_module_level=True)


class LiveServer:
    """uvicorn on a free port in a background thread, stopped cleanly at the end."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_annotate_in_headless_chromium(tmp_path):
    db = tmp_path / "fb.db"
    kill = user_prompt("How do I kill a python process that ignores Ctrl+C?")
    specs = [ItemSpec("pair", kill, [GOOD, XSS]),
             ItemSpec("pair", user_prompt("What is 7 + 5?"), ["7 + 5 = 12.", "7 + 5 = 13."]),
             ItemSpec("rank", user_prompt("Name a fruit."), ["pear", "a car", "apple"]),
             ItemSpec("demo", user_prompt("Greet Alice."), ["hello alice"])]
    store = make_store(db, specs, users=("alice",))
    cfg = config(db, tasks=["pair", "rank", "demo"])
    errors: list[str] = []
    with LiveServer(create_app(cfg, store)) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")

        # 1. Sign in (the first /api/me answers 401: that is how the page knows to show the form).
        page.fill("#login-name", "alice")
        page.fill("#login-password", "not the password")
        page.click("#login-form button[type=submit]")
        sync_api.expect(page.locator("#login-error")).to_contain_text("wrong")
        page.fill("#login-password", PASSWORD)
        page.click("#login-form button[type=submit]")
        page.wait_for_selector(".pair .response")

        # 2. Untrusted text stays text: the markup is visible, nothing ran, no element was created.
        texts = page.locator(".response-text").all_inner_texts()
        assert XSS in texts and GOOD in texts
        assert page.evaluate("window.__pwned") is None
        assert page.locator("#task-body img, #task-body script").count() == 0
        sync_api.expect(page.locator("#progress-text")).to_have_text("0 labelled · 4 to go")  # the one on screen counts

        # 3. Pair by clicks: the helpful answer, "much better", and flag the other one harmful.
        good_side = texts.index(GOOD)
        page.locator(".pair .response").nth(good_side).locator(".response-text").click()
        page.click("button[data-strength=much]")
        page.locator(f".pair .response[data-pos='{1 - good_side}'] input[data-flag=harmful]").check()
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        page.click("#submit")

        # 4. Pair by keyboard: press the number of the side showing "12", then Enter.
        sync_api.expect(page.locator("#prompt")).to_contain_text("7 + 5")
        sides = page.locator(".response-text").all_inner_texts()
        page.keyboard.press(str(sides.index("7 + 5 = 12.") + 1))
        page.keyboard.press("Enter")

        # 5. Ranking by keyboard: pear > apple > a car.
        page.wait_for_selector(".rank-list")
        shown = page.locator(".response-text").all_inner_texts()
        for text in ("pear", "apple", "a car"):
            page.keyboard.press(str(shown.index(text) + 1))
        sync_api.expect(page.locator("#ranking-summary")).to_contain_text(">")
        page.keyboard.press("Enter")

        # 6. Demonstration: edit the draft, submit with Ctrl+Enter.
        page.wait_for_selector("#demo-text")
        assert page.input_value("#demo-text") == "hello alice"
        page.fill("#demo-text", "Hello, Alice! How can I help you today?")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("#done-view:not([hidden])")
        sync_api.expect(page.locator("#progress-text")).to_have_text("4 labelled · 0 to go")
        browser.close()

    assert not errors, errors  # includes any Content-Security-Policy violation by our own page
    rows = preference_rows(store)
    assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["margin"]) == (GOOD, XSS, 1.0)
    assert rows[0]["flags_rejected"] == ["harmful"] and rows[0]["flags_chosen"] == []
    assert (rows[1]["chosen"], rows[1]["margin"]) == ("7 + 5 = 12.", 0.5)
    assert [(r["chosen"], r["rejected"]) for r in rows[2:]] == [("pear", "apple"), ("pear", "a car"), ("apple", "a car")]
    assert [(d["prompt"], d["completion"]) for d in sft_rows(store)] == [("Greet Alice.", "Hello, Alice! How can I help you today?")]


def label_every_pair(url: str, name: str, prefer) -> int:
    """A scripted annotator in headless Chromium: signs in as `name` and labels every pair it is served with the
    keyboard ("1" or "2", or "t" for a tie, as ``prefer(prompt, left, right)`` says, then Enter); returns how many."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#login-name", name)
        page.fill("#login-password", PASSWORD)
        page.click("#login-form button[type=submit]")
        done = 0
        while page.wait_for_selector("#task-view:not([hidden]) .pair .response, #done-view:not([hidden])").get_attribute("id") != "done-view":
            sync_api.expect(page.locator("#progress-text")).to_have_text(re.compile(f"^{done} labelled"))  # next item up
            left, right = page.locator(".response-text").all_inner_texts()
            page.keyboard.press(prefer(page.inner_text("#prompt"), left, right))
            page.keyboard.press("Enter")
            done += 1
            sync_api.expect(page.locator("#progress-text")).to_have_text(re.compile(f"^{done} labelled"))
        browser.close()
    return done
