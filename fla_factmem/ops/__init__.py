from fla_factmem.ops.factorization_memory import (
    chunk_factorization_memory,
    fused_recurrent_factorization_memory,
    naive_factorization_memory,
)

__all__ = [
    "chunk_factorization_memory",
    "fused_recurrent_factorization_memory",
    "naive_factorization_memory",
]
