"""The token mixers a hybrid stack can use, by name, and ``register_mixer`` to add more."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import fla.layers
import torch.nn as nn
from fla.layers import attn as fla_attn
from fla.layers import mamba2 as fla_mamba2

from fla_factmem.layers import Attention, FactorizationMemory, Mamba2

MixerFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class MixerEntry:
    """A registered mixer: its factory and flags (``register_mixer``)."""

    factory: MixerFactory
    needs_cuda: bool
    takes_packed: bool = True


_MIXERS: dict[str, MixerEntry] = {}


def register_mixer(
    name: str, factory: MixerFactory, needs_cuda: bool = False, overwrite: bool = False, takes_packed: bool = True
) -> None:
    """Makes ``name`` usable in ``FactorizationMemoryConfig.layer_types``.

    Args:
        name: the mixer's name in configs.
        factory: ``factory(config, layer_idx, **options) -> nn.Module``, where ``options`` are
            ``config.mixer_options.get(name, {})``. The module must follow FLA's layer
            interface: ``forward(hidden_states, attention_mask=None, past_key_values=None,
            use_cache=False, output_attentions=False, **kwargs)`` returning
            ``(output [B, T, hidden_size], attentions or None, past_key_values)``, and keep its
            cache entries under its ``layer_idx``.
        needs_cuda: the mixer only runs on CUDA tensors (for instance FLA's Triton layers);
            the model then refuses CPU inputs with a clear message instead of a Triton error.
        overwrite: replace an existing entry of the same name.
        takes_packed: the mixer honours ``cu_seqlens`` (packed sequences); where it does not, the
            model refuses them instead of letting it run across the sequences' boundaries.
    """
    if name in _MIXERS and not overwrite:
        raise ValueError(f"a mixer named {name!r} is already registered; pass overwrite=True to replace it")
    _MIXERS[name] = MixerEntry(factory, needs_cuda, takes_packed)


def registered_mixers() -> list[str]:
    """The names usable in ``layer_types``."""
    return sorted(_MIXERS)


def mixer_entry(name: str) -> MixerEntry:
    """The registered mixer ``name``; ``ValueError`` naming the registered ones if there is none."""
    if name not in _MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered: {registered_mixers()} (see register_mixer)")
    return _MIXERS[name]


def build_mixer(config, layer_idx: int) -> nn.Module:
    """The mixer of layer ``layer_idx``: ``config.layer_types[layer_idx]`` built with its options."""
    name = config.layer_types[layer_idx]
    return mixer_entry(name).factory(config, layer_idx, **config.options_of(layer_idx))


def _factorization_memory(config, layer_idx, **options):
    kwargs = dict(
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        head_dim=config.head_dim,
        num_memories=config.num_memories,
        topk=config.topk,
        temperature=config.routing_temperature,
        mode=config.attn_mode,
        use_short_conv=config.use_short_conv,
        conv_size=config.conv_size,
        norm_eps=config.norm_eps,
        track_routing=config.track_routing,
        load_balance_coef=config.load_balance_coef,
        routing_slice_tokens=config.routing_slice_tokens,
    )
    return FactorizationMemory(**(kwargs | options), layer_idx=layer_idx)


def _attention(config, layer_idx, **options):
    # FLA's own layer where flash-attn is installed; ours (same parameters) on PyTorch SDPA otherwise
    kwargs = dict(
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
    )
    layer = fla_attn.Attention if fla_attn.flash_attn_func is not None else Attention
    return layer(**(kwargs | options), layer_idx=layer_idx)


def _fla_mixer(class_name: str, derived: Callable[..., dict]) -> MixerFactory:
    def factory(config, layer_idx, **options):
        return getattr(fla.layers, class_name)(**(derived(config) | options), layer_idx=layer_idx)

    factory.__name__ = f"fla_{class_name}"
    return factory


register_mixer("factorization_memory", _factorization_memory)
register_mixer("attention", _attention)
# FLA's linear mixers, sized from hidden_size and num_heads so that a bare name works
register_mixer(
    "gla",
    _fla_mixer(
        "GatedLinearAttention", lambda c: dict(hidden_size=c.hidden_size, num_heads=c.num_heads, norm_eps=c.norm_eps)
    ),
    needs_cuda=True,
)
register_mixer(
    "delta_net",
    _fla_mixer("DeltaNet", lambda c: dict(hidden_size=c.hidden_size, num_heads=c.num_heads, norm_eps=c.norm_eps)),
    needs_cuda=True,
)
register_mixer(
    "gated_deltanet",
    _fla_mixer(
        "GatedDeltaNet",
        lambda c: dict(
            hidden_size=c.hidden_size, num_heads=c.num_heads, head_dim=c.hidden_size // c.num_heads, norm_eps=c.norm_eps
        ),
    ),
    needs_cuda=True,
)


def _mamba2(config, layer_idx, **options):
    # FLA's own layer where mamba_ssm is installed; ours (same parameters, SSD on chunk_gla) otherwise
    kwargs = dict(
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        head_dim=2 * config.hidden_size // config.num_heads,
        expand=2,
        norm_eps=config.norm_eps,
    )
    layer = fla_mamba2.Mamba2 if fla_mamba2.is_fast_path_available else Mamba2
    return layer(**(kwargs | options), layer_idx=layer_idx)


# neither layer reads cu_seqlens: FLA's ignores it, and so would run its convolution and scan
# across packed sequences' boundaries
register_mixer("mamba2", _mamba2, needs_cuda=True, takes_packed=False)
