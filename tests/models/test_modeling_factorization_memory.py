"""Factorization Memory models: Auto classes, training, save/load, gradient checkpointing,
generation with the cache, and hybrid stacks."""

import pytest
import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from fla_factmem import (
    Attention,
    FactorizationMemory,
    FactorizationMemoryConfig,
    FactorizationMemoryForCausalLM,
    FactorizationMemoryModel,
    register_mixer,
    registered_mixers,
)
from tests.utils import assert_close, offsets_of

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    num_heads=2,
    num_memories=8,
    intermediate_size=64,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)
HYBRID = ["factorization_memory", "attention", "factorization_memory"]


def small_config(layer_types=HYBRID, **kwargs):
    return FactorizationMemoryConfig(
        **(SMALL | dict(num_hidden_layers=len(layer_types), layer_types=layer_types) | kwargs)
    )


def test_auto_config_for_model_and_auto_classes():
    config = AutoConfig.for_model(
        "factorization_memory", hidden_size=64, num_heads=2, head_dim=16, num_memories=8, topk=3
    )
    assert isinstance(config, FactorizationMemoryConfig)
    assert (config.head_dim, config.num_memories, config.topk) == (16, 8, 3)
    config = small_config()
    assert isinstance(AutoModel.from_config(config), FactorizationMemoryModel)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, FactorizationMemoryForCausalLM)
    mixers = [type(block.attn) for block in model.model.layers]
    assert mixers == [FactorizationMemory, Attention, FactorizationMemory]


def test_fla_attn_convention_and_mixer_options():
    config = FactorizationMemoryConfig(
        **SMALL,
        num_hidden_layers=4,
        attn={"layers": [1, 3], "num_heads": 4, "window_size": 8},
        mixer_options={"factorization_memory": {"topk": 2}},
    )
    assert config.layer_types == ["factorization_memory", "attention"] * 2
    model = FactorizationMemoryForCausalLM(config)
    attention, memory = model.model.layers[1].attn, model.model.layers[0].attn
    assert (attention.num_heads, attention.window_size, memory.topk) == (4, 8, 2)
    with pytest.raises(ValueError, match="attention in `attn`"):
        FactorizationMemoryConfig(
            **SMALL, num_hidden_layers=2, layer_types=["gla", "gla"], attn={"layers": [0], "num_heads": 2}
        )
    with pytest.raises(ValueError, match="one mixer name per layer"):
        FactorizationMemoryConfig(**SMALL, num_hidden_layers=2, layer_types=["attention"])
    with pytest.raises(ValueError, match="unknown mixer"):
        FactorizationMemoryForCausalLM(small_config(["factorization_memory", "lstm"]))


def test_attn_and_mixer_options_never_silently_differ():
    """FLA fills an ``attn`` spec's defaults (window_size None, rope_theta 1e4, ...): options given
    in mixer_options['attention'] that the spec contradicts are refused, not dropped; the others
    apply."""
    attn = {"layers": [1], "num_heads": 4, "window_size": 8}
    with pytest.raises(ValueError, match=r"rope_theta: attn 10000.0, mixer_options 500000.0"):
        small_config(attn=attn, mixer_options={"attention": {"rope_theta": 5e5}})
    config = small_config(attn=attn, mixer_options={"attention": {"window_size": 8, "num_heads": 4}})
    assert FactorizationMemoryForCausalLM(config).model.layers[1].attn.window_size == 8


def test_attn_set_after_the_config_makes_its_layers_attention(tmp_path):
    """As in FLA's configs, ``attn`` may be assigned later, or given to ``from_pretrained``."""
    config = small_config(["factorization_memory"] * 3)
    config.attn = {"layers": [1], "num_heads": 4}
    model = FactorizationMemoryForCausalLM(config)
    assert isinstance(model.model.layers[1].attn, Attention) and model.config.layer_types[1] == "attention"
    FactorizationMemoryForCausalLM(small_config(["factorization_memory"] * 3)).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn={"layers": [2], "num_heads": 2})
    assert isinstance(loaded.model.layers[2].attn, Attention)
    assert isinstance(loaded.model.layers[0].attn, FactorizationMemory)


