"""Headless Chromium drives the live viewer: `longlive serve` runs as a real process on the tiny model; the page shows
frames, takes a new prompt, and the switch lands on the next chunk boundary; a screenshot is kept as an artifact.

Needs Debian's chromium and Playwright for Python (`bash tools/install_chromium.sh`); skipped with the reason
otherwise. Screenshots go to $LONGLIVE_TEST_ARTIFACTS (default: the test's tmp_path).
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NEW_PROMPT = "a blue circle moves down"


def _require_browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed: run `bash tools/install_chromium.sh` (Debian's chromium package)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright (Python) not installed: run `bash tools/install_chromium.sh`")


@pytest.fixture
def server():
    """`longlive serve` on the tiny model, 32x32 pixels, a free port picked by the OS; yields its URL."""
    cmd = [sys.executable, "-m", "megatron_longlive.cli.main", "serve", "--port", "0",
           "--set", "infer.height=32", "--set", "infer.width=32", "--set", "infer.fps=8",
           "--min-switch-interval", "0", "--max-lead", "1.0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    output, url, deadline = [], None, time.monotonic() + 120
    try:
        while url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("longlive serve printed no URL within 120 s:\n" + "".join(output))
            output.append(line)
            match = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
            url = match.group(1) if match else None
            if proc.poll() is not None and url is None and lines.empty():
                pytest.fail(f"longlive serve exited with {proc.returncode}:\n" + "".join(output))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def test_viewer_in_headless_chromium(server, tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    artifacts = os.environ.get("LONGLIVE_TEST_ARTIFACTS") or str(tmp_path)
    os.makedirs(artifacts, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(server)
            page.click("#start")
            # frames arrive and are drawn: the counter grows and the canvas content changes
            page.wait_for_function("Number(document.getElementById('frames').textContent) >= 2", timeout=60_000)
            first = page.evaluate("document.getElementById('screen').toDataURL()")
            page.wait_for_function("Number(document.getElementById('frames').textContent) >= 4", timeout=60_000)
            assert page.evaluate("document.getElementById('screen').toDataURL()") != first, "canvas did not change"
            assert _text(page, "#now-prompt") == "a red square slides right"
            # switch the prompt mid-stream
            page.fill("#prompt", NEW_PROMPT)
            received = int(_text(page, "#received"))
            page.click("#switch")
            page.wait_for_function("document.getElementById('apply-at').textContent !== '-'", timeout=30_000)
            apply_at = int(_text(page, "#apply-at"))
            # the next chunk boundary: never a chunk already on the page; and the first chunk the server had not
            # started when the request came: when its answer arrived, the chunks before apply_at were announced
            # (the one before apply_at possibly still on its way)
            at_ack = int(page.locator("#apply-at").get_attribute("data-received-at-ack"))
            assert received <= apply_at and at_ack <= apply_at <= at_ack + 1, (received, at_ack, apply_at)
            entry = page.locator(f"#log li[data-prompt='{NEW_PROMPT}']")
            entry.wait_for(timeout=60_000)
            assert int(entry.get_attribute("data-chunk")) == apply_at
            # playback reaches the switch: the page shows the new prompt applied at that chunk
            page.wait_for_function(f"document.getElementById('now-prompt').textContent === '{NEW_PROMPT}'",
                                   timeout=60_000)
            assert int(_text(page, "#now-since")) == apply_at
            assert int(_text(page, "#chunk")) >= apply_at
            shot = os.path.join(artifacts, "viewer_after_switch.png")
            page.screenshot(path=shot, full_page=True)
            assert os.path.getsize(shot) > 1000
            assert not errors, errors
        finally:
            browser.close()


def test_install_script_is_idempotent_when_present():
    if not os.path.exists(CHROMIUM) or shutil.which("bash") is None:
        pytest.skip(f"{CHROMIUM} not installed: the install script would download packages")
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "install_chromium.sh")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Chromium" in r.stdout
