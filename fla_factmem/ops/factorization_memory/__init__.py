from fla_factmem.ops.factorization_memory.chunk import chunk_factorization_memory
from fla_factmem.ops.factorization_memory.fused_recurrent import fused_recurrent_factorization_memory
from fla_factmem.ops.factorization_memory.naive import naive_factorization_memory

__all__ = [
    "chunk_factorization_memory",
    "fused_recurrent_factorization_memory",
    "naive_factorization_memory",
]
