"""Base prefixes: an operator's task prefix that tenants' prefixes build on.

A tenant's prefix uses a base prefix in one of two ways (``BASE_MODES``), recorded in its
file (``Prefix.base_prefix_id``, ``base_fingerprint``, ``base_mode``):

    warm_start  training starts from the base's key/values; the result stands alone
                (its length is the base's) and needs nothing at inference.
    stack       the base is frozen and sits *before* the tenant's own trainable part on the
                prefix axis in every training forward; the file holds only the tenant's
                part, and inference must use ``stack_prefixes(base, tenant)``:

        prefix axis:  | base (P_base, frozen) | tenant (P_tenant, trained) | input … |

Positions follow the concatenation (the input starts at ``P_base + P_tenant``), in training
and generation alike, so decoding with the stacked tensor is what training optimized.
Encoder-decoder prefixes stack the same way: their three sub-prefixes share the prefix
axis. ``base_fingerprint`` is :func:`key_values_fingerprint` of the base's stored tensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Literal

import torch

from common.errors import IncompatiblePrefixError
from common.prefix_file import BASE_MODES, Prefix

BaseMode = Literal["warm_start", "stack"]
__all__ = ["BASE_MODES", "BaseMode", "check_base", "inference_prefix", "key_values_fingerprint"]
__all__ += ["stack_prefixes"]


def stack_prefixes(base: torch.Tensor, tenant: torch.Tensor) -> torch.Tensor:
    """``base`` ``(layers, 2, kv_heads, P_base, head_dim)`` then ``tenant``
    ``(layers, 2, kv_heads, P_tenant, head_dim)`` on the prefix axis:
    ``(layers, 2, kv_heads, P_base + P_tenant, head_dim)`` in the tenant's dtype and device.
    A new tensor (neither input is touched); gradients flow into whichever requires them."""
    if base.dim() != 5 or tenant.dim() != 5:
        raise IncompatiblePrefixError(
            "expected prefixes of shape (layers, 2, kv_heads, P, head_dim); got base "
            f"{tuple(base.shape)} and tenant {tuple(tenant.shape)}"
        )
    fixed = (0, 1, 2, 4)  # every axis but the prefix axis must agree
    if any(base.shape[axis] != tenant.shape[axis] for axis in fixed):
        raise IncompatiblePrefixError(
            "base and tenant prefixes must agree on (layers, 2, kv_heads, ·, head_dim): "
            f"expected {tuple(tenant.shape[a] for a in fixed)} (the tenant's), got "
            f"{tuple(base.shape[a] for a in fixed)} (the base's)"
        )
    base = base.to(device=tenant.device, dtype=tenant.dtype)
    return torch.cat([base, tenant], dim=3)  # (layers, 2, kv, P_base + P_tenant, hs)


def key_values_fingerprint(key_values: torch.Tensor) -> str:
    """sha256 of a prefix tensor as stored (dtype, shape and bytes): what a dependent
    prefix records as ``base_fingerprint``."""
    tensor = key_values.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes())  # bfloat16 has no numpy dtype
    return digest.hexdigest()


def check_base(prefix: Prefix, base_prefix_id: str | None, base_fingerprint: str | None) -> None:
    """Raise :class:`IncompatiblePrefixError` unless ``prefix`` depends on exactly this base
    (``None``, ``None``: no base). Expected is what the prefix file records."""
    if prefix.base_prefix_id != base_prefix_id:
        raise IncompatiblePrefixError(
            f"the prefix depends on base prefix {prefix.base_prefix_id!r}, got {base_prefix_id!r}"
        )
    if prefix.base_fingerprint != base_fingerprint:
        raise IncompatiblePrefixError(
            f"base prefix {base_prefix_id!r} has changed since the prefix was trained: "
            f"expected fingerprint {str(prefix.base_fingerprint)[:12]}…, got "
            f"{str(base_fingerprint)[:12]}…"
        )


def inference_prefix(tenant: Prefix, base: Prefix | None, *, base_prefix_id: str | None) -> Prefix:
    """What generation runs with: a stacked prefix becomes ``stack_prefixes(base, tenant)``
    (its base checked by id and fingerprint; a missing base is an error, never a silent
    decode without it); any other prefix is returned as it is."""
    if tenant.base_mode != "stack":
        return tenant
    if base is None:
        raise IncompatiblePrefixError(
            f"the prefix is stacked on base prefix {tenant.base_prefix_id!r}, which is not "
            "available"
        )
    check_base(tenant, base_prefix_id, key_values_fingerprint(base.key_values))
    return replace(tenant, key_values=stack_prefixes(base.key_values, tenant.key_values))
