"""Notebook 12 (the bit-map explorer) and its comparer in a real JupyterLab, driven headlessly by Debian's Chromium.

The test starts JupyterLab (this interpreter, 127.0.0.1, a random free port, a random token) on a temp copy of
notebook 12 whose parameters are injected with papermill (``--prepare-only``: detection only, four images, the
outlines off at first), opens it in Chromium (Selenium with the system chromedriver; no browser is downloaded),
runs all cells, then drives the comparer as a user does: picks run B in its dropdown, turns the outlines on,
drags the zoom sliders' handles, types a cursor position, finds an image by its index and clicks "save this
view". After each step it checks that the picture (the SHA-256 of the PNG behind the <img> and of a screenshot of
it) changed, that the numbers that should change did (bpp of run B, the zoom's bits, the cursor's bpp) and, in
the kernel, that a change of the view alone ran no codec. It also checks that a progress bar
(``icm_helpers.progress``, a cell appended to the copy) renders as tqdm's widget. Screenshots and the timings
(``browser_12_timing.json``) go to ``tests/artifacts/`` (git-ignored) or ``$ICM_BROWSER_ARTIFACTS``.

It needs a trained smoke run (``make smoke``; ``$ICM_BROWSER_RUN_DIR`` to use another run directory of the
smoke profile). It skips, saying why, when Chromium, chromedriver, Selenium, JupyterLab or the run is missing;
with ``ICM_REQUIRE_BROWSER=1`` (CI) it fails instead. Run: ``make browser-test``. Figures the notebook saves go to
a temp dir (``ICM_FIGURES_DIR``), never to ``figures/``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "12_explore_bit_maps.ipynb"
ARTIFACTS = Path(os.environ.get("ICM_BROWSER_ARTIFACTS") or Path(__file__).resolve().parent / "artifacts")
CHROMIUM = os.environ.get("ICM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("ICM_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
REQUIRE = os.environ.get("ICM_REQUIRE_BROWSER", "") not in ("", "0")
TASK = "detection"


def _unavailable(reason: str):
    if REQUIRE:
        pytest.fail(f"{reason} (ICM_REQUIRE_BROWSER=1 makes this an error)")
    pytest.skip(reason)


def _run_dir() -> Path:
    return Path(os.environ.get("ICM_BROWSER_RUN_DIR", REPO / "runs" / "smoke")).resolve()


def _check_prerequisites() -> float:
    """Skip (or fail with ICM_REQUIRE_BROWSER=1) when something is missing; return the lambda to use."""
    for path, what in ((CHROMIUM, "Chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            _unavailable(f"{what} not found at {path}: apt-get install -y chromium chromium-driver (Debian)")
    for module, pip in (("selenium", "selenium"), ("jupyterlab", "jupyterlab"), ("ipywidgets", "ipywidgets"),
                        ("papermill", "papermill")):
        if importlib.util.find_spec(module) is None:
            _unavailable(f"{module} is not installed for {sys.executable}: pip install {pip} (extras [notebooks,dev])")
    from icm_helpers.config import load_profile

    lam = float(load_profile("smoke")["tasks"][TASK]["ablation_lambda"])
    run = _run_dir()
    needed = [
        run / "data" / "test" / "instances.json",
        run / "models" / "codec_start.pt",
        run / "models" / f"recognizer_{TASK}.pt",
        run / "icm" / TASK / f"baseline_lambda{lam:g}" / "codec.pt",
        run / "icm" / TASK / f"aux_enc_lambda{lam:g}" / "codec.pt",
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        _unavailable(f"no trained smoke run at {run} (missing {', '.join(missing)}): run `make smoke` first")
    return lam


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_notebook(dst_dir: Path, lam: float) -> Path:
    """A copy of notebook 12 with small parameters injected (papermill's prepare-only: nothing executed); the first
    view compares w/o aux and aux-enc at ``lam`` with the outlines off."""
    import papermill

    out = dst_dir / NOTEBOOK.name
    first = {"run_a": f"baseline_lambda{lam:g}", "run_b": f"aux_enc_lambda{lam:g}", "outlines": False}
    params = {"profile": "smoke", "run_dir": str(_run_dir()), "task": TASK, "max_images": 4, "device": "cpu",
              "first_view": first}
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=params, prepare_only=True, kernel_name="python3",
                               progress_bar=False, log_output=False)
    nb = json.loads(out.read_text())
    nb["cells"].append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                        "source": PROGRESS_CELL.splitlines(keepends=True)})
    out.write_text(json.dumps(nb))
    return out


# appended to the copy: in JupyterLab (ICM_PROGRESS unset) a progress bar is tqdm's widget
PROGRESS_CELL = """from icm_helpers.progress import progress
for _ in progress(range(3), desc="progress check", unit="image"):
    pass"""

JS_PROGRESS = """
const nb = window.jupyterapp.shell.currentWidget.content;
const cell = nb.widgets[nb.widgets.length - 1];
const widget = cell.model.outputs.toJSON().some(o => o.data && o.data['application/vnd.jupyter.widget-view+json']);
cell.node.scrollIntoView({block: 'center'});
return [widget, !!cell.node.querySelector('.widget-hprogress, progress'), cell.node.innerText];"""


def _lab_settings(settings_dir: Path) -> None:
    """Render every cell (no windowing) and no news / update pop-ups."""
    files = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false",
            "checkForUpdates": False,
        },
    }
    for rel, value in files.items():
        (settings_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings_dir / rel).write_text(json.dumps(value))


def _start_lab(root: Path, work: Path, port: int, token: str) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ)
    for key in (
        "JUPYTER_CONFIG_DIR",
        "JUPYTER_RUNTIME_DIR",
        "JUPYTERLAB_SETTINGS_DIR",
        "JUPYTERLAB_WORKSPACES_DIR",
        "ICM_FIGURES_DIR",
    ):
        (work / key.lower()).mkdir(parents=True, exist_ok=True)
        env[key] = str(work / key.lower())
    _lab_settings(work / "jupyterlab_settings_dir")
    env.pop("ICM_PROGRESS", None)  # as a user's JupyterLab: tqdm.auto picks the widget bar
    env.update(
        ICM_NO_NETWORK="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    log = work / "jupyterlab.log"
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        "--ServerApp.terminals_enabled=False",
        "--LabApp.news_url=None",
        "--LabApp.extension_manager=readonly",
    ] + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    return proc, log
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    pytest.fail(f"JupyterLab did not answer on 127.0.0.1:{port} within 90 s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started and its kernels (its own process group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # kernels left behind, if any
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


def _browser(profile_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1500",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile_dir}",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _wait(fn, timeout: float, what: str, driver=None, interval: float = 0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = fn()
        except Exception as exc:  # the page may still be loading
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    if driver is not None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "browser_12_failure.png"))
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r}; "
                f"screenshot {ARTIFACTS / 'browser_12_failure.png'})")


JS_KERNEL_STATUS = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
return k ? k.status : null;"""

# started without waiting: a WebDriver call blocks at most ~120 s (Selenium's HTTP timeout), run-all can take longer
JS_RUN_ALL = """
window.__icmRunAll = 'running';
window.jupyterapp.commands.execute('notebook:run-all-cells').then(r => { window.__icmRunAll = 'ok ' + r; },
                                                                  e => { window.__icmRunAll = 'ERR ' + e; });
return true;"""

JS_ERRORS = """
const nb = window.jupyterapp.shell.currentWidget.content;
const errors = [];
nb.widgets.forEach((cell, i) => {
  if (cell.model.type !== 'code') return;
  for (const o of cell.model.outputs.toJSON())
    if (o.output_type === 'error') errors.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
});
return errors;"""

JS_KERNEL_EXEC = """
const done = arguments[arguments.length - 1];
const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
let out = '';
const f = k.requestExecute({code: arguments[0], silent: false, store_history: false});
f.onIOPub = msg => {
  if (msg.header.msg_type === 'stream') out += msg.content.text;
  if (msg.header.msg_type === 'error') out += 'ERR ' + msg.content.ename + ': ' + msg.content.evalue;
};
f.done.then(() => done(out), e => done('ERR ' + e));"""

JS_PNG_SHA = """
const done = arguments[arguments.length - 1];
const img = document.querySelector('img.icm-bitmap-png');
if (!img || !img.src) { done(null); return; }
fetch(img.src).then(r => r.arrayBuffer()).then(b => crypto.subtle.digest('SHA-256', b))
  .then(h => done(Array.from(new Uint8Array(h)).map(x => x.toString(16).padStart(2, '0')).join('')
                 + ':' + img.naturalWidth),
        e => done('ERR ' + e));"""


JS_STATE = "print(comparer.state(), comparer.explorer.codec_passes)"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PageComparer:
    """The comparer in the page: its picture, its numbers, screenshots and the kernel's view of it."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By
        self.timings: dict[str, float] = {}

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def picture(self) -> str:
        """SHA-256 of the PNG behind the comparer's <img> (and its width)."""
        sha = self.driver.execute_async_script(JS_PNG_SHA)
        assert sha and not sha.startswith("ERR"), sha
        return sha

    def pixels(self) -> str:
        """SHA-256 of a screenshot of the comparer's picture as the browser draws it."""
        return _sha(self.find("img.icm-bitmap-png").screenshot_as_png)

    def numbers(self) -> dict[str, list[str]]:
        cells = {k: [e.text for e in self.driver.find_elements(self.by.CSS_SELECTOR, f".icm-bitmap-info td.icm-{k}")]
                 for k in ("bpp", "region-bits", "region-inside", "cursor", "recognizer")}
        return {**cells, "diff": [e.text for e in self.driver.find_elements(self.by.CSS_SELECTOR, ".icm-bitmap-diff")]}

    def kernel(self, code: str = JS_STATE) -> str:
        out = self.driver.execute_async_script(JS_KERNEL_EXEC, code)
        assert "ERR" not in out, out
        return out.strip()

    def codec_passes(self) -> int:
        return int(self.kernel("print(comparer.explorer.codec_passes)"))

    def step(self, name: str, act, changed: tuple[str, ...], same: tuple[str, ...] = ()) -> dict[str, list[str]]:
        """Do ``act``; wait until the picture and the ``changed`` numbers differ from before; check the ``same``
        numbers did not; time it and save a screenshot of the comparer as ``browser_12_<name>.png``."""
        before, numbers, pixels = self.picture(), self.numbers(), self.pixels()
        t0 = time.time()
        act()
        _wait(lambda: self.picture() != before, 90, f"the picture to change ({name})", self.driver)
        _wait(lambda: all(self.numbers()[k] != numbers[k] for k in changed), 60, f"{changed} to change ({name})",
              self.driver)
        self.timings[f"{name}_s"] = time.time() - t0
        after = self.numbers()
        assert all(after[k] == numbers[k] for k in same), f"{name}: {same} changed: {numbers} -> {after}"
        assert self.pixels() != pixels, f"{name}: the drawn picture did not change"
        self.screenshot(name)
        return after

    def screenshot(self, name: str) -> Path:
        box = self.find(".icm-bitmap-comparer")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", box)
        time.sleep(0.5)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"browser_12_{name}.png"
        path.write_bytes(box.screenshot_as_png)
        assert path.stat().st_size > 10_000
        return path


def _drag(driver, handle, dx: int) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).click_and_hold(handle).move_by_offset(dx, 0).release().perform()


