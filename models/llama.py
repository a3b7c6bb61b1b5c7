"""A Llama decoder whose state_dict is byte-for-byte Hugging Face's LlamaForCausalLM layout.

Module names mirror transformers' so `save_pretrained` output loads with
`transformers.LlamaForCausalLM.from_pretrained` and gives the same logits.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares overflows/underflows in bf16/fp16, so normalize in fp32.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, L, head_dim] for the given positions, in fp32.

    Computed per forward rather than kept as a buffer: it is tiny, and a buffer
    would be silently downcast by `model.to(torch.bfloat16)`, degrading positions.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / theta**exponents
    freqs = position_ids[..., None].float() * inv_freq
    # HF convention: the two halves of the head dim form the rotated pairs (not interleaved).
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, L, D]; cos/sin: [B, L, D] broadcast over heads.
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated per-layer key/value buffers [B, n_kv_heads, max_len, head_dim].

    Buffers are allocated on the first write, in the dtype/device of the incoming
    keys, so the cache matches whatever autocast or `.to()` the model runs under.
    `length` counts the positions already stored; the model advances it once per
    forward, after every layer has written.
    """

    def __init__(self, config: ModelConfig, max_len: int):
        self.num_layers = config.num_hidden_layers
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values [B, n_kv, L, D] and return all of them so far."""
        if not self.keys:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys = [k.new_zeros(shape) for _ in range(self.num_layers)]
            self.values = [v.new_zeros(shape) for _ in range(self.num_layers)]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} positions > max_len {self.max_len}")
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        if self.n_kv_heads != self.n_heads:
            # GQA: query head h reads kv head h // n_rep (HF's repeat_kv order).
            n_rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting only real ones, so a left-padded prompt starts at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, past: int, device) -> torch.Tensor:
    """Boolean mask (True = may attend) for queries at positions past..past+q_len-1.

    Returns [q_len, S] for causality alone, or [B, 1, q_len, S] with padding.
    """
    q_pos = torch.arange(past, past + q_len, device=device)[:, None]
    k_pos = torch.arange(past + q_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
        # A left-padding query row would otherwise mask every key and softmax to NaN;
        # letting each position see itself keeps it finite without touching real rows.
        mask = mask | (k_pos == q_pos)
    return mask


def packed_attention_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, L, L] causal mask within each sequence of packed rows, whose position ids restart
    where a sequence starts (any step other than +1 starts one, as transformers reads them);
    None when every row is a single sequence."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not starts[:, 1:].any():
        return None
    sequence = starts.cumsum(-1)
    L = position_ids.shape[-1]
    causal = torch.ones((L, L), dtype=torch.bool, device=position_ids.device).tril()
    return ((sequence[:, :, None] == sequence[:, None, :]) & causal)[:, None]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers)),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
        # Tied: no lm_head module at all, so the state_dict has no shared tensors and
        # matches HF's tied layout (embed_tokens only).
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2 scaling: each block adds two residual branches, so shrink their output
        # projections to keep the residual stream's variance independent of depth.
        residual_std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def final_norm(self) -> nn.Module:
        """The module whose output the head reads. A tied head is a matmul, not a module, so this
        is where trainers/scoring.py cuts the positions down to the labelled ones."""
        return self.model.norm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [B, L, V] in the compute dtype.

        attention_mask: [B, past + L], 1 = real token, 0 = padding.
        position_ids without attention_mask: packed rows, one sequence wherever they restart.
        kv_cache: filled in place; later calls pass only the new tokens.
        logits_to_keep: n > 0 gives only the last n positions' logits [B, n, V], as transformers'
        argument of that name: a prompt's prefill needs the last one only, and the head is the
        largest matmul of a small model.
        """
        B, L = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + L):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != (batch, past + new) = {(B, past + L)}"
            )
        if position_ids is None:
            if attention_mask is not None:
                # Count only real tokens so a left-padded prompt starts at position 0.
                position_ids = positions(attention_mask)[:, past:]
            else:
                position_ids = torch.arange(past, past + L, device=input_ids.device).expand(B, L)

        # No mask and no cache is the common training case: SDPA's is_causal fast path.
        mask = None
        if attention_mask is not None or past > 0:
            mask = build_attention_mask(attention_mask, L, past, input_ids.device)
        elif position_ids is not None:  # packed rows: each example attends to itself only
            mask = packed_attention_mask(position_ids)

        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, kv_cache)
        x = self.model.norm(x)
        if kv_cache is not None:
            kv_cache.length += L
        if logits_to_keep:
            x = x[:, -logits_to_keep:]

        if self.config.tie_word_embeddings:
            return F.linear(x, self.model.embed_tokens.weight)
        return self.lm_head(x)
