"""Drives the console page in headless Chromium over the DevTools protocol
(its pipe transport: NUL-terminated JSON on file descriptors 3 and 4, no
WebSocket library needed) and prints what it saw as one JSON object.

    python console.py URL TOKEN DATABASE_URL SCREENSHOT

The page must first say the token is needed; given the token, the live
stream connects; a row committed to `orders` (id 4242) must appear in it;
a trace of `order:4242` must show a verdict; explain must show the command
of a delete. The caller (tests/integration/browser.rs) checks the times and
texts. A screenshot of the page is written to SCREENSHOT.
"""

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psycopg


class Browser:
    def __init__(self):
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise SystemExit("chromium is not installed: run scripts/bootstrap")
        self.profile = tempfile.mkdtemp(prefix="evictd-chromium-")
        to_browser_read, self.to_browser = os.pipe()
        self.from_browser, from_browser_write = os.pipe()

        def descriptors():
            # Moved out of the way first: a pipe may already be 3 or 4,
            # and dup2 onto itself would leave it closed at exec.
            read = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
            write = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.process = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--remote-debugging-pipe",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--user-data-dir=" + self.profile,
                "about:blank",
            ],
            preexec_fn=descriptors,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.next_id = 0
        self.buffer = b""
        self.session = None

    def call(self, method, params=None, timeout=30):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buffer:
                if time.monotonic() > deadline:
                    raise TimeoutError(method)
                chunk = os.read(self.from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed its pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def open(self, url):
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call(
            "Target.attachToTarget", {"targetId": target, "flatten": True}
        )["sessionId"]
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1360, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )
        self.call("Page.navigate", {"url": url})
        self.wait_for(
            f"location.href === {json.dumps(url)} && document.readyState === 'complete'"
        )

    def evaluate(self, expression):
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=10, every=0.01):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression} stayed false for {timeout} s")
            time.sleep(every)

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as file:
            file.write(base64.b64decode(data))

    def close(self):
        try:
            self.session = None
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def text_of(element_id):
    return f"document.getElementById({json.dumps(element_id)}).textContent"


def main():
    url, token, database, screenshot = sys.argv[1:5]
    seen = {}
    browser = Browser()
    try:
        browser.open(url)
        # Beyond loopback the API answers nothing without the token.
        seen["without_token"] = browser.wait_for(
            f"{text_of('stream-state')} === 'token needed' && {text_of('stream-state')}"
        )
        browser.evaluate(
            f"document.getElementById('token').value = {json.dumps(token)};"
            " document.getElementById('token-use').click(); true"
        )
        seen["with_token"] = browser.wait_for(
            f"{text_of('stream-state')} === 'live' && {text_of('stream-state')}"
        )
        browser.wait_for("document.querySelectorAll('#filter-table option').length > 1")

        with psycopg.connect(database, autocommit=True) as connection:
            connection.execute("insert into orders values (4242, 1, 'new')")
            committed = time.monotonic()
        browser.wait_for(
            "[...document.querySelectorAll('#events td.target')]"
            ".some((cell) => cell.textContent === 'order:4242')",
            timeout=10,
            every=0.005,
        )
        seen["stream_ms"] = (time.monotonic() - committed) * 1000

        browser.evaluate(
            "document.getElementById('trace-key').value = 'order:4242';"
            " document.getElementById('trace-go').click(); true"
        )
        browser.wait_for(
            "/^(exact|stale|unmapped):/.test(document.getElementById('trace-verdict').textContent)"
        )
        seen["verdict"] = browser.evaluate(text_of("trace-verdict"))

        browser.evaluate(
            "document.getElementById('explain-table').value = 'public.orders';"
            " document.getElementById('explain-op').value = 'delete';"
            " document.getElementById('explain-old').value = '{\"id\": 4242, \"user_id\": 1, \"status\": \"new\"}';"
            " document.getElementById('explain-go').click(); true"
        )
        browser.wait_for("document.getElementById('explain-out').textContent.length > 0")
        seen["explain"] = browser.evaluate(text_of("explain-out"))
        # Two samples of throughput on the charts.
        time.sleep(2.5)
        seen["chart_points"] = browser.evaluate(
            "document.querySelector('#throughput polyline').getAttribute('points').split(' ').length"
        )
        browser.screenshot(screenshot)
    finally:
        browser.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
