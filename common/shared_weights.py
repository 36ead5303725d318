"""Frozen base weights shared through the Ray object store, zero-copy.

The process that loads the model puts its weights in the object store once
(:func:`share_model`); trainers and inference replicas rebuild the model around those
buffers (:func:`materialize_model`) without reading the model from disk or holding a private
copy: on each node Ray keeps one copy of the object in shared memory and every worker maps
it. The weights are frozen (no gradients, never written), which is what makes sharing one
copy between processes safe.

Example::

    shared = share_model(load_model(settings=settings))   # once, in a long-lived process
    loaded = materialize_model(shared)                      # in any worker, any node

The long-lived process is the model's holder actor (:mod:`common.model_holder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from common.architectures import model_class
from common.model_loading import LoadedModel, freeze


@dataclass(frozen=True)
class SharedModel:
    """A picklable handle on a model whose tensors live in the Ray object store."""

    config: dict[str, Any]
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    source: str
    weights: ray.ObjectRef[Any]  # dict: name -> (dtype, shape, uint8 buffer) for params and buffers


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Non-persistent buffers (rotary frequencies, …) too: the rebuilt model starts on the
    # meta device and must get every tensor from the object store.
    return dict(model.named_parameters(remove_duplicate=False)) | dict(
        model.named_buffers(remove_duplicate=False)
    )


def share_model(loaded: LoadedModel) -> SharedModel:
    """Put the model's weights in the object store (once; tied weights once)."""
    payload: dict[str, Any] = {}
    first_name_of: dict[int, str] = {}
    for name, tensor in _tensors(loaded.model).items():
        key = tensor.data_ptr()
        if key in first_name_of:  # tied weights (e.g. embeddings and LM head): one copy
            payload[name] = ("alias", first_name_of[key])
            continue
        first_name_of[key] = name
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        payload[name] = (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), raw)
    return SharedModel(
        config=loaded.model.config.to_dict(),
        tokenizer=loaded.tokenizer,
        fingerprint=loaded.fingerprint,
        source=loaded.source,
        weights=ray.put(payload),
    )


def _as_tensor(dtype: str, shape: tuple[int, ...], raw: np.ndarray) -> torch.Tensor:
    # The buffer is read-only shared memory; torch warns about non-writable arrays but
    # shares the memory, which is the point. Frozen weights are never written.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(raw)
    return flat.view(getattr(torch, dtype)).view(shape)


def materialize_model(shared: SharedModel) -> LoadedModel:
    """Rebuild the frozen model around the object-store buffers (no copy, no disk read)."""
    payload: dict[str, Any] = ray.get(shared.weights)
    raws = [entry[2] for entry in payload.values() if entry[0] != "alias"]
    config = AutoConfig.for_model(**shared.config)
    with torch.device("meta"):
        model = model_class(config).from_config(config)
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in payload.items():
        if entry[0] != "alias":
            tensors[name] = _as_tensor(*entry)
    for name, entry in payload.items():
        if entry[0] == "alias":
            tensors[name] = tensors[entry[1]]
    for name, tensor in tensors.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor
    # Tied names must point at the same Parameter object, as after a normal load.
    for name, entry in payload.items():
        if entry[0] == "alias":
            target_module, _, target_leaf = entry[1].rpartition(".")
            module_name, _, leaf = name.rpartition(".")
            source = model.get_submodule(target_module)._parameters.get(target_leaf)
            if source is not None and leaf in model.get_submodule(module_name)._parameters:
                model.get_submodule(module_name)._parameters[leaf] = source
    leftover = [n for n, t in _tensors(model).items() if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors missing from the shared weights: {leftover[:5]}")
    # Ray hands out object-store buffers as read-only arrays; a private copy would be
    # writable. Every tensor must also point into one of those buffers (no copy on the way).
    addresses = {raw.ctypes.data for raw in raws}
    zero_copy = all(not raw.flags.writeable for raw in raws) and all(
        t.data_ptr() in addresses for t in tensors.values()
    )
    return LoadedModel(
        freeze(model), shared.tokenizer, shared.fingerprint, shared.source, zero_copy=zero_copy
    )
