"""What the benchmark scripts share: the fast-path variants and a device sync for timing.

A variant is "base" or fast-path names joined with "+": bf16, channels_last, compile
(e.g. "bf16+channels_last"), the same flags as the CLI's --amp bf16 / --channels-last / --compile.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

VARIANT_PARTS = ("base", "bf16", "channels_last", "compile")


def variant_flags(variant: str) -> Dict[str, Any]:
    parts = [p.strip().replace("-", "_") for p in variant.split("+") if p.strip()]
    bad = [p for p in parts if p not in VARIANT_PARTS]
    if bad or not parts:
        raise SystemExit(f"unknown variant {variant!r}: use base or a '+' of {', '.join(VARIANT_PARTS[1:])}")
    return {"amp": "bf16" if "bf16" in parts else None, "channels_last": "channels_last" in parts,
            "compile": "compile" in parts}


def variants(spec: str) -> List[str]:
    out = [v.strip() for v in spec.split(",") if v.strip()]
    for v in out:
        variant_flags(v)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_main() -> bool:
    """Rank 0 under torchrun (or a single process): the one that prints and writes."""
    from robustbench_lite.runtime import env_rank

    return env_rank() == 0


def input_gradient_passes(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, amp: Optional[str] = None,
                          passes: int = 1) -> None:
    """``passes`` x (forward + backward to the input) over (x, y) in batches, parameters frozen,
    loss summed, under the attack's autocast: the attack step's floor."""
    from attacks.engine import attack_mode

    with attack_mode(model, "eval"):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            for _ in range(passes):
                xi = xb.detach().requires_grad_(True)
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp is not None):
                    logits = model(xi)
                loss = F.cross_entropy(logits.float(), yb, reduction="sum")
                torch.autograd.grad(loss, xi)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def machine() -> Dict[str, Any]:
    import platform

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