def test_config_refuses_what_the_model_would_get_wrong():
    with pytest.raises(ValueError, match="not divisible by num_heads 4"):
        FactorizationMemoryConfig(**(SMALL | dict(hidden_size=30, num_heads=4)))
    for name in ["num_heads", "hidden_size", "vocab_size"]:
        for value in [0, None]:
            with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
                FactorizationMemoryConfig(**(SMALL | {name: value}))
    with pytest.raises(ValueError, match="mixer_options names unknown mixers \\['atention'\\]"):
        FactorizationMemoryForCausalLM(small_config(mixer_options={"atention": {"window_size": 4}}))
    # transformers' name of the attention layer type is an alias in mixer_options too
    model = FactorizationMemoryForCausalLM(small_config(mixer_options={"full_attention": {"window_size": 4}}))
    assert model.model.layers[1].attn.window_size == 4
    with pytest.raises(ValueError, match="options of 'attention' twice"):
        small_config(mixer_options={"attention": {"window_size": 4}, "full_attention": {"num_kv_heads": 1}})
    with pytest.raises(ValueError, match="either input_ids or inputs_embeds"):
        model()
    assert small_config(temperature=0.5).routing_temperature == 0.5
    with pytest.raises(ValueError, match="name one setting"):
        small_config(temperature=0.5, routing_temperature=2.0)


def test_num_hidden_layers_changed_after_the_config(tmp_path):
    """``from_pretrained(path, num_hidden_layers=N)`` loads the first N layers, as with FLA's models."""
    model = FactorizationMemoryForCausalLM(small_config()).eval()
    model.save_pretrained(tmp_path / "full")
    truncated = FactorizationMemoryForCausalLM.from_pretrained(tmp_path / "full", num_hidden_layers=2)
    assert len(truncated.model.layers) == 2 and truncated.config.layer_types == HYBRID[:2]
    assert torch.equal(truncated.model.layers[1].attn.o_proj.weight, model.model.layers[1].attn.o_proj.weight)
    truncated.save_pretrained(tmp_path / "truncated")
    config = small_config(["factorization_memory"] * 2)
    config.num_hidden_layers = 3
    assert len(FactorizationMemoryForCausalLM(config).model.layers) == 3
    assert config.layer_types == ["factorization_memory"] * 3
    with pytest.raises(ValueError, match="give layer_types for the new depth"):
        FactorizationMemoryForCausalLM.from_pretrained(tmp_path / "full", num_hidden_layers=4)
    # keyword arguments of from_pretrained are set after the config is built: aliases still resolve
    reloaded = FactorizationMemoryForCausalLM.from_pretrained(
        tmp_path / "full", mixer_options={"full_attention": {"window_size": 4}}
    )
    assert reloaded.model.layers[1].attn.window_size == 4
    # FLA's attn convention: truncation drops the layers past the new depth, and the result reloads
    config = FactorizationMemoryConfig(**SMALL, num_hidden_layers=3, attn={"layers": [1, 2], "num_heads": 2})
    FactorizationMemoryForCausalLM(config).save_pretrained(tmp_path / "attn")
    truncated = FactorizationMemoryForCausalLM.from_pretrained(tmp_path / "attn", num_hidden_layers=2)
    assert truncated.config.attn["layers"] == [1]
    truncated.save_pretrained(tmp_path / "attn_truncated")
    assert len(FactorizationMemoryForCausalLM.from_pretrained(tmp_path / "attn_truncated").model.layers) == 2
    # a uniform stack from attn has options for its listed layers only: growing it is refused
    config = FactorizationMemoryConfig(**SMALL, num_hidden_layers=2, attn={"layers": [0, 1], "num_heads": 2})
    config.num_hidden_layers = 3
    with pytest.raises(ValueError, match="attn is set"):
        FactorizationMemoryForCausalLM(config)


