"""Notebook 06 and its bit-map comparer widget in a real JupyterLab, driven headlessly by Debian's Chromium.

The test starts JupyterLab (this interpreter, 127.0.0.1, a random free port, a random token) on a temp copy of
notebook 06 whose parameters are injected with papermill (``--prepare-only``: detection only, one figure image,
a few images for the table and the widget, so it is fast), opens it in Chromium (Selenium with the system
chromedriver; no browser is downloaded), runs all cells, changes the widget's image, checks that the picture
(the PNG bytes behind the <img>) and the bpp numbers changed and that a view-only change (the hyper-latent
checkbox) did not run a codec in the kernel, that a progress bar (``icm_helpers.progress``, a cell appended to the
copy) renders as tqdm's widget, and saves screenshots to ``tests/artifacts/browser_06.png`` and
``browser_progress.png`` (git-ignored) plus the timings to ``tests/artifacts/browser_06_timing.json``.

It needs a trained smoke run (``make smoke``; ``$ICM_BROWSER_RUN_DIR`` to use another run directory of the
smoke profile). It skips, saying why, when Chromium, chromedriver, Selenium, JupyterLab or the run is missing;
with ``ICM_REQUIRE_BROWSER=1`` (CI) it fails instead. Run: ``make browser-test``. Figures the notebook saves go to
a temp dir (``ICM_FIGURES_DIR``), never to ``figures/``.
"""
from __future__ import annotations

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
NOTEBOOK = REPO / "notebooks" / "06_bit_allocation_maps.ipynb"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
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
    """A copy of notebook 06 with small parameters injected (papermill's prepare-only: nothing executed)."""
    import papermill

    out = dst_dir / NOTEBOOK.name
    params = {"profile": "smoke", "run_dir": str(_run_dir()), "task": TASK, "lambdas": [lam], "map_lambda": lam,
              "n_images": 1, "roi_max_images": 4, "widget_images": 4, "include_hyper": False, "device": "cpu"}
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
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "browser_06_failure.png"))
    pytest.fail(
        f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r}; "
        "screenshot tests/artifacts/browser_06_failure.png)"
    )


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


def _bpp_texts(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".icm-bitmap-info td.icm-bpp")]


def test_notebook06_widget_in_jupyterlab(tmp_path):
    lam = _check_prerequisites()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

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
        driver.get(f"http://127.0.0.1:{port}/lab/tree/{nb.name}?token={token}")
        _wait(
            lambda: driver.execute_script(JS_KERNEL_STATUS) == "idle", 300, "the notebook's kernel to be idle", driver
        )
        timings["page_and_kernel_s"] = time.time() - t0 - timings["server_start_s"]

        t_run = time.time()
        driver.execute_script(JS_RUN_ALL)
        result = _wait(
            lambda: (lambda r: r if r != "running" else None)(driver.execute_script("return window.__icmRunAll;")),
            900,
            "all cells to run",
            driver,
            interval=2,
        )
        assert result.startswith("ok"), f"run-all-cells failed: {result}"
        _wait(lambda: driver.execute_script(JS_KERNEL_STATUS) == "idle", 600, "the kernel to finish", driver)
        timings["run_all_cells_s"] = time.time() - t_run
        assert driver.execute_script(JS_ERRORS) == [], "a cell of notebook 06 raised in the browser"

        # the comparer rendered: picture + bpp table
        _wait(lambda: driver.execute_async_script(JS_PNG_SHA), 60, "the widget's picture", driver)
        _wait(lambda: len(_bpp_texts(driver)) == 2, 60, "the widget's bpp table", driver)
        comparer = driver.find_element(By.CSS_SELECTOR, ".icm-bitmap-comparer")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", comparer)
        png_before, bpp_before = driver.execute_async_script(JS_PNG_SHA), _bpp_texts(driver)
        assert not png_before.startswith("ERR"), png_before
        passes = driver.execute_async_script(JS_KERNEL_EXEC, "print(comparer.explorer.codec_passes)")
        assert passes.strip() == "2", f"expected 2 codec passes (run A, run B on image 0), got {passes!r}"

        # interact: another image -> new maps, new picture, new bpp
        t_click = time.time()
        select = Select(driver.find_element(By.CSS_SELECTOR, ".icm-bitmap-image select"))
        assert len(select.options) >= 2, "the image dropdown offers fewer than 2 images"
        select.select_by_index(1)
        _wait(
            lambda: _bpp_texts(driver) != bpp_before and len(_bpp_texts(driver)) == 2,
            60,
            "the bpp numbers to change",
            driver,
        )
        png_after = _wait(
            lambda: (lambda s: s if s and s != png_before else None)(driver.execute_async_script(JS_PNG_SHA)),
            60,
            "the picture to change",
            driver,
        )
        timings["image_change_to_new_picture_s"] = time.time() - t_click
        bpp_after = _bpp_texts(driver)
        assert png_after != png_before and bpp_after != bpp_before
        state = driver.execute_async_script(
            JS_KERNEL_EXEC, "print(comparer.state()['image'], comparer.explorer.codec_passes)"
        )
        assert state.split() == ["1", "4"], f"kernel state after the image change: {state!r}"

        # a view-only change (hyper-latent bits on): numbers change, the codec does not run again
        driver.find_element(By.CSS_SELECTOR, ".icm-bitmap-hyper input").click()
        _wait(lambda: _bpp_texts(driver) != bpp_after, 60, "the bpp numbers with the hyper-latent", driver)
        passes = driver.execute_async_script(
            JS_KERNEL_EXEC, "print(comparer.state()['include_hyper'], comparer.explorer.codec_passes)"
        )
        assert passes.split() == ["True", "4"], f"a view change ran a codec: {passes!r}"

        ARTIFACTS.mkdir(exist_ok=True)
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", comparer)
        time.sleep(0.5)
        shot = ARTIFACTS / "browser_06.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        widget, bar, text = _wait(lambda: (lambda r: r if r[0] and r[1] and "3/3" in r[2] else None)(
            driver.execute_script(JS_PROGRESS)), 60, "the progress cell's widget bar", driver)
        text = text.replace("\u2007", " ")  # tqdm's widget pads with figure spaces
        assert "progress check: 100%" in text and "3/3" in text, text
        time.sleep(0.5)
        driver.save_screenshot(str(ARTIFACTS / "browser_progress.png"))

        figures = sorted(p.name for p in (tmp_path / "jupyter" / "icm_figures_dir" / "smoke").iterdir())
        assert f"bit_allocation_{TASK}.png" in figures and f"bit_fractions_{TASK}.md" in figures, figures
    finally:
        if driver is not None:
            driver.quit()
        _stop(proc)
    timings["total_s"] = time.time() - t0
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "browser_06_timing.json").write_text(
        json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2) + "\n"
    )
    print("\nbrowser test timings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()) + f"; screenshot {shot}")
