"""Factorization Memory (arXiv 2511.00315) for flash-linear-attention."""

from fla_factmem.ops import (
    chunk_factorization_memory,
    fused_recurrent_factorization_memory,
    naive_factorization_memory,
)

__version__ = "0.1.0"

__all__ = [
    "chunk_factorization_memory",
    "fused_recurrent_factorization_memory",
    "naive_factorization_memory",
]
