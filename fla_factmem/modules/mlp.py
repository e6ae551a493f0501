"""FLA's gated MLP with a PyTorch path for CPU tensors."""

from __future__ import annotations

import torch.nn.functional as F
from fla.modules import GatedMLP as FLAGatedMLP


class GatedMLP(FLAGatedMLP):
    """SwiGLU feed-forward, ``down_proj(silu(gate_proj(x)) * up_proj(x))``: FLA's module.

    ``forward(x)`` maps ``[..., hidden_size]`` to ``[..., hidden_size]``.
    """

    def forward(self, x, **kwargs):
        if x.is_cuda:
            return super().forward(x, **kwargs)
        if self.hidden_act != "swish":
            raise NotImplementedError(f"GatedMLP on the CPU supports hidden_act='swish', not {self.hidden_act!r}")
        return self.forward_torch(x)

    def forward_torch(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
