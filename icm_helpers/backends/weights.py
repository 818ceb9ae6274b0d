"""Where the paper backends' checkpoints are found: an explicit local path, or the official file in the torch hub cache
(downloaded only when the caller passes ``download=True``: the user asked for network access)."""
from __future__ import annotations

from pathlib import Path

import torch


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(weights: str | None, url: str, *, download: bool = False, what: str = "weights",
                    setting: str = "recognizers.<task>.model.download") -> Path:
    """Path of a checkpoint file.

    ``weights``: a local file path, or None / "official" for the file at ``url`` (looked up in the torch hub cache,
    ``hub_checkpoint_dir()``). Missing and ``download=False`` -> FileNotFoundError naming the URL, the file name
    and the folder to place it in (``setting``: the profile key that allows the download). ``download=True`` ->
    downloaded there with a progress bar."""
    if weights not in (None, "official"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what}: checkpoint file not found: {path}")
        return path
    name = url.rsplit("/", 1)[-1]
    path = hub_checkpoint_dir() / name
    if path.is_file():
        return path
    if not download:
        raise FileNotFoundError(
            f"{what}: the official checkpoint {name} is not in {path.parent}. Either download it yourself "
            f"(wget -P {path.parent} {url}) or pass download=True (profile: {setting}: true) "
            f"to let the suite fetch it; or give a local file with weights=/path/to/file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=True)
    return path


def missing_backend_error(package: str, install: str, backend: str) -> ImportError:
    return ImportError(f"recognition backend {backend!r} needs the package {package!r}, which is not installed. "
                       f"Install it with: {install}")