def _type_into(driver, element, text: str) -> None:
    """Replace the text of an input or an editable slider readout, then press Enter (what a user types)."""
    from selenium.webdriver.common.keys import Keys

    element.click()
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(text + Keys.ENTER)


def _open_and_run(driver, port: int, token: str, nb: Path, timings: dict[str, float]) -> None:
    t0 = time.time()
    driver.get(f"http://127.0.0.1:{port}/lab/tree/{nb.name}?token={token}")
    _wait(lambda: driver.execute_script(JS_KERNEL_STATUS) == "idle", 300, "the notebook's kernel to be idle", driver)
    timings["page_and_kernel_s"] = time.time() - t0
    t_run = time.time()
    driver.execute_script(JS_RUN_ALL)
    result = _wait(lambda: (lambda r: r if r != "running" else None)(driver.execute_script(
        "return window.__icmRunAll;")), 900, "all cells to run", driver, interval=2)
    assert result.startswith("ok"), f"run-all-cells failed: {result}"
    _wait(lambda: driver.execute_script(JS_KERNEL_STATUS) == "idle", 600, "the kernel to finish", driver)
    timings["run_all_cells_s"] = time.time() - t_run
    assert driver.execute_script(JS_ERRORS) == [], "a cell of notebook 12 raised in the browser"


