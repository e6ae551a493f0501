"""FLA's building blocks, runnable on the CPU too.

FLA's norms, short convolution and gated MLP are Triton kernels that need a CUDA GPU. Each
class here subclasses FLA's own (same parameters, same state layouts, so checkpoints and
caches move freely between machines) and runs FLA's kernel on CUDA tensors, and the same
math in PyTorch on CPU tensors, where it is the only path. ``RotaryEmbedding`` is plain
PyTorch with FLA's convention, taking explicit positions. ``biased_sigmoid`` is ours: the
layer's rates in one kernel; so is the gated norm's forward without autograd
(``norm.rms_norm_gated_fwd``), which reads its gate where it lies. ``split_linear`` is plain
PyTorch: one linear map per block of a weight's rows, whose backward sums the blocks' gradients
on the input in the GEMMs' epilogues; ``top_k_linear`` makes the top K per head of a linear map's
outputs a slice of tokens at a time (the sparse layer's routing, never all of its logits at once).
"""

from fla_factmem.modules.activations import biased_sigmoid
from fla_factmem.modules.convolution import ShortConvolution
from fla_factmem.modules.linear import split_linear
from fla_factmem.modules.mlp import GatedMLP
from fla_factmem.modules.norm import FusedRMSNormGated, RMSNorm
from fla_factmem.modules.rotary import RotaryEmbedding
from fla_factmem.modules.top_k_linear import top_k_linear

__all__ = [
    "FusedRMSNormGated",
    "GatedMLP",
    "RMSNorm",
    "RotaryEmbedding",
    "ShortConvolution",
    "biased_sigmoid",
    "split_linear",
    "top_k_linear",
]
