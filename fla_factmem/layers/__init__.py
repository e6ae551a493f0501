from fla_factmem.layers.attn import Attention
from fla_factmem.layers.factorization_memory import FactorizationMemory

__all__ = ["Attention", "FactorizationMemory"]
