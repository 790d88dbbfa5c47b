"""Reading checkpoints and loading them into anchors, with every mismatch reported in one line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from snexport.errors import WeightsError


def read_state_dict(path: Path) -> dict:
    """Read a .safetensors or .pth/.pt/.bin checkpoint; unwrap the usual {'model': ...} containers.

    ``.pth`` files are read with ``weights_only=True``: tensors and plain containers only, so a crafted checkpoint
    cannot run code while it is read.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path given to --weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            import torch

            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file: the reader's own message is the useful part
        raise WeightsError(
            f"cannot read weights file {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it may be truncated or corrupt: download or export it again"
        ) from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"weights file {path} holds no state dict; expected tensors keyed by parameter name")
    return sd


def load_state_into(model, state_dict: dict, name: str, source: str,
                    convert: Optional[Callable[[dict, object], dict]] = None) -> None:
    """Load strictly, but report every mismatch (missing, unexpected, wrong shape) in one line.

    ``convert`` maps other checkpoint layouts (original DeiT/JAX) to timm's; the family adapter supplies it.
    """
    if convert is not None:
        try:
            state_dict = convert(state_dict, model)
        except Exception:  # noqa: BLE001 - a layout it does not know: the strict check below reports the keys
            pass
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of another shape (e.g. {wrong[0]})")
    if problems:
        raise WeightsError(f"weights from {source} do not fit {name}: {'; '.join(problems)}; "
                           "pass weights of this exact architecture")
    model.load_state_dict(state_dict, strict=True)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def go_offline_if_hub_unreachable() -> None:
    """Without a network, use only the local hub cache: the hub client would otherwise retry for ~45 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on") and _hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read at call time; the env var alone is read at import
    except ImportError:
        pass


def parse_weights_option(values: list[str] | None) -> dict[str, Path]:
    """['deit_s=a.safetensors', ...] -> {'deit_s': Path('a.safetensors')}."""
    out: dict[str, Path] = {}
    for item in values or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise WeightsError(f"--weights expects NAME=PATH (e.g. deit_s=deit_s.safetensors), got '{part}'")
            key, path = part.split("=", 1)
            out[key.strip()] = Path(path.strip()).expanduser()
    return out
