from fla_factmem.layers.attn import Attention
from fla_factmem.layers.factorization_memory import FactorizationMemory
from fla_factmem.layers.mamba2 import Mamba2
from fla_factmem.layers.routing_diagnostics import routing_summary

__all__ = ["Attention", "FactorizationMemory", "Mamba2", "routing_summary"]