def test_an_assigned_criterion_replaces_the_loss():
    """As in FLA's models, ``model.criterion`` is None (FLA's loss) or a loss module of the user's."""
    model = FactorizationMemoryForCausalLM(small_config())
    ids = torch.randint(1, 64, (2, 12))
    model.criterion = nn.CrossEntropyLoss(label_smoothing=0.3)
    out = model(ids, labels=ids)
    wanted = nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1), label_smoothing=0.3
    )
    assert_close("loss", out.loss, wanted, 1e-6)
    model.criterion = None
    wanted = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert_close("loss", model(ids, labels=ids).loss, wanted, 1e-6)
    # FLA's loss fused with the head is a Triton kernel: on the CPU, the same loss from PyTorch
    model.config.fuse_cross_entropy, model.config.fuse_linear_cross_entropy = False, True
    assert_close("loss", model(ids, labels=ids).loss, wanted, 1e-6)


def test_cpu_loss_of_a_bf16_model_is_computed_in_float32():
    """As FLA's fused loss on the GPU: the bf16 logits' cross entropy in float32, not rounded to bf16."""
    model = FactorizationMemoryForCausalLM(small_config()).to(torch.bfloat16)
    ids = torch.randint(1, 64, (2, 12))
    out = model(ids, labels=ids)
    wanted = nn.functional.cross_entropy(out.logits[:, :-1].float().reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert out.loss.dtype == torch.float32
    assert_close("loss", out.loss, wanted, 1e-6)


def test_register_mixer_adds_a_name():
    class Identity(nn.Module):
        def __init__(self, layer_idx, scale):
            super().__init__()
            self.layer_idx, self.scale = layer_idx, nn.Parameter(torch.tensor(scale))

        def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
            return hidden_states * self.scale, None, past_key_values

    register_mixer("test_identity", lambda config, layer_idx, scale=1.0: Identity(layer_idx, scale), overwrite=True)
    assert "test_identity" in registered_mixers()
    config = small_config(["test_identity", "factorization_memory"], mixer_options={"test_identity": {"scale": 0.5}})
    model = FactorizationMemoryForCausalLM(config)
    assert model.model.layers[0].attn.scale.item() == 0.5
    model(torch.randint(1, 64, (2, 9))).logits.sum().backward()
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("test_identity", lambda config, layer_idx: None)


def test_cuda_only_mixers_refuse_cpu_inputs_clearly():
    model = FactorizationMemoryForCausalLM(small_config(["factorization_memory", "gla"]))
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        model(torch.randint(1, 64, (1, 5)))


@pytest.mark.parametrize("topk", [None, 3])
def test_loss_decreases_on_a_fixed_batch(topk):
    model = FactorizationMemoryForCausalLM(small_config(topk=topk))
    batch = torch.randint(1, 64, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_init_weights_follows_flas_scheme_and_zeroes_the_rates_bias():
    model = FactorizationMemoryForCausalLM(small_config())
    layer = model.model.layers[0].attn
    with torch.no_grad():
        layer.eta_mu_bias.normal_()
        layer.in_proj.weight.fill_(1.0)
    model._init_weights(layer)
    model._init_weights(layer.in_proj)
    assert torch.equal(layer.eta_mu_bias, torch.zeros_like(layer.eta_mu_bias))
    assert layer.in_proj.weight.std().item() == pytest.approx(model.config.initializer_range, rel=0.2)


def test_save_pretrained_then_from_pretrained_reproduces_logits(tmp_path):
    config = small_config(topk=3, mixer_options={"attention": {"num_kv_heads": 1}})
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == HYBRID
    assert reloaded.config.mixer_options == {"attention": {"num_kv_heads": 1}}
    ids = torch.randint(1, 64, (2, 30))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_gradient_checkpointing_runs_and_matches():
    model = FactorizationMemoryForCausalLM(small_config())
    ids = torch.randint(1, 64, (2, 20))
    model(input_ids=ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize(
    "options", [dict(topk=None), dict(topk=3), dict(topk=3, routing_slice_tokens=16)], ids=["dense", "sparse", "sliced"]
)
def test_torch_compile_calls_our_functions_eagerly_with_eagers_results(device, options):
    """torch.compile traces the model around our ops and modules and calls them eagerly (they are
    ``torch.compiler.disable``d, as FLA's chunk ops are: Dynamo cannot trace their kept Triton
    launches), so it breaks its graphs at those calls and never inside them; the loss and
    gradients are eager's. On the GPU through the Triton kernels and inductor."""
    import torch._dynamo

    model = FactorizationMemoryForCausalLM(small_config(**options)).to(device)
    ids = torch.randint(1, 64, (2, 40), device=device)
    loss_eager = model(input_ids=ids, labels=ids).loss
    loss_eager.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    ours = ("fla_factmem/ops/", "fla_factmem/modules/")
    # a module of ours that calls a disabled op (ShortConvolution on CUDA) breaks there, at the call
    at_a_call = "torch.compiler.disable()`d function"
    traced_into = [
        r.reason
        for r in explanation.break_reasons
        if any(p in r.user_stack[-1].filename for p in ours) and at_a_call not in r.reason
    ]
    assert not traced_into, traced_into
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor" if device == "cuda" else "aot_eager")
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert_close("loss", loss.detach(), loss_eager.detach(), 1e-5)
    for name, p in model.named_parameters():
        assert_close(f"grad of {name}", p.grad, expected[name], 1e-4)


def greedy_by_recomputation(model, ids, mask, steps):
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize(
    "layer_types, topk",
    [(["factorization_memory"] * 2, None), (["factorization_memory"] * 2, 3), (HYBRID, None), (HYBRID, 2)],
)
@pytest.mark.parametrize("left_padded", [False, True])
def test_greedy_generate_with_cache_equals_recomputation(layer_types, topk, left_padded):
    model = FactorizationMemoryForCausalLM(small_config(layer_types, topk=topk)).eval()
    with torch.no_grad():  # a sharper model than the initial one, so that argmax ties are unlikely
        for p in model.parameters():
            p.mul_(4 if p.dim() > 1 else 1)
    ids = torch.randint(1, 64, (3, 10))
    mask = torch.ones_like(ids)
    if left_padded:
        ids[0, :4], mask[0, :4] = 0, 0
        ids[2, :1], mask[2, :1] = 0, 0
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        expected = greedy_by_recomputation(model, ids, mask, 12)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("topk", [None, 3])
def test_decode_after_a_prefill_under_inference_mode(topk):
    """A cache made under torch.inference_mode() holds inference tensors, which torch lets only
    inference mode update in place; the decode steps after it run without it."""
    model = FactorizationMemoryForCausalLM(small_config(topk=topk)).eval()
    ids = torch.randint(1, 64, (2, 9))
    with torch.inference_mode():
        prefill = model(ids[:, :7], use_cache=True)
    with torch.no_grad():
        cache = prefill.past_key_values
        steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in (7, 8)]
        full = model(ids, use_cache=False).logits
    assert_close("decoded logits", torch.cat(steps, 1), full[:, 7:], 1e-5)


@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("use_short_conv", [True, False])
def test_cached_chunk_of_all_padding_leaves_the_states(topk, use_short_conv):
    """A prefill, then a chunk whose tokens are all padding for every row, then two tokens: as one
    forward with that chunk masked out. The memory layers keep their states over the empty chunk."""
    model = FactorizationMemoryForCausalLM(small_config(topk=topk, use_short_conv=use_short_conv)).eval()
    ids = torch.randint(1, SMALL["vocab_size"], (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[:, 7:10] = 0
    with torch.no_grad():
        cache = model(ids[:, :7], use_cache=True).past_key_values
        empty = model(ids[:, 7:10], attention_mask=mask[:, :10], past_key_values=cache, use_cache=True)
        last = model(ids[:, 10:], attention_mask=mask, past_key_values=empty.past_key_values, use_cache=True)
        whole = model(ids, attention_mask=mask).logits
    assert_close("logits after the padded chunk", last.logits, whole[:, 10:], 1e-5)


@pytest.mark.parametrize("topk", [None, 3])
def test_packed_sequences_in_a_hybrid_model(topk):
    """Packed sequences through a model with attention layers equal per-sequence runs, in eval mode
    too, where a call builds a cache unless told not to: a packed call builds none unless asked,
    and asked, the attention layers refuse it."""
    model = FactorizationMemoryForCausalLM(small_config(topk=topk)).eval()
    lengths = [5, 1, 9]
    seqs = [torch.randint(1, 64, (1, n)) for n in lengths]
    cu_seqlens = offsets_of(lengths)
    with torch.no_grad():
        packed = model(torch.cat(seqs, 1), cu_seqlens=cu_seqlens)
        for i, ids in enumerate(seqs):
            piece = packed.logits[:, cu_seqlens[i] : cu_seqlens[i + 1]]
            assert_close(f"logits[{i}]", piece, model(ids, use_cache=False).logits, 1e-5)
        assert packed.past_key_values is None
        with pytest.raises(ValueError, match="cannot fill an attention layer's cache"):
            model(torch.cat(seqs, 1), cu_seqlens=cu_seqlens, use_cache=True)


@pytest.mark.cuda
@pytest.mark.parametrize("extra", ["gla", "delta_net", "gated_deltanet", "mamba2"])
def test_hybrid_with_fla_mixers_trains_and_round_trips_on_gpu(extra, tmp_path):
    config = small_config(["factorization_memory", "attention", extra], hidden_size=64, num_heads=2, num_memories=16)
    model = AutoModelForCausalLM.from_config(config).cuda()
    ids = torch.randint(1, 64, (2, 100), device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # some FLA kernels (delta rule) take no float32
        loss = model(input_ids=ids, labels=ids).loss
        try:
            loss.backward()
        except RuntimeError as error:
            if "#640" in str(error):  # FLA refuses its gated backward on Hopper with Triton < 3.7.1
                pytest.skip(f"FLA refuses {extra} on this GPU and Triton: {error}")
            raise
        optimizer.step()
        assert torch.isfinite(loss)
        model.eval().save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).cuda().eval()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.cuda
@pytest.mark.parametrize("topk", [None, 3])
def test_greedy_generate_on_gpu_equals_recomputation(topk):
    """On the GPU the decode steps take the fused recurrent kernel and prefill the chunk kernels."""
    model = (
        FactorizationMemoryForCausalLM(small_config(HYBRID, topk=topk, hidden_size=64, num_memories=32)).cuda().eval()
    )
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4 if p.dim() > 1 else 1)
    ids = torch.randint(1, 64, (3, 80), device="cuda")
    mask = torch.ones_like(ids)
    ids[0, :9], mask[0, :9] = 0, 0
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
        expected = greedy_by_recomputation(model, ids, mask, 16)
    assert torch.equal(generated, expected)


def test_config_switches_on_routing_diagnostics_in_every_memory_layer():
    from fla_factmem.layers import routing_summary

    config = small_config(["factorization_memory", "attention"], track_routing=True, topk=2, load_balance_coef=0.01)
    model = FactorizationMemoryForCausalLM(config)
    model(input_ids=torch.randint(0, config.vocab_size, (2, 9)), labels=torch.randint(0, config.vocab_size, (2, 9)))
    summary = routing_summary(model)
    assert set(summary) == {"entropy", "states_used", "max_load", "load_balance_loss"}
    assert 0 < summary["states_used"] <= 1
