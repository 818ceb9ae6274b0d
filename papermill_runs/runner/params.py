"""The parameters injected into every notebook: the profile (a name or a profile file), its params file, the
``--param`` overrides and the ``--set`` dotted profile settings; values are YAML (safe loader), never eval'ed."""
from __future__ import annotations

import json
import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from icm_helpers.config import _NAME, available_profiles, load_profile

from .common import RunnerError, rel, sha256_text


class _ParamLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (plain YAML 1.1 reads it as a string)."""


_ParamLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml_value(text: str) -> Any:
    """Parse one ``--param`` value as YAML (safe loader): ``3`` -> int, ``1e-3`` -> float, ``[1, 2]``
    -> list, ``true`` -> bool, ``null`` or nothing -> None, anything else -> str."""
    return yaml.load(text, Loader=_ParamLoader)  # noqa: S506 -- a SafeLoader subclass


# ----------------------------------------------------------------------------------------------- profile names
def _is_safe_name(value: Any) -> bool:
    """A str that follows ``icm_helpers.config``'s rule for names used in paths (``safe_name``)."""
    return isinstance(value, str) and _NAME.match(value) is not None


def validate_profile_name(profile: str) -> str:
    if not _is_safe_name(profile):
        raise RunnerError(
            f"invalid profile name {profile!r}: use letters, digits, '_' and '-' only "
            "(the name becomes a file name and a directory under the out dir)"
        )
    return profile


def params_profiles(params_dir: Path) -> list[str]:
    """The profiles that have a params file ``<params_dir>/<name>.yaml`` (``icm_helpers.config.available_profiles``
    lists the profile definitions themselves, in ``icm_helpers/profiles/``)."""
    if not Path(params_dir).is_dir():
        return []
    return sorted(p.stem for p in Path(params_dir).glob("*.yaml") if p.is_file() and _is_safe_name(p.stem))


def is_profile_file(profile: str) -> bool:
    """``--profile`` names a YAML file (``my.yaml``, ``path/to/study.yml``) rather than a packaged profile."""
    return str(profile).endswith((".yaml", ".yml"))


@dataclass
class ProfileChoice:
    """What ``--profile`` resolved to: the ``name`` (out-dir folder, figures/<name>/, runs/<name>/), the value the
    notebooks get as their ``profile`` parameter (a name, or the absolute path of a profile file) and the
    notebook parameter file (``None``: the notebooks' defaults)."""

    name: str
    notebook_value: str
    params_file: Optional[Path]

    @property
    def packaged(self) -> bool:
        """A profile name, not a profile file: the notebooks get the name itself."""
        return self.notebook_value == self.name


def resolve_profile(profile: str, params_dir: Path) -> ProfileChoice:
    """A packaged profile NAME (params from ``<params_dir>/<name>.yaml``) or a profile FILE: its ``name:`` key names
    the outputs, and the notebook parameters come from ``<stem>.params.yaml`` beside it when there (else the
    notebooks' defaults)."""
    if not is_profile_file(profile):
        validate_profile_name(profile)
        return ProfileChoice(profile, profile, Path(params_dir) / f"{profile}.yaml")
    path = Path(profile).expanduser().resolve()
    if not path.is_file():
        raise RunnerError(f"--profile {profile}: no such profile file ({path})")
    name = _load_profile_cfg(str(path), {}).get("name")
    if not _is_safe_name(name):
        raise RunnerError(f"{rel(path)}: its 'name' ({name!r}) must use letters, digits, '_' and '-' only "
                          "(it names runs/<name>/, figures/<name>/ and the executed notebooks' folder)")
    beside = path.with_name(f"{path.stem}.params.yaml")
    return ProfileChoice(name, str(path), beside if beside.is_file() else None)


def profile_definition(choice: ProfileChoice) -> dict[str, Any]:
    """The profile's settings (``icm_helpers/profiles/<name>.yaml`` or the profile file); {} for a name with a
    params file but no profile definition."""
    if choice.packaged and choice.name not in available_profiles():
        return {}
    return _load_profile_cfg(choice.notebook_value, {})


