"""A compact decoder-only transformer for Qwen2 / Qwen2.5 / Qwen3, Llama and Mistral checkpoints (gpt-fast style).

Parameter names are the Hugging Face ones, so a checkpoint's state dict loads as is and a trained model saves
back as one.  The attention takes an explicit boolean mask (True = may attend) instead of a causal flag:
TiDAR passes mix causal and bidirectional rows, and the mask always comes from `tidar_megatron.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tidar_megatron.hf.rope import inverse_frequencies


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None   # linear / llama3 / yarn, in hf.rope's normalised form; None = plain RoPE
    attention_bias: bool = False       # q/k/v biases (Qwen2); o_proj never has one in these families
    qk_norm: bool = False              # per-head RMSNorm of q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, as the reference implementations do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """Static, preallocated keys and values of one layer: [batch, slots, kv_heads, head_dim]."""

    def __init__(self, batch_size, num_slots, num_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, num_slots, num_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, slots, k, v, rows=None):
        """slots [b, s] cache slot of each new token; k, v [b, s, kv_heads, head_dim]; rows [b]: the cache rows
        they belong to (default 0..b-1)."""
        rows = (torch.arange(k.shape[0], device=k.device) if rows is None else rows)[:, None]
        self.k[rows, slots] = k
        self.v[rows, slots] = v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, cache_slots=None, num_keys=None, layout=None, cache_rows=None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache_slots is not None:
            self.kv_cache.write(cache_slots, k, v, cache_rows)
            if cache_rows is None:  # rows 0..b-1: a view, no copy
                k, v = self.kv_cache.k[:b, :num_keys], self.kv_cache.v[:b, :num_keys]
            else:
                k, v = self.kv_cache.k[cache_rows, :num_keys], self.kv_cache.v[cache_rows, :num_keys]
        if layout is not None:  # the Triton kernel: tiles from the layout's rule, no dense mask
            from tidar_kernels.tidar_attention import tidar_attention
            out = tidar_attention(q, k, v, layout, q_offset=layout.seq_len - s)
            return self.o_proj(out.reshape(b, s, -1))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask[:, None], enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache_slots, num_keys, layout=None, cache_rows=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_slots, num_keys, layout, cache_rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_attention_factor = inverse_frequencies(args.rope_theta, args.head_dim, args.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def setup_kv_cache(self, batch_size: int, num_slots: int):
        """Preallocates every layer's cache, used by calls to `forward` that pass `cache_slots`.

        A cache of the same batch size with enough slots is kept: compiled steps then see the same buffers
        and are not recompiled.  Stale entries are harmless, the attention masks never admit them.
        """
        current = self.model.layers[0].self_attn.kv_cache
        if current is not None and current.k.shape[0] == batch_size and current.k.shape[1] >= num_slots:
            return
        p = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, num_slots, self.args.num_kv_heads,
                                               self.args.head_dim, p.dtype, p.device)

    def drop_kv_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def forward(self, tokens, positions, mask, cache_slots=None, num_keys=None, layout=None, cache_rows=None):
        """tokens, positions [b, s]; mask [b or 1, s, keys] bool, True = may attend.

        Without `cache_slots` the keys are the s tokens themselves (training, parity checks).  With them, the
        new keys and values are written to the cache (`setup_kv_cache`) at `cache_slots` [b, s] and the
        queries attend to cache slots [0, num_keys).  `cache_rows` [b]: the cache rows of the batch's
        sequences (default 0..b-1; a server's sequences come and go).  Returns logits [b, s, V].

        `layout`: a TiDARLayout shared by the whole batch whose rows are the keys (num_keys == seq_len) and
        whose last s rows are the queries.  Attention then runs in the TiDAR Triton kernel and `mask` is
        not used (it may be None).
        """
        freqs = positions[..., None].float() * self.inv_freq  # [b, s, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]   # [b, s, 1, head_dim]: broadcast over heads
        x = self.model.embed_tokens(tokens)
        scale = self.rope_attention_factor  # YaRN's factor on cos and sin; 1 otherwise
        cos, sin = (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache_slots, num_keys, layout, cache_rows)
        return self.lm_head(self.model.norm(x))
