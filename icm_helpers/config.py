"""Profiles are DATA: one YAML file per profile in ``icm_helpers/profiles/`` (smoke, demo, paper, ...).

The method's code is the same for every profile; a profile only sets sizes, step counts and the experiment grid
(lambdas, alpha, QF, ...). Notebook parameters may override any key with a dotted path, e.g.
``{"tasks.detection.alpha": 0.25}``.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
REPO_ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load ``profiles/<name>.yaml`` (or a path to a YAML file) and apply dotted-key ``overrides``."""
    path = (
        Path(name)
        if str(name).endswith((".yaml", ".yml"))
        else PROFILES_DIR / f"{safe_name(name, 'profile name')}.yaml"
    )
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(available_profiles())} "
                         f"(or give the path of a profile YAML file)")
    with open(path, "r", encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise ValueError(f"{path} is not a profile (a YAML mapping with at least a 'name')")
    cfg = copy.deepcopy(cfg)
    for key, value in (overrides or {}).items():
        set_dotted(cfg, key, value)
    return cfg


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise KeyError(f"override {key!r}: {part!r} is not a section of the profile{_did_you_mean(part, node)}")
        node = node[part]
    if parts[-1] not in node:
        raise KeyError(f"override {key!r}: no such setting in the profile (typo?){_did_you_mean(parts[-1], node)}")
    node[parts[-1]] = value


def _did_you_mean(word: str, node: dict[str, Any]) -> str:
    close = difflib.get_close_matches(word, [str(k) for k in node], n=3)
    return (
        f"; did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else f"; valid here: {', '.join(map(str, node))}"
    )


def check_device(device: str) -> str:
    """'cpu' or an available 'cuda[:N]'; anything else raises a ValueError saying what to use instead."""
    device = str(device)
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        import torch  # lazy: the runner imports this module, and its --list stays fast without torch

        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA GPU is visible (torch.cuda.is_available() is False); "
                             "use device='cpu'")
        return device
    raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'")


def safe_name(name: str, what: str = "name") -> str:
    """Names used in paths (profiles, runs) must not escape their directory."""
    if not _NAME.match(str(name)):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits, '_' and '-' only")
    return str(name)


def resolve_run_dir(profile_name: str, run_dir: str | os.PathLike | None = None) -> Path:
    """``run_dir`` if given, else ``$ICM_RUNS_DIR/<profile>``, else ``<repo>/runs/<profile>``."""
    if run_dir:
        return Path(run_dir).expanduser().resolve()
    base = Path(os.environ.get("ICM_RUNS_DIR", REPO_ROOT / "runs"))
    return (base / safe_name(profile_name, "profile name")).resolve()


def resolve_data_path(path: str | os.PathLike) -> Path:
    """A dataset path from a profile: absolute as given; relative under ``$ICM_DATA_DIR`` if set, else
    ``<repo>/data``."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return (Path(os.environ.get("ICM_DATA_DIR", REPO_ROOT / "data")) / p).resolve()
