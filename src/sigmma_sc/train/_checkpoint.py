"""Training checkpoints: written atomically after every epoch, read back to resume a killed run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "last.pt"
# config fields that may differ between the run that wrote a checkpoint and the one resuming it
_RESUMABLE = {"epochs", "steps", "patience", "micro_batch", "precision", "finetune_cache", "cache_dir"}


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then renamed over ``path`` (a killed write leaves the old file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _torch_reason(e: BaseException) -> str:
    """The cause in a ``torch.load`` error, without its advice to load with ``weights_only=False``."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    first = text.split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {first[:200]}"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint; a clear error when the file is not one (truncated, another format)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for a corrupt file; chained, its advice would lead)
        # the fix first; torch's own advice ("re-running with weights_only=False") does not apply to a corrupt file
        raise ValueError(
            f"The checkpoint {str(path)!r} is corrupt or not a SIGMMA checkpoint: delete it (or use another "
            f"`checkpoint_dir`) to train from scratch. (torch could not read it: {_torch_reason(e)})"
        ) from None
    if not isinstance(ckpt, dict) or not {"config", "model", "optimizer", "epoch"} <= set(ckpt):
        raise ValueError(
            f"{str(path)!r} is not a SIGMMA training checkpoint; delete it or use another `checkpoint_dir`."
        )
    return ckpt


def check_resumable(ckpt: dict[str, Any], cfg: Any, path: Path) -> None:
    """Raise ``ValueError`` when the checkpoint was written with other settings than ``cfg`` (budget aside)."""
    saved = {k: v for k, v in type(cfg).from_dict(ckpt["config"]).to_dict().items() if k not in _RESUMABLE}
    now = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE}
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise ValueError(
            f"The checkpoint in {str(path)!r} was written with a different config ({diff}); resume with "
            "the same settings, or use another `checkpoint_dir`."
        )