def _load_profile_cfg(profile: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``icm_helpers.config.load_profile`` with its errors as usage errors."""
    try:
        return load_profile(profile, overrides)
    except (ValueError, KeyError) as exc:
        raise RunnerError(str(exc.args[0]) if exc.args else str(exc)) from None
    except yaml.YAMLError as exc:
        raise RunnerError(f"{profile}: not valid YAML: {exc}") from None


# ----------------------------------------------------------------------------------------------- values
def _check_param_key(key: Any, where: str) -> None:
    if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
        raise RunnerError(f"{where}: parameter name {key!r} is not a valid Python identifier")


def _check_param_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for item in value:
            _check_param_value(item, where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RunnerError(f"{where}: mapping keys must be strings, got {k!r}")
            _check_param_value(v, where)
        return
    raise RunnerError(
        f"{where}: value {value!r} of type {type(value).__name__} is not a plain YAML scalar/list/"
        "mapping (quote it to pass it as a string)"
    )


# ----------------------------------------------------------------------------------------------- params files
def load_profile_params(profile: str, params_dir: Path) -> dict[str, Any]:
    """Contents of ``<params_dir>/<profile>.yaml`` (a flat mapping; an empty file is ``{}``)."""
    validate_profile_name(profile)
    params_dir = Path(params_dir)
    path = params_dir / f"{profile}.yaml"
    if not path.is_file():
        listing = ", ".join(params_profiles(params_dir)) or "none"
        raise RunnerError(
            f"unknown profile {profile!r}: {rel(path)} does not exist. "
            f"Available profiles (in {rel(params_dir)}): {listing}"
        )
    return _read_params_file(path, profile)


def _read_params_file(path: Path, profile: str) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ParamLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise RunnerError(f"{rel(path)}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RunnerError(f"{rel(path)}: must be a YAML mapping of name: value, got {type(data).__name__}")
    for key, value in data.items():
        _check_param_key(key, rel(path))
        _check_param_value(value, f"{rel(path)}: {key}")
    if "profile" in data:
        raise RunnerError(
            f"{rel(path)}: do not set 'profile' in a params file; the runner injects profile: {profile}"
        )
    return dict(data)


# ----------------------------------------------------------------------------------------------- command line
def parse_param_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["seed=1", "lr=1e-3"]`` -> ``{"seed": 1, "lr": 0.001}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise RunnerError(f"--param {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        _check_param_key(key, f"--param {item!r}")
        if key == "profile":
            raise RunnerError("--param profile=...: choose the profile with --profile")
        try:
            value = parse_yaml_value(text)
        except yaml.YAMLError as exc:
            raise RunnerError(f"--param {item!r}: value is not valid YAML: {exc}") from exc
        _check_param_value(value, f"--param {item!r}")
        out[key] = value
    return out


def parse_set_overrides(items: Sequence[str], profile: str) -> dict[str, Any]:
    """``--set tasks.detection.lambdas=[0.4]`` -> ``{"tasks.detection.lambdas": [0.4]}`` (values parsed as YAML),
    checked against ``profile`` now, so a typo stops the run before any notebook starts."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise RunnerError(
                f"--set {item!r}: expected key=value with a dotted profile key, e.g. evaluation.max_images=4"
            )
        key, text = (part.strip() for part in item.split("=", 1))
        try:
            out[key] = parse_yaml_value(text)
        except yaml.YAMLError as exc:
            raise RunnerError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
        _check_param_value(out[key], f"--set {item!r}")
    if out:
        try:
            _load_profile_cfg(profile, out)
        except RunnerError as exc:
            raise RunnerError(f"--set: {exc}") from None
    return out


# ----------------------------------------------------------------------------------------------- all together
def build_params(
    profile: str, params_dir: Path, overrides: Sequence[str] = (), sets: Sequence[str] = ()
) -> dict[str, Any]:
    """The parameters injected into every notebook for ``--profile profile``: see :func:`params_for`."""
    return params_for(resolve_profile(profile, params_dir), params_dir, overrides, sets)


def params_for(
    choice: ProfileChoice, params_dir: Path, overrides: Sequence[str] = (), sets: Sequence[str] = ()
) -> dict[str, Any]:
    """The profile's params file (or none) + ``profile`` + the ``--param`` ``overrides`` + ``overrides`` (the
    ``--set`` dotted profile settings in ``sets``, only when given)."""
    if choice.packaged:
        params = load_profile_params(choice.name, params_dir)
    else:
        params = _read_params_file(choice.params_file, choice.name) if choice.params_file is not None else {}
    params["profile"] = choice.notebook_value
    params.update(parse_param_overrides(overrides))
    profile_overrides = parse_set_overrides(sets, choice.notebook_value)
    if profile_overrides:
        params["overrides"] = profile_overrides
    return params


def params_sha256(params: dict[str, Any]) -> str:
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return sha256_text(text)
