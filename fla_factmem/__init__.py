"""Factorization Memory (arXiv 2511.00315) for flash-linear-attention.

Importing the package registers ``FactorizationMemoryConfig`` (model_type
``factorization_memory``) and its models with transformers' Auto classes.
"""

from fla_factmem.layers import Attention, FactorizationMemory
from fla_factmem.models import (
    FactorizationMemoryConfig,
    FactorizationMemoryForCausalLM,
    FactorizationMemoryModel,
    register_mixer,
    registered_mixers,
)
from fla_factmem.ops import (
    chunk_factorization_memory,
    fused_recurrent_factorization_memory,
    naive_factorization_memory,
)

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "FactorizationMemory",
    "FactorizationMemoryConfig",
    "FactorizationMemoryForCausalLM",
    "FactorizationMemoryModel",
    "chunk_factorization_memory",
    "fused_recurrent_factorization_memory",
    "naive_factorization_memory",
    "register_mixer",
    "registered_mixers",
]
