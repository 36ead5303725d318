"""Where the frozen model runs: the GPU Ray gave this process, in bfloat16 (or float16 where
bfloat16 is not supported), or the CPU in float32.

Ray sets ``CUDA_VISIBLE_DEVICES`` for a task or actor that asked for ``num_gpus``, so a
process that got no GPU sees none and stays on the CPU — the same code runs on both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.model_loading import LoadedModel


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def choose_placement(num_gpus: float) -> Placement:
    """The device and dtype for a process that asked Ray for ``num_gpus`` GPUs."""
    if num_gpus > 0 and torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Placement(torch.device("cuda", torch.cuda.current_device()), dtype)
    return Placement(torch.device("cpu"), torch.float32)


def place(loaded: LoadedModel, placement: Placement) -> LoadedModel:
    """Move the frozen model to its device (a copy into GPU memory; on the CPU the
    object-store weights stay shared, zero-copy). Prefixes trained or loaded later follow
    the model's device and dtype (common/kv_cache.py, common/training.py)."""
    if placement.device.type == "cpu" and placement.dtype == torch.float32:
        return loaded
    loaded.model.to(device=placement.device, dtype=placement.dtype)  # type: ignore[call-arg]
    return LoadedModel(
        loaded.model, loaded.tokenizer, loaded.fingerprint, loaded.source, zero_copy=False
    )
