from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from fla_factmem.models.factorization_memory.configuration_factorization_memory import FactorizationMemoryConfig
from fla_factmem.models.factorization_memory.modeling_factorization_memory import (
    FactorizationMemoryForCausalLM,
    FactorizationMemoryModel,
)

AutoConfig.register(FactorizationMemoryConfig.model_type, FactorizationMemoryConfig, exist_ok=True)
AutoModel.register(FactorizationMemoryConfig, FactorizationMemoryModel, exist_ok=True)
AutoModelForCausalLM.register(FactorizationMemoryConfig, FactorizationMemoryForCausalLM, exist_ok=True)

__all__ = ["FactorizationMemoryConfig", "FactorizationMemoryForCausalLM", "FactorizationMemoryModel"]
