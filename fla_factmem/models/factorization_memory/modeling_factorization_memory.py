"""Factorization Memory language models: pure or hybrid stacks on FLA's model base classes."""

from __future__ import annotations

import torch
import torch.nn as nn
from fla.models.generation_utils import FLAUnsupportedCacheGenerationMixin
from fla.models.modeling_utils import FLAForCausalLM, FLAModel, FLAPreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from fla_factmem.layers import FactorizationMemory
from fla_factmem.models.factorization_memory.configuration_factorization_memory import FactorizationMemoryConfig
from fla_factmem.models.mixers import build_mixer, mixer_entry, registered_mixers
from fla_factmem.modules import GatedMLP, RMSNorm


class FactorizationMemoryBlock(GradientCheckpointingLayer):
    """Pre-norm block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``; ``[B, T, D]`` to ``[B, T, D]``."""

    def __init__(self, config: FactorizationMemoryConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = build_mixer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(
            hidden_size=config.hidden_size,
            hidden_ratio=config.hidden_ratio,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            fuse_swiglu=config.fuse_swiglu,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        attnres_states=None,
        **kwargs,
    ):
        residual = hidden_states
        hidden_states, attentions, past_key_values = self.attn(
            hidden_states=self.attn_norm(hidden_states),
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
        hidden_states, residual = self.mlp_norm(hidden_states, residual, True)
        hidden_states = residual + self.mlp(hidden_states, **kwargs)
        # FLAModel's loop also threads attention-residual states, which these blocks do not use
        return hidden_states, attentions, past_key_values, attnres_states


class FactorizationMemoryPreTrainedModel(FLAPreTrainedModel):
    """Hugging Face's base for the Factorization Memory models: config class, weight init,
    gradient checkpointing."""

    config_class = FactorizationMemoryConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FactorizationMemoryBlock"]
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module, *args, **kwargs):
        """FLA's scheme (normal weights, zero biases), with the rates' bias, a bare parameter of
        the Factorization Memory layers, zeroed too."""
        super()._init_weights(module, *args, **kwargs)
        if isinstance(module, FactorizationMemory):
            nn.init.zeros_(module.eta_mu_bias)


class FactorizationMemoryModel(FactorizationMemoryPreTrainedModel, FLAModel):
    """Embeddings, ``num_hidden_layers`` blocks and a final norm. ``forward(input_ids [B, T], ...)``
    returns ``last_hidden_state`` ``[B, T, hidden_size]`` and the cache (FLA's ``Cache``). With
    ``cu_seqlens`` (``[N + 1]`` offsets of sequences packed along T, B = 1) it builds no cache
    unless ``use_cache=True``, which attention layers refuse for N > 1."""

    def __init__(self, config: FactorizationMemoryConfig):
        super().__init__(config)
        config.resolve_for_model()
        if unknown := sorted(set(config.mixer_options) - set(registered_mixers())):
            # a misspelt key would leave its layers on their defaults without a word
            raise ValueError(f"mixer_options names unknown mixers {unknown}; registered: {registered_mixers()}")
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [FactorizationMemoryBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.use_attnres = False
        self.cuda_only_mixers = sorted({name for name in config.layer_types if mixer_entry(name).needs_cuda})
        self.unpacked_mixers = sorted({name for name in config.layer_types if not mixer_entry(name).takes_packed})
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        inputs = input_ids if input_ids is not None else inputs_embeds
        if self.unpacked_mixers and kwargs.get("cu_seqlens") is not None:
            raise ValueError(
                f"the mixers {self.unpacked_mixers} take no packed sequences (cu_seqlens): they would run "
                f"across the sequences' boundaries. Pass a padded batch with attention_mask instead."
            )
        if self.cuda_only_mixers and inputs is not None and inputs.device.type != "cuda":
            raise RuntimeError(
                f"the mixers {self.cuda_only_mixers} run FLA's Triton kernels, which need CUDA tensors; "
                f"got inputs on {inputs.device}. On the CPU use 'factorization_memory' and 'attention' layers."
            )
        if kwargs.get("cu_seqlens") is not None and kwargs.get("use_cache") is None:
            # packed sequences are for training and scoring: attention layers cannot keep a cache of
            # them, so none is built unless asked for (then they refuse)
            kwargs["use_cache"] = False
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )


class Float32CrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` over the logits in float32, as FLA's fused losses compute it on the
    GPU: a bf16 model's loss on the CPU is then not rounded to bf16 (0.04 nats off at a loss of 5.7)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(input.float(), target)


class FactorizationMemoryForCausalLM(
    FactorizationMemoryPreTrainedModel, FLAForCausalLM, FLAUnsupportedCacheGenerationMixin
):
    """``FactorizationMemoryModel`` with a language-model head: ``forward(input_ids [B, T],
    labels=None, ...)`` returns ``logits`` ``[B, T, vocab_size]`` and, with labels, the
    next-token loss; ``generate`` decodes with the cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: FactorizationMemoryConfig):
        super().__init__(config)
        self.model = FactorizationMemoryModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # as in FLA's models: None picks FLA's loss, a module assigned here replaces it
        self.criterion = None
        self.post_init()

    def _compute_logits_and_loss(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.criterion is not None:
            return super()._compute_logits_and_loss(hidden_states, *args, **kwargs)
        if hidden_states.is_cuda:
            return self._fused_logits_and_loss(hidden_states, *args, **kwargs)
        # FLA's default losses (fused, or fused with the head: fuse_linear_cross_entropy) are Triton
        # kernels: on the CPU the same loss from PyTorch, given to FLA as the criterion of this call
        # (it makes a summing copy for num_items_in_batch); set in __dict__, as nn.Module would
        # register it as a submodule
        self.__dict__["criterion"] = Float32CrossEntropyLoss()
        try:
            return super()._compute_logits_and_loss(
                hidden_states, *args, **(kwargs | {"fuse_linear_cross_entropy": False})
            )
        finally:
            self.__dict__["criterion"] = None

    @torch.compiler.disable
    def _fused_logits_and_loss(self, hidden_states: torch.Tensor, *args, **kwargs):
        """FLA's head and fused loss (Triton kernels) on CUDA, outside torch.compile's graphs. Compiled
        with the model on an H100 under torch 2.11, this function's graph crashed in AOTAutograd's
        runtime wrapper: it rebuilt an output view of the [B, T, vocab] logits from freed view
        metadata (``shape '[140212315153889, 5609281603246184252, 64]' is invalid``; pytorch#177812
        and #185630, a use-after-free fixed on PyTorch's main by #184774). Eager, it costs the
        compiled graph only the head's GEMM, which inductor by default leaves to cuBLAS as eager does."""
        return super()._compute_logits_and_loss(hidden_states, *args, **kwargs)
