"""Model configuration: one dataclass with Hugging Face Llama field names, and named presets.

The defaults are SmolLM2-135M exactly, so `ModelConfig()` is the real model and a preset is
only a set of overrides (`ModelConfig.from_name("tiny", num_hidden_layers=1)`). Beside it, what a
configuration costs: parameters, training FLOPs per token and a training step's memory
(`estimate_memory`, which knows the optimizer).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from smollm.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 49152  # the SmolLM2 tokenizer's vocabulary
    hidden_size: int = 576  # width of the residual stream
    intermediate_size: int = 1536  # width of the SwiGLU MLP
    num_hidden_layers: int = 30  # decoder layers
    num_attention_heads: int = 9  # query heads
    num_key_value_heads: int = 3  # key/value heads; 3 query heads share each (GQA)
    head_dim: int = 64  # hidden_size // num_attention_heads for every model of this family
    max_position_embeddings: int = 8192  # longest context SmolLM2 was trained for
    rope_theta: float = 100000.0  # RoPE base; SmolLM2 raised it from 10k for the 8k context
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    initializer_range: float = 0.0417  # std of the normal init, 1/sqrt(576) as SmolLM2 used

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"ModelConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"ModelConfig: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig: head_dim {self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.initializer_range <= 0:
            raise ConfigError("ModelConfig: rope_theta, rms_norm_eps and initializer_range must be > 0")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset, optionally with some fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def diff(self, other: "ModelConfig") -> list[str]:
        """Human-readable `field: ours != theirs` for every field that differs."""
        out = []
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            same = math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) else a == b
            if not same:
                out.append(f"{f.name}: {a} != {b}")
        return out

    @property
    def num_params(self) -> int:
        """Number of parameters of `SmolLM(self)` (a tied head is counted once)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        layer = attention + mlp + 2 * h  # + two RMSNorm weights
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_hidden_layers * layer + h + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

        6 FLOPs per matmul weight (2 forward, 4 backward) for every projection and the lm head,
        plus attention's QK^T and AV: 6 * 2 * n_layers * (n_heads * head_dim) * seq_len, counted
        without the causal halving as PaLM's appendix B does. Embedding lookups and norms are
        free. For 135m at T=2048 this is about 1.23 GFLOP. MFU = tokens/s * this / peak FLOP/s.
        """
        h, q = self.hidden_size, self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        matmul_per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size
        matmul = self.num_hidden_layers * matmul_per_layer + self.vocab_size * h  # + lm head
        attention = 12 * self.num_hidden_layers * q * seq_len
        return 6 * matmul + attention


@dataclass(frozen=True)
class MemoryEstimate:
    """Rough peak bytes of one process's training step, by part (see `estimate_memory`)."""

    weights: int
    gradients: int
    optimizer: int  # the optimizer's state: AdamW two moments a parameter, Muon one momentum a matrix
    activations: int  # kept for the backward pass
    logits: int  # two chunks of float32 logits in the chunked cross entropy

    @property
    def model_and_optimizer(self) -> int:
        """Weights, gradients and optimizer state: what any batch needs before its activations."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_and_optimizer + self.activations + self.logits


def estimate_memory(config: ModelConfig, batch_size: int = 0, seq_len: int = 0, *, optimizer: str = "adamw",
                    bf16: bool = False, loss_chunk_size: int = 8192, trainable: int | None = None) -> MemoryEstimate:
    """Rough peak bytes of a training step at micro-batch `batch_size` x `seq_len` (0 x 0: the
    weights, gradients and optimizer state alone). Float32 weights and gradients (8 bytes a
    parameter); AdamW keeps two float32 moments a parameter (8 bytes), while with optimizer "muon"
    the decoder layers' projection matrices have Muon's one momentum buffer (4 bytes) and the rest
    (embedding, head, norms) AdamW's two; activations kept for the backward pass (about 8
    hidden-size, 2 key/value and 4 MLP-size values per token per layer, in the compute dtype); two
    chunks of float32 logits. It errs high: 45.8 GiB for 135m with AdamW at 32 x 2048 in bf16, where
    an H100 measured 37.7 GiB (compiled). `trainable`: the parameters that train, when not all do
    (LoRA: the adapters, with AdamW); only they have gradients and optimizer state."""
    c = config
    kv = c.num_key_value_heads * c.head_dim
    q = c.num_attention_heads * c.head_dim
    if optimizer == "muon":  # q, k, v, o, gate, up and down of every layer (smollm.optim.parameter_groups)
        muon = c.num_hidden_layers * (c.hidden_size * q + 2 * c.hidden_size * kv + q * c.hidden_size
                                      + 3 * c.hidden_size * c.intermediate_size)
    elif optimizer == "adamw":
        muon = 0
    else:
        raise ConfigError(f"unknown optimizer {optimizer!r}: adamw or muon")
    state = 8 * (c.num_params - muon) + 4 * muon
    per_token = c.num_hidden_layers * (8 * c.hidden_size + 2 * kv + 4 * c.intermediate_size)
    activations = batch_size * seq_len * per_token * (2 if bf16 else 4)
    logits = 2 * min(loss_chunk_size, batch_size * seq_len) * c.vocab_size * 4
    if trainable is not None:
        return MemoryEstimate(weights=4 * (c.num_params + trainable), gradients=4 * trainable, optimizer=8 * trainable,
                              activations=activations, logits=logits)
    return MemoryEstimate(weights=4 * c.num_params, gradients=4 * c.num_params, optimizer=state,
                          activations=activations, logits=logits)


# The SmolLM2 family, field for field as its published config.json files (HuggingFaceTB/SmolLM2-135M,
# -360M, -1.7B), read from the copies quoted in Lightning-AI/litgpt litgpt/config.py (commit 293089e,
# which links each config.json: block_size = max_position_embeddings, n_query_groups =
# num_key_value_heads, rope_base = rope_theta, norm_eps = rms_norm_eps), huggingface/nanoVLM
# models/config.py (the SmolLM2-360M-Instruct values) and a verbatim SmolLM2-1.7B-Instruct config.json
# (initializer_range 0.02, rope_theta 130000). All three: vocabulary 49152, head_dim 64, context 8192,
# RMSNorm eps 1e-5, SwiGLU, no biases, tied embeddings. tests/test_model.py checks the counts.
PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M: the defaults above; 134,515,008 parameters.
    "135m": {},
    # SmolLM2-360M: 361,821,120 parameters. 32 layers of width 960, MLP 2560, 15 query heads
    # sharing 5 key/value heads (GQA 3:1, as 135M), rope_theta 100000. initializer_range only
    # seeds a fresh run (0.02, as 1.7B's config.json; no verbatim 360M value was found).
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                 num_attention_heads=15, num_key_value_heads=5, initializer_range=0.02),
    # SmolLM2-1.7B: 1,711,376,384 parameters. 24 layers of width 2048, MLP 8192, 32 heads of 64 and
    # no GQA (32 key/value heads), rope_theta 130000, initializer_range 0.02.
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0,
                 initializer_range=0.02),
    # A 3.2M-parameter debug flavor with the real vocabulary, so the real tokenizer works with it.
    # Same structure (GQA 4:2, tied head, SwiGLU); trains on CPU in seconds.
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=1024, initializer_range=0.125),
}
