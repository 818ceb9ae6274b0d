"""Security: every checkpoint load is weights_only=True, configs are never eval'd/unpickled, and the suite runs with
the network blocked at the socket level."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE = sorted([*REPO.joinpath("icm_helpers").rglob("*.py"), *REPO.joinpath("papermill_runs").rglob("*.py")])


def _calls(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _is_safe_loader(path, name: str) -> bool:
    if name in ("SafeLoader", "CSafeLoader"):
        return True
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return any(_name(b) in ("yaml.SafeLoader", "SafeLoader", "yaml.CSafeLoader") for b in node.bases)
    return False


def test_scan_finds_the_code():
    assert len(CODE) > 20 and any(p.name == "codec.py" for p in CODE)


def unsafe_torch_loads(paths) -> list[str]:
    bad = []
    for path in paths:
        for call in _calls(path):
            if _name(call.func) == "torch.load":
                ok = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in call.keywords
                )
                if not ok:
                    bad.append(f"{path.name}:{call.lineno}")
    return bad


def test_every_torch_load_is_weights_only(tmp_path):
    """AST scan of the library and the runner: torch.load(...) must pass weights_only=True literally."""
    assert unsafe_torch_loads(CODE) == []
    probe = tmp_path / "probe.py"  # the scan itself must catch the bad forms
    probe.write_text(
        "import torch\ntorch.load('a')\ntorch.load('b', weights_only=False)\ntorch.load('c', weights_only=True)\n"
    )
    assert unsafe_torch_loads([probe]) == ["probe.py:2", "probe.py:3"]


def test_no_eval_exec_unsafe_yaml_or_raw_pickle():
    """Configs are YAML read with safe_load; no eval/exec; the only unpickler is the restricted one for detectron2's
    model-zoo .pkl (a pickle.Unpickler subclass whose find_class allow-lists numpy globals)."""
    bad = []
    for path in CODE:
        for call in _calls(path):
            name = _name(call.func)
            if isinstance(call.func, ast.Name) and name in ("eval", "exec"):  # (model.eval() is a method, not this)
                bad.append(f"{path.relative_to(REPO)}:{call.lineno} {name}")
            if name in ("yaml.unsafe_load", "pickle.load", "pickle.loads", "marshal.loads"):
                bad.append(f"{path.relative_to(REPO)}:{call.lineno} {name}")
            if name == "yaml.load":  # only with a SafeLoader (subclass)
                loader = next((k.value for k in call.keywords if k.arg == "Loader"), None)
                if not (isinstance(loader, ast.Name) and _is_safe_loader(path, loader.id)):
                    bad.append(f"{path.relative_to(REPO)}:{call.lineno} yaml.load without a SafeLoader")
    assert not bad, bad
    unpicklers = [p.relative_to(REPO).as_posix() for p in CODE if "pickle.Unpickler" in p.read_text()]
    assert unpicklers == ["icm_helpers/backends/detectron2_det.py"]
    assert "def find_class" in (REPO / unpicklers[0]).read_text()


def test_network_block_refuses_outside_connections_and_keeps_loopback():
    code = (
        "import socket, icm_helpers\n"
        "from icm_helpers.netguard import NetworkBlocked\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)\n"
        "c = socket.create_connection(srv.getsockname(), timeout=5); c.close()\n"
        "for target in [('203.0.113.7', 80), ('example.com', 443)]:\n"
        "    try:\n"
        "        socket.create_connection(target, timeout=5)\n"
        "    except NetworkBlocked as e:\n"
        "        print('blocked', target[0])\n"
        "    else:\n"
        "        raise SystemExit('not blocked: %s' % (target,))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"ICM_NO_NETWORK": "1", "PATH": "/usr/bin:/bin"}, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["blocked 203.0.113.7", "blocked example.com"]


def test_offline_pretrained_codec_names_the_file(monkeypatch, tmp_path):
    """With the network blocked and an empty hub cache, the pretrained codec fails with the file to place."""
    import torch

    from icm_helpers.codec import build_codec
    from icm_helpers.netguard import block_network

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    import socket

    saved = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
        getattr(socket.socket, "_icm_blocked", False),
    )
    try:
        block_network()
        with pytest.raises(FileNotFoundError, match=r"cheng2020_attn-mse-3(?s:.*)codec\.download"):
            build_codec(pretrained=True, quality=3)
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = saved[:3]
        socket.socket._icm_blocked = saved[3]
