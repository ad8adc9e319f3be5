"""A small W3C WebDriver client (https://www.w3.org/TR/webdriver2/) over urllib, enough to drive a
headless Chromium through Debian's chromedriver in the tests, with no Python package to install."""

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"       # the key the protocol names elements by
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1100,900", "--autoplay-policy=no-user-gesture-required"]


class WebDriverError(RuntimeError):
    pass


def find_chromium() -> tuple:
    """(chromium, chromedriver) paths, or (None, why not)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    missing = "chromium" if not browser else "chromedriver"
    return None, f"{missing} is not installed (apt-get install chromium chromium-driver)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium session; the methods are the protocol's commands that the tests use."""

    def __init__(self, chromium: str, chromedriver: str, profile: Path, log: Path, timeout=30.0):
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.driver = subprocess.Popen([chromedriver, f"--port={port}"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._call("GET", "/status").get("ready"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline or self.driver.poll() is not None:
                self.close()
                raise WebDriverError(f"chromedriver did not start (see {log})")
            time.sleep(0.1)
        options = {"binary": chromium, "args": HEADLESS + [f"--user-data-dir={profile}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            value = json.loads(e.read() or b"{}").get("value", {})
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {value.get('message')}") from None

    def cmd(self, method, path, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    # ------------------------------------------------------------ pages and tabs

    def open(self, url):
        self.cmd("POST", "/url", {"url": url})

    def new_tab(self) -> str:
        handle = self.cmd("POST", "/window/new", {"type": "tab"})["handle"]
        self.switch(handle)
        return handle

    def switch(self, handle):
        self.cmd("POST", "/window", {"handle": handle})

    def js(self, script, *args):
        """Run `script` (a function body; `arguments` holds args) in the page and return its value."""
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> Path:
        Path(path).write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))
        return Path(path)

    # ------------------------------------------------------------ elements

    def find(self, css) -> dict:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})

    def find_all(self, css, within=None) -> list:
        path = f"/element/{within[ELEMENT]}/elements" if within else "/elements"
        return self.cmd("POST", path, {"using": "css selector", "value": css})

    def click(self, element):
        self.cmd("POST", f"/element/{element[ELEMENT]}/click", {})

    def type(self, element, text):
        """Keys into an element; for <input type=file>, a path to pick."""
        self.cmd("POST", f"/element/{element[ELEMENT]}/value", {"text": str(text)})

    def text(self, element) -> str:
        return self.cmd("GET", f"/element/{element[ELEMENT]}/text")

    def wait(self, condition, timeout=60.0, what="the page"):
        """Poll `condition()` until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}")
            time.sleep(0.1)

    def close(self):
        try:
            if getattr(self, "session", None):
                self._call("DELETE", f"/session/{self.session}")
        finally:
            self.driver.terminate()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
            self.log.close()
