"""Greedy decoding of a recurrent model with one CUDA graph replay per token."""

from __future__ import annotations

import torch


class GraphDecoder:
    """One greedy decode step of a model whose cache holds only fixed-size states (no attention
    KV cache, which grows), captured as a CUDA graph that feeds itself: each replay reads the
    token and the cache's state tensors at the addresses they had at capture, runs the model,
    and writes the next token and the new states back there.

    A layer that updates its state in place (Factorization Memory's decode) costs nothing more.
    A layer that returns a new state tensor (FLA's GLA step, and its Mamba-2 step without
    mamba_ssm) gets it copied back into the cached tensor inside the graph: one extra read and
    write of its state per token.

    Args:
        model: a causal LM in eval mode, called as ``model(input_ids=, past_key_values=, use_cache=True)``.
        cache: the FLA ``Cache`` after the prefill; its tensors are reused in place.
        token: ``[B, 1]`` int64, the next input token.

    The constructor runs one step, a warm-up outside the capture (the capture records a step
    without running it), so the cache and ``token`` move on by one token, also when the capture
    then fails. Replays do not advance the cache's host-side token count (``get_seq_length``).
    Call it, and ``step``, under ``torch.no_grad()``.
    """

    def __init__(self, model: torch.nn.Module, cache, token: torch.Tensor):
        for layer_idx in range(len(cache)):
            if cache[layer_idx].get("attn_state") is not None:
                raise ValueError(f"layer {layer_idx} keeps an attention KV cache, which grows: no fixed-address graph")
        self.model, self.cache, self.token = model, cache, token.clone()
        self.fixed = [
            (cache[layer_idx], key, value)
            for layer_idx in range(len(cache))
            for key, value in cache[layer_idx].items()
            if value is not None
        ]
        side = torch.cuda.Stream()  # warm-up and capture off the default stream, as torch.cuda.graph does
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step()
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            self.graph.capture_begin()
            try:
                self._step()
            finally:
                # raises when the capture broke; the step's own error is then its __context__
                self.graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)

    def _step(self) -> None:
        out = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True)
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        for state, key, fixed in self.fixed:
            _copy_back(fixed, state[key])
            state[key] = fixed

    def step(self) -> torch.Tensor:
        """Replays one decode step; returns the ``[B, 1]`` token it produced (overwritten by the next)."""
        self.graph.replay()
        return self.token


def _copy_back(fixed, new) -> None:
    """Copies a new state (a tensor or a tuple of them) into the fixed one, unless it is the same."""
    if isinstance(fixed, torch.Tensor):
        if new is not fixed:
            if new.shape != fixed.shape or new.dtype != fixed.dtype:
                raise ValueError(
                    f"a state changed from {fixed.dtype} {tuple(fixed.shape)} to {new.dtype} {tuple(new.shape)}"
                )
            fixed.copy_(new)
    else:
        for fixed_part, new_part in zip(fixed, new, strict=True):
            _copy_back(fixed_part, new_part)
