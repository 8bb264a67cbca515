"""The CogView transformer: a decoder-only GPT over the joint text + image vocabulary.

What CogView (NeurIPS 2021) did, and what this file keeps:
- learned absolute positions, GELU(tanh) MLP, output head tied to the word embedding;
- Sandwich-LN: ``x = x + LN3(Attn(LN1(x)))``, ``x = x + LN4(MLP(LN2(x)))``, final LN
  (``sandwich_ln=False`` gives plain pre-LN for comparison runs);
- PB-relax (section 2.4): attention scores computed as ``(Q / (alpha*sqrt(d))) K^T``,
  the row max subtracted on those small numbers, then multiplied back by alpha inside
  the softmax; LayerNorm of ``x / (max|x| / 8)``.

Module and parameter names follow CogView's checkpoints (``word_embeddings``,
``attention.query_key_value``, ``third_layernorm``, ...) so importing them is a rename.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from cogview.exports import MODEL_CONFIG, MODEL_WEIGHTS
from cogview.modules.pb_relax import pb_relax_softmax, pb_relax_softmax_reference
from cogview.safe_load import check_finite, check_state_dict
from cogview.validate import check_int

ATTENTION_IMPLS = ("pb_relax", "sdpa", "eager")
CONFIG_KIND = "cogview-transformer"

# PB-relax LayerNorm divides by max|x| / 8: the input then lies in [-8, 8], so the
# variance cannot overflow in fp16 while LN's output is unchanged (it is scale-invariant).
LN_RELAX_RANGE = 8.0


@dataclass
class TransformerConfig:
    """Shape and behaviour of a CogViewTransformer."""

    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    max_positions: int = 1089
    vocab_size: int = 58240
    mlp_ratio: int = 4
    dropout: float = 0.0  # hidden dropout after each branch
    attention_dropout: float = 0.0
    sandwich_ln: bool = True
    pb_relax: bool = True
    pb_relax_alpha: float = 32.0  # CogView 2.4: scores scaled down by alpha=32 before the max
    attention: str = "pb_relax"  # pb_relax (fused kernel) | sdpa | eager (reference)
    layernorm_eps: float = 1e-5
    init_std: float = 0.02
    # Training only: keep each layer's input, recompute its activations in the backward pass
    # (torch.utils.checkpoint, non-reentrant, RNG state preserved so dropout matches).
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"model.attention={self.attention!r} is not one of {ATTENTION_IMPLS}; "
                "pick pb_relax (fused PB-relax kernel), sdpa or eager"
            )
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}"
            )
        for name in ("num_layers", "hidden_size", "num_heads", "max_positions", "vocab_size"):
            check_int(f"model.{name}", getattr(self, name))
        if self.pb_relax_alpha <= 0:
            raise ValueError(f"model.pb_relax_alpha={self.pb_relax_alpha} must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, values: dict) -> "TransformerConfig":
        """Builds a config from a mapping, naming any key it does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - {"kind", "name", "_target_"})
        if unknown:
            raise ValueError(f"unknown transformer config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})


class LayerNorm(nn.LayerNorm):
    """LayerNorm, optionally PB-relaxed: LN(x / (max|x| / 8)), max per token, detached.

    CogView took one max over the whole tensor, which makes a token's output depend on
    the rest of the batch and breaks KV-cache exactness; a per-token max keeps both.
    """

    def __init__(self, hidden_size: int, eps: float, pb_relax: bool) -> None:
        super().__init__(hidden_size, eps=eps)
        self.pb_relax = pb_relax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pb_relax:
            x = x / relax_scale(x)
        return super().forward(x)


def relax_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token max|x| / 8 (detached, never zero), shape [..., 1]."""
    peak = x.detach().abs().amax(dim=-1, keepdim=True)
    return (peak / LN_RELAX_RANGE).clamp_min(torch.finfo(x.dtype).tiny)


def relaxed_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x) / c`` computed as ``W (x / c) + b / c`` with c = max|x| / 8 per token.

    Used for a branch's output projection when a (scale-invariant) LayerNorm follows
    it (Sandwich-LN with PB-relax): the result feeds LN unchanged, but the matmul can
    no longer overflow in fp16 however large the branch's activations grow.
    """
    scale = relax_scale(x)
    out = F.linear(x / scale, layer.weight)
    if layer.bias is not None:
        out = out + layer.bias / scale
    return out


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, written in place."""

    def __init__(self, batch_size: int, num_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch_size, num_heads, max_length, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    def update(self, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Writes new keys/values [B, H, T, hd] at ``start``; returns all up to start + T."""
        end = start + keys.shape[2]
        if end > self.max_length:
            raise ValueError(
                f"KV cache holds {self.max_length} positions but decoding reached {end}; "
                "call setup_kv_cache with a larger max_length"
            )
        if keys.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"KV cache was set up for batch size {self.keys.shape[0]}, got {keys.shape[0]}"
            )
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]


