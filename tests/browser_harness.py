"""The real ComfyUI frontend in headless Chromium, for browser tests (tests/test_comfyui_browser.py and others).

Chromium comes from Debian (`apt-get install chromium`, done by `scripts/bootstrap.sh --test`), driven by
playwright from PyPI through `executable_path`; playwright's own browser download is never used. The
server is the session's `server` fixture (tests/conftest.py), which serves the frontend its ComfyUI version
ships, with this pack copied into custom_nodes as a user's clone sits there.

Its fixtures `browser` and `comfy_page` are registered in tests/conftest.py:

    def test_something(comfy_page):  # a fresh page per test; open_comfy_page() for one shared by several
        comfy_page.load_api_workflow(prompt)
        comfy_page.queue_and_wait()
        assert not comfy_page.pack_problems()

Where Chromium or playwright is missing the browser tests are skipped, except under CI=true, where they fail:
CI must not pass without having run them.
"""

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# As root in a sandbox without a network: no sandboxing, no GPU, and none of Chromium's own connections.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1000}
PACK_URL_PART = "/extensions/ComfyUI-DisTorch/"
ARTIFACTS = Path(os.environ.get("DISTORCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@dataclass(frozen=True)
class ConsoleEntry:
    kind: str  # console type ("error", "warning", ...) or "pageerror"
    text: str
    url: str  # the script or resource the message comes from, when known

    def from_pack(self) -> bool:
        return PACK_URL_PART in self.url or PACK_URL_PART in self.text or "distorch" in self.text.lower()


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements-test.txt)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; scripts/bootstrap.sh --test does it)"
    return None


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser test cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)


