from fla_factmem.layers.attn import Attention
from fla_factmem.layers.factorization_memory import FactorizationMemory
from fla_factmem.layers.routing_diagnostics import routing_summary

__all__ = ["Attention", "FactorizationMemory", "routing_summary"]