def causal_keep_mask(num_queries: int, num_keys: int, device) -> torch.Tensor:
    """Bool [Lq, Lk], True where query i (the last Lq of Lk positions) may see key j."""
    offset = num_keys - num_queries
    rows = torch.arange(num_queries, device=device).unsqueeze(1)
    cols = torch.arange(num_keys, device=device).unsqueeze(0)
    return cols <= rows + offset


def own_position_mask(num_queries: int, num_keys: int, device) -> torch.Tensor:
    """Bool [Lq, Lk], True only where key j is query i's own position."""
    offset = num_keys - num_queries
    rows = torch.arange(num_queries, device=device).unsqueeze(1)
    cols = torch.arange(num_keys, device=device).unsqueeze(0)
    return cols == rows + offset


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with three interchangeable implementations."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.kv_cache: KVCache | None = None
        self.last_max_score: torch.Tensor | None = None  # filled when track_stats is on
        self.track_stats = False

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                start_pos: int | None = None, relax_output: bool = False) -> torch.Tensor:
        batch, length, hidden = x.shape
        qkv = self.query_key_value(x)  # (B, T, 3C)
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each (B, nh, T, hd)
        if start_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("start_pos given but no KV cache: call model.setup_kv_cache first")
            key, value = self.kv_cache.update(start_pos, key, value)

        impl = self.config.attention
        if impl == "sdpa":
            context = self._sdpa(query, key, value, key_mask)
        else:
            context = self._softmax_attention(query, key, value, key_mask, fused=impl == "pb_relax")
        context = context.transpose(1, 2).reshape(batch, length, hidden)  # (B, T, C)
        if relax_output:
            return relaxed_linear(context, self.dense)
        return self.dense(context)

    def _scores(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Raw scores and the factor the softmax multiplies back (alpha, or 1 without PB-relax)."""
        alpha = self.config.pb_relax_alpha if self.config.pb_relax else 1.0
        # PB-relax: scale Q down by alpha*sqrt(d) *before* the product, so Q K^T cannot overflow.
        query = query / (alpha * math.sqrt(self.head_dim))
        scores = query @ key.transpose(-2, -1)  # (B, nh, Lq, Lk)
        if self.track_stats:
            self.last_max_score = (scores.detach().abs().amax() * alpha).float()
        return scores, alpha

    def _softmax_attention(self, query, key, value, key_mask, fused: bool) -> torch.Tensor:
        scores, alpha = self._scores(query, key)
        mask = None if key_mask is None else key_mask[:, None, :]  # (B, 1, Lk) over heads
        softmax = pb_relax_softmax if fused else pb_relax_softmax_reference
        probs = softmax(scores, alpha=alpha, causal=True, key_mask=mask)
        probs = F.dropout(probs, self.config.attention_dropout, self.training)
        return probs.to(value.dtype) @ value  # (B, nh, Lq, hd)

    def _sdpa(self, query, key, value, key_mask) -> torch.Tensor:
        num_queries, num_keys = query.shape[2], key.shape[2]
        dropout = self.config.attention_dropout if self.training else 0.0
        if self.track_stats:
            self._scores(query, key)
        if key_mask is None and num_queries == num_keys:
            return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True)
        keep = causal_keep_mask(num_queries, num_keys, query.device)  # (Lq, Lk)
        if key_mask is not None:
            keep = keep & key_mask[:, None, None, :]  # (B, 1, Lq, Lk)
            # A padding query may see no key at all, which SDPA turns into NaN that then
            # leaks through 0 * NaN in later layers; let every query see itself instead.
            keep = keep | own_position_mask(num_queries, num_keys, query.device)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=keep, dropout_p=dropout)


class MLP(nn.Module):
    """Two linear layers with GELU(tanh) between them, as CogView."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        inner = config.mlp_ratio * config.hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, inner)
        self.dense_4h_to_h = nn.Linear(inner, config.hidden_size)
        self.last_max_activation: torch.Tensor | None = None
        self.track_stats = False

    def forward(self, x: torch.Tensor, relax_output: bool = False) -> torch.Tensor:
        hidden = F.gelu(self.dense_h_to_4h(x), approximate="tanh")  # (B, T, 4C)
        if self.track_stats:
            self.last_max_activation = hidden.detach().abs().amax().float()
        if relax_output:
            return relaxed_linear(hidden, self.dense_4h_to_h)
        return self.dense_4h_to_h(hidden)


class Block(nn.Module):
    """One transformer layer: Sandwich-LN (or pre-LN) around attention and MLP."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        eps, relax = config.layernorm_eps, config.pb_relax
        self.sandwich_ln = config.sandwich_ln
        self.input_layernorm = LayerNorm(config.hidden_size, eps, relax)
        self.attention = SelfAttention(config)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps, relax)
        self.mlp = MLP(config)
        if config.sandwich_ln:
            self.third_layernorm = LayerNorm(config.hidden_size, eps, relax)
            self.fourth_layernorm = LayerNorm(config.hidden_size, eps, relax)
        self.dropout = nn.Dropout(config.dropout)
        # With a PB-relaxed LN after each branch, the branch's output projection can be
        # computed on max-normalised inputs (exact, since that LN is scale-invariant).
        self.relax_branches = config.sandwich_ln and config.pb_relax

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                start_pos: int | None = None) -> torch.Tensor:
        branch = self.attention(self.input_layernorm(x), key_mask, start_pos, self.relax_branches)
        if self.sandwich_ln:
            branch = self.third_layernorm(branch)
        x = x + self.dropout(branch)
        branch = self.mlp(self.post_attention_layernorm(x), self.relax_branches)
        if self.sandwich_ln:
            branch = self.fourth_layernorm(branch)
        return x + self.dropout(branch)


class CogViewTransformer(nn.Module):
    """Decoder-only transformer over [image codes | text ids | command tokens]."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layernorm = LayerNorm(config.hidden_size, config.layernorm_eps, config.pb_relax)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); residual projections scaled by 1/sqrt(2 * layers)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("attention.dense") or name.endswith("dense_4h_to_h")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # --------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, start_pos: int | None = None,
                logits_range: tuple[int, int] | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Next-token logits [B, T, V] for ``input_ids`` [B, T].

        position_ids: [B, T] or [T]; default ``start_pos + arange(T)``.
        attention_mask: bool [B, Lk], True = real token; Lk = T, or with a KV cache
            ``start_pos + T`` (the mask over everything cached so far).
        start_pos: use the KV cache (``setup_kv_cache``): write this chunk's keys and
            values at ``start_pos`` and attend to all cached positions before it.
        logits_range: (lo, hi) computes logits only for vocabulary ids [lo, hi), a slice
            of the tied embedding (e.g. image codes while sampling an image).
        return_hidden: return the final hidden states [B, T, C] instead of logits.
        """
        batch, length = input_ids.shape
        offset = 0 if start_pos is None else start_pos
        if position_ids is None:
            position_ids = torch.arange(offset, offset + length, device=input_ids.device)
        if int(position_ids.max()) >= self.config.max_positions:
            raise ValueError(
                f"position {int(position_ids.max())} is beyond model.max_positions="
                f"{self.config.max_positions}; shorten the sequence or raise max_positions"
            )
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = self.embedding_dropout(x)  # (B, T, C)
        recompute = (self.config.activation_checkpointing and self.training
                     and torch.is_grad_enabled() and start_pos is None)
        for layer in self.layers:
            if recompute:
                x = checkpoint(layer, x, attention_mask, start_pos, use_reentrant=False)
            else:
                x = layer(x, attention_mask, start_pos)
        hidden = self.final_layernorm(x)
        if return_hidden:
            return hidden
        return self.logits(hidden, logits_range)

    def logits(self, hidden: torch.Tensor, logits_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Tied output head: hidden [B, T, C] -> logits [B, T, V or hi - lo]."""
        weight = self.word_embeddings.weight
        if logits_range is not None:
            weight = weight[logits_range[0]:logits_range[1]]
        return F.linear(hidden, weight)

    # -------------------------------------------------------------- KV cache
    def setup_kv_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> None:
        """Preallocates per-layer key/value buffers for (batch_size, max_length)."""
        if max_length > self.config.max_positions:
            raise ValueError(
                f"max_length={max_length} exceeds model.max_positions={self.config.max_positions}"
            )
        weight = self.word_embeddings.weight
        dtype = dtype or weight.dtype
        device = device or weight.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                batch_size, self.config.num_heads, max_length, self.config.head_dim, dtype, device
            )

    def reorder_kv_cache(self, index: torch.Tensor, start: int | None = None,
                         end: int | None = None) -> None:
        """Keeps cache rows ``index`` (LongTensor [N']) in that order: beam search follows each
        beam's parent, and repeating a prefilled prompt's rows starts its beams. With ``start``
        and ``end`` (same number of rows) only positions [start, end) are reordered in place,
        for rows that agree elsewhere (the beams of one prompt share the prompt's keys)."""
        for layer in self.layers:
            cache = layer.attention.kv_cache
            if cache is None:
                raise RuntimeError("reorder_kv_cache without a KV cache: call setup_kv_cache first")
            if start is None and end is None:
                cache.keys = cache.keys.index_select(0, index)
                cache.values = cache.values.index_select(0, index)
                continue
            if index.numel() != cache.keys.shape[0]:
                raise ValueError(f"a partial reorder keeps the batch size {cache.keys.shape[0]}; "
                                 f"got {index.numel()} rows")
            span = slice(start, end)
            cache.keys[:, :, span] = cache.keys[index, :, span]
            cache.values[:, :, span] = cache.values[index, :, span]

    def clear_kv_cache(self) -> None:
        """Frees the KV cache buffers."""
        for layer in self.layers:
            layer.attention.kv_cache = None

    # ------------------------------------------------------------ monitoring
    def track_stats(self, enabled: bool = True) -> None:
        """Record per-layer max |attention score| and max |MLP activation| on forward."""
        for layer in self.layers:
            layer.attention.track_stats = enabled
            layer.mlp.track_stats = enabled

    def layer_stats(self) -> dict[str, float]:
        """The last recorded per-layer maxima (see ``track_stats``)."""
        stats = {}
        for index, layer in enumerate(self.layers):
            if layer.attention.last_max_score is not None:
                stats[f"layer{index}/max_attention_score"] = float(layer.attention.last_max_score)
            if layer.mlp.last_max_activation is not None:
                stats[f"layer{index}/max_activation"] = float(layer.mlp.last_max_activation)
        return stats

    # ---------------------------------------------------------- persistence
    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count (the tied output head counted once)."""
        return count_parameters(self, trainable_only)

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes ``model.safetensors`` and ``config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"kind": CONFIG_KIND, **asdict(self.config)}
        (directory / MODEL_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))
        save_model(self, str(directory / MODEL_WEIGHTS))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, **overrides) -> "CogViewTransformer":
        """Loads a model written by ``save_pretrained``; ``overrides`` change config fields
        that do not affect the weights (e.g. ``attention="sdpa"``).

        The model is built on the meta device and takes the file's tensors as they are (no
        random init, no second copy), cast to ``dtype`` (default float32): a 4B fp16 export
        loads with ``dtype=torch.float16`` in about its file size of memory.
        """
        directory = Path(directory)
        config_path, weights_path = directory / MODEL_CONFIG, directory / MODEL_WEIGHTS
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: expected a directory written by save_pretrained "
                    "(config.json + model.safetensors)"
                )
        values = json.loads(config_path.read_text())
        if values.get("kind", CONFIG_KIND) != CONFIG_KIND:
            raise ValueError(f"{config_path} describes a {values.get('kind')!r}, not a {CONFIG_KIND}")
        values.update(overrides)
        config = TransformerConfig.from_dict(values)
        with torch.device("meta"):
            model = cls(config)
        state = load_file(str(weights_path), device=str(map_location))
        check_finite(state, weights_path)
        dtype = dtype or torch.float32
        state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                 for name, tensor in state.items()}
        check_state_dict(model.state_dict(), state, f"{weights_path} does not match {config_path}:")
        model.load_state_dict(state, strict=True, assign=True)
        return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
