"""Tests for icm_helpers.figures: file layout, contents, name validation and atomic writes."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import icm_helpers  # noqa: E402
import icm_helpers.io  # noqa: E402
from icm_helpers.figures import figures_root, save_figure, save_table  # noqa: E402

PNG_MAGIC, PDF_MAGIC = b"\x89PNG\r\n\x1a\n", b"%PDF-"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _figure(y=(0.3, 0.4, 0.5)):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0.1, 0.2, 0.4], list(y), "o-")
    return fig


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_figures_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("ICM_FIGURES_DIR", str(tmp_path / "elsewhere"))
    assert figures_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("ICM_FIGURES_DIR")
    assert figures_root() == Path(icm_helpers.__file__).resolve().parent.parent / "figures"


def test_save_figure_writes_png_pdf_json(tmp_path):
    data = {"bpp": np.array([0.1, 0.2, 0.4]), "metric": [0.3, 0.4, 0.5], "n": np.int64(3), "name": "baseline"}
    paths = save_figure(_figure(), "rd_detection", data, "smoke", figures_dir=tmp_path)
    out = tmp_path / "smoke"
    assert paths == {fmt: out / f"rd_detection.{fmt}" for fmt in ("png", "pdf", "json")}
    assert _listing(out) == ["rd_detection.json", "rd_detection.pdf", "rd_detection.png"]  # no temp files
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
    assert paths["pdf"].read_bytes().startswith(PDF_MAGIC)
    saved = json.loads(paths["json"].read_text())
    provenance = saved.pop("provenance")
    assert saved == {"bpp": [0.1, 0.2, 0.4], "metric": [0.3, 0.4, 0.5], "n": 3, "name": "baseline"}
    assert provenance["profile"]["name"] == "smoke" and provenance["git"]["commit"] and provenance["versions"]["torch"]


def test_save_figure_uses_figures_root_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("ICM_FIGURES_DIR", str(tmp_path))
    paths = save_figure(_figure(), "fig.v2", [1, 2], "paper")
    assert paths["png"] == tmp_path / "paper" / "fig.v2.png" and paths["png"].exists()


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", "a\\b", "..", ".hidden", "-flag", "with space", "é", None])
def test_bad_names_and_profiles_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="invalid figure name"):
        save_figure(_figure(), bad, {}, "smoke", figures_dir=tmp_path)
    with pytest.raises(ValueError, match="invalid profile"):
        save_figure(_figure(), "ok", {}, bad, figures_dir=tmp_path)
    with pytest.raises(ValueError, match="invalid table name"):
        save_table(bad, ["a"], [[1]], "smoke", figures_dir=tmp_path)
    assert list(tmp_path.rglob("*")) == []


def test_overwrite_replaces_files(tmp_path):
    first = save_figure(_figure(), "curve", {"v": 1}, "p", figures_dir=tmp_path)
    old_png = first["png"].read_bytes()
    second = save_figure(_figure((0.5, 0.1, 0.9)), "curve", {"v": 2}, "p", figures_dir=tmp_path)
    assert second == first
    assert json.loads(second["json"].read_text())["v"] == 2
    assert second["png"].read_bytes() != old_png
    assert _listing(tmp_path / "p") == ["curve.json", "curve.pdf", "curve.png"]


def test_failures_leave_existing_files_intact(tmp_path, monkeypatch):
    paths = save_figure(_figure(), "curve", {"v": 1}, "p", figures_dir=tmp_path)
    before = {k: p.read_bytes() for k, p in paths.items()}

    # non-serialisable data is detected before anything is written
    with pytest.raises(ValueError, match="not JSON serialisable"):
        save_figure(_figure((0.9, 0.8, 0.7)), "curve", {"v": object()}, "p", figures_dir=tmp_path)

    # a crash at the final rename (e.g. disk full / killed) leaves the old complete file, no temp file
    def failing_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(icm_helpers.io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_figure(_figure((0.9, 0.8, 0.7)), "curve", {"v": 2}, "p", figures_dir=tmp_path)
    monkeypatch.undo()

    assert {k: p.read_bytes() for k, p in paths.items()} == before
    assert _listing(tmp_path / "p") == ["curve.json", "curve.pdf", "curve.png"]


def test_save_figure_does_not_close_the_figure(tmp_path):
    fig = _figure()
    save_figure(fig, "still_open", {}, "p", figures_dir=tmp_path)
    assert plt.fignum_exists(fig.number)


def test_save_table_writes_markdown_and_json_only(tmp_path):
    columns = ["method", "BD-rate (%)", "BD-mAP", "note"]
    rows = [
        ["baseline", 0.0, 0.0, None],
        ["aux_enc", -12.3456, np.float32(0.0123), "a|b"],
        ["roi", float("nan"), 1, "x"],
    ]
    paths = save_table("bd_table", columns, rows, "paper", title="BD vs start", figures_dir=tmp_path,
                       float_fmt="{:.3f}")
    out = tmp_path / "paper"
    assert paths == {"md": out / "bd_table.md", "json": out / "bd_table.json"}
    assert _listing(out) == ["bd_table.json", "bd_table.md"]  # a table is text: no picture of it

    saved = json.loads(paths["json"].read_text())
    assert saved["columns"] == columns and saved["title"] == "BD vs start"
    assert saved["provenance"]["profile"]["name"] == "paper"
    assert saved["rows"][:2] == [["baseline", 0.0, 0.0, None], ["aux_enc", -12.3456, pytest.approx(0.0123), "a|b"]]
    assert saved["rows"][2][0] == "roi" and np.isnan(saved["rows"][2][1])

    md = paths["md"].read_text().splitlines()
    assert md[0] == "**BD vs start**"
    assert md[2:] == [
        "| method | BD-rate (%) | BD-mAP | note |",
        "|---|---|---|---|",
        "| baseline | 0.000 | 0.000 | n/a |",
        "| aux_enc | -12.346 | 0.012 | a\\|b |",
        "| roi | n/a | 1 | x |",
    ]


@pytest.mark.parametrize(
    "columns, rows, kwargs, match",
    [
        (["a", "b"], [[1, 2], [3]], {}, "row 1 .* has 1 cells but there are 2 columns"),
        ([], [], {}, "has no columns"),
        (["a"], [[1.5]], {"float_fmt": "{:d}"}, "float_fmt"),
    ],
)
def test_save_table_validation(tmp_path, columns, rows, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_table("t", columns, rows, "p", figures_dir=tmp_path, **kwargs)
    assert list(tmp_path.rglob("*")) == []


def test_save_table_with_no_rows(tmp_path):
    """A table can be empty (e.g. no method has 2 operating points yet): written, not a crash."""
    from icm_helpers.figures import save_table

    paths = save_table("empty", ["task", "BD-rate"], [], "test", title="nothing yet", figures_dir=tmp_path)
    assert json.loads(paths["json"].read_text())["rows"] == [] and paths["md"].is_file()


def test_figure_json_carries_the_experiments_provenance(tmp_path):
    """Given the Experiment, the figure JSON holds its provenance: the commit, the profile's hash and its seed."""
    import subprocess

    from icm_helpers.experiment import Experiment
    from icm_helpers.provenance import profile_sha256

    ex = Experiment("smoke", run_dir=tmp_path / "run", log=None, overrides={"tasks.detection.alpha": 0.25})
    paths = save_figure(_figure(), "curve", [1, 2], ex, figures_dir=tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["data"] == [1, 2] and paths["json"].parent.name == "smoke"
    prov = saved["provenance"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    assert prov["git"]["commit"] == head and prov["seed"] == 0
    assert prov["profile"] == {"name": "smoke", "sha256": profile_sha256(ex.cfg)}