def _drive_comparer(page: PageComparer, figures: Path) -> None:
    """Pick run B, outlines on, zoom, cursor, find an image, save: each changes the picture and its numbers."""
    from selenium.webdriver.support.ui import Select

    _wait(lambda: len(page.numbers()["bpp"]) == 2, 120, "the comparer's table", page.driver)
    first = page.numbers()
    assert all(first["recognizer"]) and page.codec_passes() == 2, first
    page.screenshot("start")

    def pick_run_b():
        Select(page.find(".icm-bitmap-run-b select")).select_by_visible_text("start codec")

    after = page.step("pick_runs", pick_run_b, changed=("diff",))
    assert after["bpp"][0] == first["bpp"][0] and after["bpp"][1] != first["bpp"][1]
    assert "run_b='start'" in page.kernel() and page.codec_passes() == 3

    page.step("outlines", lambda: page.find(".icm-bitmap-outlines input").click(), changed=(),
              same=("bpp", "region-bits", "cursor"))
    assert "outlines=True" in page.kernel()

    width = page.find(".icm-bitmap-zoom-x .noUi-target").size["width"]  # the slider's track, 0..64 pixels
    page.step("zoom_x", lambda: _drag(page.driver, page.find(".icm-bitmap-zoom-x .noUi-handle-lower"), width // 2),
              changed=("region-bits",), same=("bpp", "cursor"))
    page.step("zoom", lambda: _drag(page.driver, page.find(".icm-bitmap-zoom-y .noUi-handle-lower"), width // 4),
              changed=("region-bits",), same=("bpp", "cursor"))
    region = page.kernel("print(comparer.state().region)").strip("()").split(", ")
    assert 20 < int(region[0]) < 44 and region[1] == "64" and 8 < int(region[2]) < 24 and region[3] == "64", region
    assert page.codec_passes() == 3

    page.step("cursor", lambda: _type_into(page.driver, page.find(".icm-bitmap-cursor-x .widget-readout"), "48"),
              changed=("cursor",), same=("bpp", "region-bits"))
    assert "cursor=(48, " in page.kernel() and page.codec_passes() == 3

    page.step("find_image", lambda: _type_into(page.driver, page.find(".icm-bitmap-search input"), "#2"),
              changed=("bpp",))
    assert "image=2" in page.kernel() and page.codec_passes() == 5

    page.find("button.icm-bitmap-save").click()
    _wait(lambda: page.driver.find_elements(page.by.CSS_SELECTOR, ".icm-bitmap-status .icm-saved"), 60,
          "the saved view's paths", page.driver)
    page.screenshot("saved")
    saved = sorted((figures / "smoke").glob("bit_map_view_detection_*"))
    assert [p.suffix for p in saved] == [".json", ".pdf", ".png"], saved
    data = json.loads(saved[0].read_text())
    state = data["state"]
    assert state["run_b"] == "start" and state["outlines"] and state["image"] == 2 and state["cursor"][0] == 48
    assert state["region"][:2] == data["region"][:2] and data["region"] != [0, 64, 0, 64]
    assert f"{data['panels'][0]['region_bits']:.1f}" == page.numbers()["region-bits"][0]


def test_notebook12_comparer_in_jupyterlab(tmp_path):
    lam = _check_prerequisites()
    t0 = time.time()
    timings: dict[str, float] = {}
    root = tmp_path / "lab"
    root.mkdir()
    nb = _prepare_notebook(root, lam)
    port, token = _free_port(), secrets.token_hex(16)
    proc, log = _start_lab(root, tmp_path / "jupyter", port, token)
    timings["server_start_s"] = time.time() - t0
    driver = None
    try:
        driver = _browser(tmp_path / "chrome-profile")
        driver.set_script_timeout(600)
        _open_and_run(driver, port, token, nb, timings)
        page = PageComparer(driver)
        _drive_comparer(page, tmp_path / "jupyter" / "icm_figures_dir")
        timings.update(page.timings)
        widget, bar, text = _wait(lambda: (lambda r: r if r[0] and r[1] and "3/3" in r[2] else None)(
            driver.execute_script(JS_PROGRESS)), 60, "the progress cell's widget bar", driver)
        text = text.replace("\u2007", " ")  # tqdm's widget pads with figure spaces
        assert "progress check: 100%" in text and "3/3" in text, text
        time.sleep(0.5)
        driver.save_screenshot(str(ARTIFACTS / "browser_progress.png"))
    finally:
        if driver is not None:
            driver.quit()
        _stop(proc)
    timings["total_s"] = time.time() - t0
    (ARTIFACTS / "browser_12_timing.json").write_text(
        json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2) + "\n")
    print("\nbrowser test timings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items())
          + f"; screenshots in {ARTIFACTS}")
