"""A headless Chromium for the tests, driven over the Chrome DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in NUL, read by the browser on fd 3, written on
fd 4). No driver and no Python dependency: the standard library only, and the browser's version is
the protocol's version.

    with Chromium.start(tmp_path / "profile") as browser:
        browser.open(path.as_uri())
        browser.evaluate("document.title")
        browser.click_header("Robust accuracy", "worst case")
        browser.column("Robust accuracy", "worst case")
        browser.screenshot_for_people(tmp_path, "page.png")  # and to $ADVBENCH_SCREENSHOT_DIR

The browser runs as the issue asks: --headless --no-sandbox --disable-gpu, a fresh profile, no
first-run, background, component-update, sync or QUIC traffic, and every host name unresolvable
(the pages are file:// URLs; nothing may be fetched). ``requests`` lists every URL the page asked for.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-extensions",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars", "--remote-debugging-pipe"]


def chromium_path() -> Optional[str]:
    """Debian's chromium (the `chromium` package), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_chromium = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (Debian: apt-get install "
                                                                    "chromium; .ci/run installs it)")


class BrowserError(RuntimeError):
    pass


class Chromium:
    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int, log: Path, timeout: float):
        self.proc, self._out, self._in, self.log, self.timeout = proc, to_browser, from_browser, log, timeout
        self._buf = b""
        self._next = 0
        self.session: Optional[str] = None
        self.events: List[Dict[str, Any]] = []

    @classmethod
    def start(cls, profile: Path, timeout: float = 60.0) -> "Chromium":
        exe = chromium_path()
        if exe is None:
            raise BrowserError("chromium is not installed")
        profile.mkdir(parents=True, exist_ok=True)
        cmd_r, cmd_w = os.pipe()  # we write commands, the browser reads them on fd 3
        ev_r, ev_w = os.pipe()  # the browser writes answers and events on fd 4, we read them
        # the browser's ends above 9 (closed on exec), so that putting them on 3 and 4 overwrites neither
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, ev_w)]
        for fd in (cmd_r, ev_w):
            os.close(fd)
        cmd_r, ev_w = ends

        def on_3_and_4():  # in the child, before exec; dup2 leaves 3 and 4 open across exec
            os.dup2(cmd_r, 3)
            os.dup2(ev_w, 4)

        log = profile.parent / (profile.name + ".log")
        with open(log, "wb") as err:
            proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"], preexec_fn=on_3_and_4,
                                    close_fds=False, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        os.close(cmd_r)
        os.close(ev_w)
        browser = cls(proc, cmd_w, ev_r, log, timeout)
        try:
            target = browser.send("Target.createTarget", url="about:blank", session=False)["targetId"]
            browser.session = browser.send("Target.attachToTarget", targetId=target, flatten=True,
                                           session=False)["sessionId"]
            browser.send("Page.enable")
            browser.send("Network.enable")
            browser.send("Runtime.enable")
        except BaseException:
            browser.close()
            raise
        return browser

    # --- the protocol ----------------------------------------------------------------------------
    def send(self, method: str, session: bool = True, **params) -> Dict[str, Any]:
        self._next += 1
        msg: Dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _read(self) -> Dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._in], [], [], max(0.0, left))
            if not ready:
                raise BrowserError(f"no answer from chromium in {self.timeout:.0f} s; its log: {self._log_tail()}")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise BrowserError(f"chromium closed the pipe (exit {self.proc.poll()}); its log: {self._log_tail()}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(none)"

    def wait_for(self, method: str) -> Dict[str, Any]:
        """The next event ``method`` of the page (one already received counts)."""
        while True:
            for i, ev in enumerate(self.events):
                if ev["method"] == method:
                    return self.events.pop(i)
            reply = self._read()
            if "method" in reply:
                self.events.append(reply)

    # --- what a test does -------------------------------------------------------------------------
    def open(self, url: str, width: int = 1280, height: int = 900) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    @property
    def requests(self) -> List[str]:
        """The URLs the page requested so far (Network.requestWillBeSent)."""
        return [ev["params"]["request"]["url"] for ev in self.events if ev["method"] == "Network.requestWillBeSent"]

    @property
    def errors(self) -> List[str]:
        """The page's uncaught JavaScript exceptions so far (Runtime.exceptionThrown)."""
        return [json.dumps(ev["params"]["exceptionDetails"]) for ev in self.events
                if ev["method"] == "Runtime.exceptionThrown"]

    def evaluate(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise BrowserError(f"{expression!r} threw: {res['exceptionDetails']}")
        return res["result"].get("value")

    def click(self, element: str) -> None:
        """A left click (mouse pressed and released, as a person's) at the middle of ``element`` (a
        JavaScript expression that gives the element)."""
        box = self.evaluate(f"(() => {{ const e = {element}; if (!e) return null; "
                            f"e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); "
                            f"return [r.left + r.width / 2, r.top + r.height / 2]; }})()")
        if box is None:
            raise BrowserError(f"no element {element!r}")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def _table(self, heading: str) -> str:
        """The table right after the heading with text ``heading`` (a JavaScript expression)."""
        return (f"[...document.querySelectorAll('h1, h2, h3')].find(h => h.textContent === {json.dumps(heading)})"
                f".nextElementSibling")

    def _index(self, heading: str, col: str) -> int:
        heads = self.evaluate(f"Array.from(({self._table(heading)}).tHead.rows[0].cells, c => c.textContent)")
        return heads.index(col)

    def column(self, heading: str, col: str) -> List[str]:
        """The texts of column ``col`` of the table under ``heading``, top to bottom."""
        i = self._index(heading, col)
        return self.evaluate(f"Array.from(({self._table(heading)}).tBodies[0].rows, r => r.cells[{i}].textContent)")

    def click_header(self, heading: str, col: str) -> None:
        """Click the header of column ``col`` of the table under ``heading``."""
        self.click(f"({self._table(heading)}).tHead.rows[0].cells[{self._index(heading, col)}]")

    def screenshot(self, path: Path) -> Path:
        """The whole page as a PNG."""
        w, h = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        self.evaluate("window.scrollTo(0, 0)")
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": w, "height": h, "scale": 1})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def screenshot_for_people(self, tmp_dir: Path, name: str) -> Path:
        """A screenshot in ``tmp_dir``, copied to $ADVBENCH_SCREENSHOT_DIR when that is set."""
        shot = self.screenshot(tmp_dir / name)
        if os.environ.get("ADVBENCH_SCREENSHOT_DIR"):
            dest = Path(os.environ["ADVBENCH_SCREENSHOT_DIR"])
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(shot, dest / name)
        return shot

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close", session=False)
                except (BrowserError, OSError):
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for fd in (self._out, self._in):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
