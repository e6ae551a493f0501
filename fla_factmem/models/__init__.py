from fla_factmem.models.factorization_memory import (
    FactorizationMemoryConfig,
    FactorizationMemoryForCausalLM,
    FactorizationMemoryModel,
)
from fla_factmem.models.mixers import register_mixer, registered_mixers

__all__ = [
    "FactorizationMemoryConfig",
    "FactorizationMemoryForCausalLM",
    "FactorizationMemoryModel",
    "register_mixer",
    "registered_mixers",
]
