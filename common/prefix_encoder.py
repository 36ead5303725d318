"""The trainable prefix, with the paper's reparameterization.

Direct optimization of the prefix ``P`` is unstable (Li & Liang 2021, §4.3), so during
training ``P = MLP(P')``: ``P'`` is ``(prefix_length, mid_dim)`` and the MLP is
``Linear(mid_dim, mid_dim) → tanh → Linear(mid_dim, layers·2·kv_dim)``. After training,
:meth:`PrefixEncoder.materialize` computes ``P`` once; ``P'`` and the MLP are dropped and
never stored.

Args:
    shape: the model's :class:`~common.architectures.PrefixShape`.
    prefix_length: number of virtual positions ``P``.
    mid_dim: ``d'``, width of ``P'`` and of the MLP's hidden layer (the paper's 512).
    reparameterize: ``False`` optimizes ``P`` directly.
    offset: a warm start (a base prefix's key/values): training begins exactly there.

Example::

    encoder = PrefixEncoder(prefix_shape(model.config), prefix_length=10)
    key_values = encoder()            # (layers, 2, kv_heads, 10, head_dim), differentiable
    prefix = encoder.materialize()    # same values, detached: what gets saved
"""

from __future__ import annotations

import torch
from torch import nn

from common.architectures import PrefixShape
from common.errors import InvalidInputError


class PrefixEncoder(nn.Module):
    def __init__(
        self,
        shape: PrefixShape,
        prefix_length: int,
        *,
        mid_dim: int = 512,
        reparameterize: bool = True,
        offset: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if prefix_length <= 0:
            raise InvalidInputError(f"prefix length must be at least 1, got {prefix_length}")
        if mid_dim <= 0:
            raise InvalidInputError(f"mid dim must be at least 1, got {mid_dim}")
        self.shape, self.prefix_length = shape, prefix_length
        self.reparameterize = reparameterize
        out_features = shape.layers * 2 * shape.kv_dim
        if reparameterize:
            self.embedding = nn.Parameter(torch.randn(prefix_length, mid_dim))  # P' (P, d')
            self.mlp = nn.Sequential(
                nn.Linear(mid_dim, mid_dim), nn.Tanh(), nn.Linear(mid_dim, out_features)
            )
        else:
            self.key_values = nn.Parameter(torch.randn(shape.tensor_shape(prefix_length)))
        # a buffer: moves with .to(device), never trained, not a parameter AdamW sees
        self.offset: torch.Tensor | None
        self.register_buffer("offset", None, persistent=False)
        if offset is not None:
            self._start_at(offset)

    @torch.no_grad()
    def _start_at(self, offset: torch.Tensor) -> None:
        """Warm start: ``P = offset + MLP(P')`` with the MLP's last layer zeroed (without
        reparameterization ``P`` is set to ``offset``), so training begins *exactly* at
        ``offset`` — a fitted MLP only approximates it — and the MLP learns the change."""
        expected = self.shape.tensor_shape(self.prefix_length)
        if tuple(offset.shape) != expected:
            raise InvalidInputError(
                f"a warm-start prefix must have shape {expected}, got {tuple(offset.shape)}"
            )
        if not self.reparameterize:
            self.key_values.copy_(offset)
            return
        last = self.mlp[2]
        assert isinstance(last, nn.Linear)
        last.weight.zero_()
        last.bias.zero_()
        self.offset = offset.detach().clone().float()

    def forward(self) -> torch.Tensor:
        """The prefix ``(layers, 2, kv_heads, P, head_dim)``."""
        if not self.reparameterize:
            return self.key_values
        s = self.shape
        flat = self.mlp(self.embedding)  # (P, layers·2·kv_heads·hs)
        key_values = flat.view(self.prefix_length, s.layers, 2, s.kv_heads, s.head_dim).permute(
            1, 2, 3, 0, 4
        )  # (layers, 2, kv_heads, P, hs)
        return key_values if self.offset is None else self.offset + key_values

    @torch.no_grad()
    def set_key_values(self, key_values: torch.Tensor) -> None:
        """Without reparameterization: start from these key/values exactly."""
        expected = self.shape.tensor_shape(self.prefix_length)
        if tuple(key_values.shape) != expected:
            raise ValueError(
                f"expected key/values of shape {expected}, got {tuple(key_values.shape)}"
            )
        if self.reparameterize:
            raise ValueError("set_key_values needs reparameterize=False; use fit_to() instead")
        self.key_values.copy_(key_values)

    def fit_to(
        self, target: torch.Tensor, *, steps: int = 300, learning_rate: float = 1e-3
    ) -> float:
        """Fit ``P'`` and the MLP so that ``MLP(P')`` ≈ ``target`` (mean squared error, Adam):
        the paper's initialization from real words when the MLP is kept. Returns the final
        MSE. Without reparameterization the target is copied exactly."""
        if not self.reparameterize:
            self.set_key_values(target)
            return 0.0
        target = target.detach()
        optimizer = torch.optim.Adam(self.parameters(), lr=learning_rate)
        loss = torch.tensor(float("inf"))
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(self(), target)
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``P`` computed once, detached, contiguous, on the CPU: what a prefix file stores.
        Always a copy: without reparameterization ``self()`` is the trained parameter itself,
        and a snapshot (the best validation epoch) must not move on with later steps."""
        return self().detach().to(device="cpu", dtype=dtype).clone().contiguous()
