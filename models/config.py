"""Model hyperparameters, named presets and the FLOPs estimate used for MFU."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    # Reject unknown fields so a typo in a YAML config fails loudly instead of
    # silently training the default model.
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(2048, gt=0)
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(384, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)  # None = no GQA
    max_position_embeddings: int = Field(256, gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool = True
    initializer_range: float = Field(0.02, gt=0)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @model_validator(mode="after")
    def _check_head_layout(self) -> "ModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.kv_heads})"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def num_parameters(self) -> int:
        """Exact parameter count of `LlamaForCausalLM(self)`, without building it."""
        d, kv = self.hidden_size, self.kv_heads * self.head_dim
        attn = 2 * d * d + 2 * d * kv  # q, o and k, v projections
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d  # two RMSNorm weights
        embed = self.vocab_size * d
        lm_head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_hidden_layers * per_layer + d + lm_head

    def to_dict(self) -> dict[str, Any]:
        """The config as transformers' configs give it: peft reads the model's through this."""
        return self.to_hf_dict()

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that `transformers.LlamaForCausalLM.from_pretrained` accepts."""
        d = self.model_dump()
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            mlp_bias=False,
            head_dim=self.head_dim,
            num_key_value_heads=self.kv_heads,
            # transformers >= 5 reads rope_theta from here; older versions read the flat key.
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            torch_dtype="float32",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        # Scaled RoPE variants (llama3, yarn, ...) would load fine but give wrong logits.
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope['rope_type']!r}; only 'default' is implemented")
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        return cls(**{k: v for k, v in d.items() if k in cls.model_fields})


PRESETS: dict[str, ModelConfig] = {
    # ~1.1M params: trains on a laptop CPU in minutes; used by tests and tutorials.
    "tiny": ModelConfig(),
    # GPT-2 small shape (~124M) with Llama blocks; vocab padded to a multiple of 64 for matmul speed.
    "gpt2-small": ModelConfig(
        vocab_size=50304,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh, validated copy of a preset (mutating it never changes `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return ModelConfig(**{**PRESETS[name].model_dump(), **overrides})


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, PaLM appendix B / nanoGPT style.

    6 * N covers every weight matmul (2 FLOPs per multiply-add forward, 4 backward).
    N counts the weights that actually take part in a matmul: all block weights, the
    norms (negligible) and the V x d output projection. The input embedding is a
    gather with no FLOPs, so an untied embedding table is left out; with tied
    embeddings the shared matrix is counted once, as the output projection.
    12 * L * H * Q * T is the attention score and value matmuls (QK^T and AV) over
    the full T x T square, ignoring the causal half, as PaLM does.
    """
    c = config
    n = c.num_parameters()
    if not c.tie_word_embeddings:
        n -= c.vocab_size * c.hidden_size
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
    return float(6 * n + attn)