class ComfyPage:
    """One page of the ComfyUI frontend, with its console and websocket messages recorded."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.console: list[ConsoleEntry] = []
        self.messages: list[dict] = []  # websocket messages from the server ({"type", "data"})
        self._loads = 0  # workflows loaded so far, for unique file names
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.console.append(ConsoleEntry("pageerror", str(error), "")))
        page.on("requestfailed", lambda request: self.console.append(
            ConsoleEntry("requestfailed", request.failure or "", request.url)))
        page.on("response", self._on_response)
        page.on("websocket", self._on_websocket)

    def _on_console(self, message) -> None:
        location = message.location or {}
        self.console.append(ConsoleEntry(message.type, message.text, location.get("url", "")))

    def _on_response(self, response) -> None:
        if response.status >= 400:
            self.console.append(ConsoleEntry("http", f"{response.status} {response.url}", response.url))

    def _on_websocket(self, socket) -> None:
        def record(payload):
            if isinstance(payload, str):
                try:
                    self.messages.append(json.loads(payload))
                except ValueError:
                    pass

        socket.on("framereceived", record)

    # -- the app ----------------------------------------------------------------------------------

    def open(self, timeout_s: float = 120) -> "ComfyPage":
        """Loads the frontend and waits until it has registered every extension and node definition."""
        self.page.goto(self.server.url, timeout=timeout_s * 1000)
        # Polls app.canvas.graph, not app.graph: newer frontends log an error when app.graph is read before setup.
        self.page.wait_for_function("() => window.LiteGraph?.registered_node_types?.DisTorchUNetLoader && "
                                    "window.app?.canvas?.graph", timeout=timeout_s * 1000)
        self.page.wait_for_timeout(500)  # extensions' setup() runs right after the node types register
        self.close_dialogs()
        return self

    def close_dialogs(self) -> None:
        """Closes what a first start shows over the canvas (templates, what's new)."""
        for _ in range(3):
            self.page.keyboard.press("Escape")
        self.page.evaluate("() => document.querySelectorAll('.p-dialog-mask').forEach((m) => m.remove())")

    def load_api_workflow(self, prompt: dict, name: str = "distorch_test_api") -> None:
        """Loads an API-format workflow as dropping the file on the page does (the frontend's `handleFile`).

        Each load gets a file name of its own: some frontends ask before replacing an open workflow of the same
        name, and that question would never be answered here.
        """
        self._loads += 1
        self.page.evaluate(
            """([text, name]) => {
                window.app.graph.clear();
                const file = new File([text], name, { type: "application/json" });
                window.app.handleFile(file);
            }""", [json.dumps(prompt), f"{name}_{self._loads}.json"])
        self.page.wait_for_function("(n) => window.app.graph.nodes.length >= n", arg=len(prompt))
        self.page.wait_for_timeout(300)

    def queue_and_wait(self, timeout_s: float = 300) -> dict:
        """Queues the loaded workflow with the frontend's own Queue command and waits for the run to end;
        returns the history entry."""
        before = {m["data"].get("prompt_id") for m in self.messages if m.get("type") == "execution_start"}
        self.page.evaluate("() => window.app.queuePrompt(0, 1)")
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            ended = [m for m in self.messages if m.get("type") in ("execution_success", "execution_error",
                                                                    "execution_interrupted")
                     and m["data"].get("prompt_id") not in before]
            if ended:
                self.page.wait_for_timeout(500)  # let the frontend handle the last `executed` messages
                prompt_id = ended[-1]["data"]["prompt_id"]
                return self.server.get(f"/history/{prompt_id}").get(prompt_id, {})
            errors = self.page.evaluate("() => window.app.lastNodeErrors")
            if errors:
                return {"node_errors": errors}
            self.page.wait_for_timeout(200)
        raise TimeoutError(f"the queued workflow did not finish in {timeout_s}s")

    def queue_expecting_node_errors(self, timeout_s: float = 60) -> dict:
        """Queues and returns the validation errors the frontend received (`app.lastNodeErrors`)."""
        self.page.evaluate("() => window.app.queuePrompt(0, 1).catch(() => null)")
        self.page.wait_for_function("() => window.app.lastNodeErrors && "
                                    "Object.keys(window.app.lastNodeErrors).length > 0", timeout=timeout_s * 1000)
        return self.page.evaluate("() => window.app.lastNodeErrors")

    # -- nodes ------------------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        """Every node on the canvas: id, type, title, position, size and its widgets' names and values."""
        return self.page.evaluate("""() => window.app.graph.nodes.map((n) => ({
            id: String(n.id), type: n.type, title: n.title, pos: [n.pos[0], n.pos[1]],
            size: [n.size[0], n.size[1]],
            widgets: (n.widgets || []).map((w) => ({ name: w.name, type: w.type,
                value: typeof w.value === "string" || typeof w.value === "number" ? w.value : null })),
        }))""")

    def set_widget(self, node_id: str, name: str, value) -> None:
        self.page.evaluate("""([id, name, value]) => {
            const node = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
            node.widgets.find((w) => w.name === name).value = value;
        }""", [node_id, name, value])

    def node_screen_box(self, node_id: str, margin: float = 12) -> dict:
        """The node's rectangle on screen (title bar included), for a screenshot clip."""
        return self.page.evaluate("""([id, margin]) => {
            const app = window.app;
            const node = app.graph.getNodeById(Number(id)) ?? app.graph.getNodeById(id);
            const rect = app.canvas.canvas.getBoundingClientRect();
            const { scale, offset } = app.canvas.ds;
            const title = window.LiteGraph.NODE_TITLE_HEIGHT;
            return { x: rect.left + (node.pos[0] + offset[0]) * scale - margin,
                     y: rect.top + (node.pos[1] - title + offset[1]) * scale - margin,
                     width: node.size[0] * scale + 2 * margin, height: (node.size[1] + title) * scale + 2 * margin };
        }""", [node_id, margin])

    def place_in_columns(self, columns: list[list[str]], gap: float = 40) -> None:
        """Lays nodes out left to right, each column top to bottom (the frontend stacks an API workflow in
        one tall column, too small to read once zoomed to fit)."""
        self.page.evaluate("""([columns, gap]) => {
            const graph = window.app.graph;
            const title = window.LiteGraph.NODE_TITLE_HEIGHT;
            let x = 0;
            for (const column of columns) {
                const nodes = column.map((id) => graph.getNodeById(Number(id)) ?? graph.getNodeById(id));
                let y = title;
                for (const node of nodes) {
                    node.pos = [x, y];
                    y += node.size[1] + title + gap;
                }
                x += Math.max(...nodes.map((n) => n.size[0])) + gap;
            }
            window.app.canvas.setDirty(true, true);
        }""", [columns, gap])

    def fit_view(self) -> None:
        """Zooms the canvas so every node is visible (as the 'fit view' command does)."""
        self.page.evaluate("""() => {
            const canvas = window.app.canvas;
            const nodes = window.app.graph.nodes;
            const title = window.LiteGraph.NODE_TITLE_HEIGHT;
            const left = Math.min(...nodes.map((n) => n.pos[0])), top = Math.min(...nodes.map((n) => n.pos[1] - title));
            const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
            const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
            const rect = canvas.canvas.getBoundingClientRect();
            const scale = Math.min(1, 0.92 * rect.width / (right - left), 0.88 * rect.height / (bottom - top));
            canvas.ds.scale = scale;
            canvas.ds.offset = [(rect.width / scale - (right - left)) / 2 - left,
                                (rect.height / scale - (bottom - top)) / 2 - top];
            canvas.setDirty(true, true);
        }""")
        self.page.wait_for_timeout(300)

    # -- what went wrong --------------------------------------------------------------------------

    def pack_problems(self) -> list[ConsoleEntry]:
        """Console errors and warnings, page errors and failed requests that come from this pack."""
        bad = {"error", "warning", "pageerror", "requestfailed", "http"}
        return [entry for entry in self.console if entry.kind in bad and entry.from_pack()]

    def screenshot(self, name: str, clip: dict | None = None) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), clip=clip)
        return path


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by playwright; skipped (failed under CI=true) where either is missing."""
    reason = browser_unavailable()
    if reason:
        skip_or_fail(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


# The user settings a returning user has: no first-run templates dialog over the canvas, no minimap in screenshots.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def seed_settings(server) -> None:
    path = server.base / "user" / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**current, **SETTINGS}))


@contextlib.contextmanager
def open_comfy_page(browser, server):
    """A fresh page of the server's frontend (a new browser context: no storage carried over)."""
    if not server.serves_frontend:
        skip_or_fail(f"ComfyUI {server.install.version} has no comfyui_frontend_package in its venv")
    seed_settings(server)
    context = browser.new_context(viewport=VIEWPORT)
    try:
        yield ComfyPage(context.new_page(), server).open()
    finally:
        context.close()


@pytest.fixture
def comfy_page(browser, server):
    """A fresh page of the server's frontend for one test (see `open_comfy_page` for a longer-lived one)."""
    with open_comfy_page(browser, server) as page:
        yield page

