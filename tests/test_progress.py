"""Progress bars (``icm_helpers.progress``): the form follows ``ICM_PROGRESS`` and a bar never changes a result."""
import pytest

from icm_helpers.progress import LOG_INTERVAL_S, progress, progress_mode


def test_an_unknown_mode_is_named_with_the_valid_ones(monkeypatch):
    monkeypatch.setenv("ICM_PROGRESS", "loud")
    with pytest.raises(ValueError, match=r"ICM_PROGRESS='loud'; valid: auto, log, off"):
        progress_mode()


def test_off_prints_nothing_and_yields_everything(monkeypatch, capsys):
    monkeypatch.setenv("ICM_PROGRESS", "off")
    assert list(progress(range(5), desc="train")) == [0, 1, 2, 3, 4]
    bar = progress(total=3, desc="manual")
    bar.update(3)
    bar.close()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_log_mode_writes_plain_lines_to_stdout_for_papermill_logs(monkeypatch, capsys):
    """The runner's kernels (``ICM_PROGRESS=log``): ASCII lines on stdout (papermill copies stdout into its log, and
    a notebook's stderr bars would be widget-less noise there), throttled to one per ``LOG_INTERVAL_S``: 1000 items
    produce the first line and the final one, not one line per item."""
    monkeypatch.setenv("ICM_PROGRESS", "log")
    assert sum(progress(range(1000), desc="evaluate", unit="image")) == sum(range(1000))
    out = capsys.readouterr()
    assert out.err == ""
    lines = [ln for ln in out.out.replace("\r", "\n").splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, lines
    assert lines[-1].startswith("evaluate: 100%") and "1000/1000" in lines[-1] and "image" in lines[-1]
    assert all(ln.isascii() for ln in lines)
    assert LOG_INTERVAL_S >= 10  # a 10-minute notebook: tens of lines, not thousands


def test_auto_mode_is_tqdm_auto(monkeypatch):
    """Unset / auto: ``tqdm.auto`` (the widget bar in JupyterLab, a text bar in a terminal)."""
    from tqdm.auto import tqdm as auto_tqdm

    monkeypatch.delenv("ICM_PROGRESS", raising=False)
    bar = progress(total=2, desc="x")
    try:
        assert isinstance(bar, auto_tqdm)
    finally:
        bar.close()
