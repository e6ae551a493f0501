"""Configuration of Factorization Memory language models and hybrid stacks."""

from __future__ import annotations

from fla.models.configuration_utils import AttentionConfig, AttentionConfigBase, get_attention_spec
from transformers.configuration_utils import PreTrainedConfig

# transformers renames a config's "attention" layer type to "full_attention"; both mean our attention mixer
LAYER_TYPE_ALIASES = {"full_attention": "attention"}


def canonical_mixer_options(mixer_options: dict[str, dict] | None) -> dict[str, dict]:
    """A copy of ``mixer_options`` keyed by mixer names, aliases resolved (both spellings refused)."""
    options = {}
    for name, values in (mixer_options or {}).items():
        canonical = LAYER_TYPE_ALIASES.get(name, name)
        if canonical in options:
            raise ValueError(f"mixer_options gives the options of {canonical!r} twice (also as {name!r})")
        options[canonical] = dict(values)
    return options


class FactorizationMemoryConfig(AttentionConfigBase, PreTrainedConfig):
    r"""A decoder of pre-norm blocks (mixer, then a SwiGLU MLP), each mixer chosen by name.

    Args:
        vocab_size, hidden_size, num_hidden_layers, intermediate_size, hidden_ratio, hidden_act,
        max_position_embeddings, norm_eps, initializer_range, tie_word_embeddings, use_cache,
        pad_token_id, bos_token_id, eos_token_id: as in FLA's models.
        num_heads: heads of every mixer (Factorization Memory, and the default of the others).
        head_dim: width V of a memory state; ``hidden_size // num_heads`` by default.
        num_memories: memory states M per head.
        topk: None for dense routing, K in [1, M] for the sparse variant.
        temperature: routing logits are divided by it. Stored as ``routing_temperature``, since
            transformers reads a config's ``temperature`` as the sampling temperature of ``generate``
            (``from_pretrained`` takes ``routing_temperature`` only).
        attn_mode: kernel mode of the Factorization Memory layers (``chunk`` or ``fused_recurrent``).
        use_short_conv, conv_size: the short convolution on v.
        track_routing: the Factorization Memory layers keep routing diagnostics of every forward
            (read them with ``fla_factmem.layers.routing_summary(model)``); off by default.
        load_balance_coef: weight of the sparse routing's load-balancing loss (0: off); see
            ``FactorizationMemory``.
        routing_slice_tokens: the sparse layers make their routing logits for at most this many
            tokens at a time, never all ``[B, T, H, M]`` of them (None: all at once); see
            ``FactorizationMemory``.
        layer_types: the mixer of every layer by name, for instance
            ``["factorization_memory", "attention", "gla", ...]`` (see ``registered_mixers()``);
            all ``factorization_memory`` by default.
        mixer_options: keyword arguments per mixer name, e.g. ``{"attention": {"window_size": 512}}``,
            on top of defaults derived from ``hidden_size`` and ``num_heads``.
        attn: FLA's convention, ``{"layers": [...], "num_heads": ..., "num_kv_heads": ...,
            "window_size": ..., "rope_theta": ...}`` (or a list of them): those layers become
            ``attention`` with these options (FLA's defaults for those not given), also when
            ``attn`` is assigned later or given to ``from_pretrained``. ``mixer_options["attention"]``
            may add options for them, not contradict these.
        fuse_swiglu, fuse_cross_entropy: use FLA's fused kernels on CUDA (PyTorch on the CPU).
    """

    model_type = "factorization_memory"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_heads: int = 4,
        head_dim: int | None = None,
        num_memories: int = 64,
        topk: int | None = None,
        routing_temperature: float = 1.0,
        attn_mode: str = "chunk",
        use_short_conv: bool = True,
        conv_size: int = 4,
        track_routing: bool = False,
        load_balance_coef: float = 0.0,
        routing_slice_tokens: int | None = None,
        layer_types: list[str] | None = None,
        mixer_options: dict[str, dict] | None = None,
        attn: AttentionConfig = None,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        max_position_embeddings: int = 2048,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        **kwargs,
    ):
        for name, value in [("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_heads", num_heads)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(num_hidden_layers, int) or num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be a non-negative integer; got {num_hidden_layers!r}")
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}; give head_dim")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        self.num_memories = num_memories
        self.topk = topk
        if "temperature" in kwargs:
            temperature = kwargs.pop("temperature")
            if routing_temperature not in (1.0, temperature):
                raise ValueError(
                    f"temperature ({temperature!r}) and routing_temperature ({routing_temperature!r}) name one "
                    f"setting, the routing's; give one of them"
                )
            routing_temperature = temperature
        self.routing_temperature = routing_temperature
        self.attn_mode = attn_mode
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.track_routing = track_routing
        self.load_balance_coef = load_balance_coef
        self.routing_slice_tokens = routing_slice_tokens
        self.mixer_options = canonical_mixer_options(mixer_options)
        self.attn = attn  # validated by FLA's AttentionConfigBase
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # set after PreTrainedConfig.__init__, which would rename "attention"
        self.layer_types = self._resolve_layer_types(layer_types)
        for layer_idx in self._attention_layers():
            self.options_of(layer_idx)  # refuses options that attn and mixer_options both give

    def _resolve_layer_types(self, layer_types: list[str] | None) -> list[str]:
        if layer_types is None:
            types = ["factorization_memory"] * self.num_hidden_layers
        else:
            if isinstance(layer_types, str) or len(layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types must list one mixer name per layer ({self.num_hidden_layers}); got {layer_types!r}"
                )
            types = [LAYER_TYPE_ALIASES.get(name, name) for name in layer_types]
        for layer_idx in self._attention_layers():
            if layer_types is not None and types[layer_idx] != "attention":
                raise ValueError(f"layer {layer_idx} is attention in `attn` but {types[layer_idx]!r} in `layer_types`")
            types[layer_idx] = "attention"
        return types

    def validate(self) -> None:
        """transformers' validators, except that ``layer_types`` names mixers, not its attention kinds."""
        for validator in getattr(self, "__class_validators__", ()):
            if validator.__name__ != "validate_layer_type":
                validator(self)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    def resolve_for_model(self) -> None:
        """Settles what may have been set after the config was built (transformers sets
        ``from_pretrained``'s keyword arguments as attributes): aliases in ``layer_types`` and
        ``mixer_options``, and ``layer_types`` and ``attn`` for ``num_hidden_layers``. A shallower
        stack keeps its first layers (``from_pretrained(path, num_hidden_layers=N)``); a deeper one
        repeats the mixer of a uniform stack without ``attn``, and is refused otherwise, as its new
        layers' mixers or options are unknown."""
        self.mixer_options = canonical_mixer_options(self.mixer_options)
        depth, types = self.num_hidden_layers, [LAYER_TYPE_ALIASES.get(name, name) for name in self.layer_types]
        if len(types) >= depth:
            types = types[:depth]
            if self.attn is not None:
                specs = [self.attn] if isinstance(self.attn, dict) else self.attn
                kept = [spec | {"layers": [i for i in spec["layers"] if i < depth]} for spec in specs]
                kept = [spec for spec in kept if spec["layers"]]
                self.attn = (kept[0] if isinstance(self.attn, dict) else kept) if kept else None
        elif len(set(types)) == 1 and self.attn is None:
            types += types[:1] * (depth - len(types))
        else:
            raise ValueError(
                f"num_hidden_layers is {depth} but layer_types names {len(types)} mixers {types}"
                f"{' and attn is set' if self.attn is not None else ''}; give layer_types for the new depth"
            )
        for layer_idx in self._attention_layers():  # an `attn` set after the config was built, too
            types[layer_idx] = "attention"
        self.layer_types = types

    def _attention_layers(self) -> list[int]:
        """The layers that ``attn`` makes attention, by FLA's convention."""
        return [i for i in range(self.num_hidden_layers) if get_attention_spec(self.attn, layer_idx=i) is not None]

    def options_of(self, layer_idx: int) -> dict:
        """Keyword arguments for the mixer of ``layer_idx``: its ``mixer_options``, and its ``attn``
        spec (with FLA's defaults filled in), which must not contradict them."""
        options = dict(self.mixer_options.get(self.layer_types[layer_idx], {}))
        spec = get_attention_spec(self.attn, layer_idx=layer_idx)
        if spec is None:
            return options
        spec = {key: value for key, value in spec.items() if key != "layers"}
        clashes = [key for key, value in spec.items() if key in options and options[key] != value]
        if clashes:
            differences = ", ".join(f"{key}: attn {spec[key]!r}, mixer_options {options[key]!r}" for key in clashes)
            raise ValueError(
                f"layer {layer_idx} is attention by `attn`, whose spec (FLA's defaults filled in) and "
                f"mixer_options['attention'] differ ({differences}); give these options in `attn`"
            )
        return options | spec
