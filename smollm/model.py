"""SmolLM: a Llama-style decoder, read top to bottom, smallest piece first.

RMSNorm -> rotary embedding -> per-document attention -> Attention (GQA through SDPA) -> MLP (SwiGLU)
-> DecoderLayer -> SmolLM. Module names are Hugging Face Llama's, so converting weights is a key
rename. Shapes: B batch, T new tokens, S cached + new tokens, C hidden_size, V vocab_size.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from smollm.config import ModelConfig


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x's device run in: autocast's when it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back, exactly as Hugging Face does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos and sin tables for RoPE in the rotate_half form: frequencies repeated, not interleaved.

    The inverse frequencies stay float32 whatever the model is cast to. A cast rounds buffers too
    (bf16-true, `.half()`, `.to(dtype)`, and FSDP under bf16-mixed through its buffer_dtype): in
    bf16 they are off by up to 0.3%, which is 2 radians of angle at position 1500, so training would
    rotate otherwise than inference. `forward` restores them exactly whenever it finds them cast.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.float32_inv_freq(), persistent=False)

    def float32_inv_freq(self) -> torch.Tensor:
        """1 / theta^(2i / head_dim), computed in float32 on the CPU, as transformers does."""
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def reset_inv_freq(self) -> None:
        self.inv_freq = self.float32_inv_freq().to(self.inv_freq.device)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, sin (T, head_dim); positions (B, T), one row each -> (B, 1, T, head_dim)."""
        if self.inv_freq.dtype != torch.float32:
            self.reset_inv_freq()
        freqs = positions.float()[..., None] * self.inv_freq  # (T, head_dim / 2) or (B, T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim) or (B, T, head_dim)
        if positions.dim() == 2:
            emb = emb[:, None]  # (B, 1, T, head_dim): one row of positions per sequence, shared by the heads
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # cos, sin (T, head_dim) or (B, 1, T, head_dim) broadcast over x


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids (B, T) -> (B, T): the index of the first token of each token's document.

    A document starts wherever the id differs from the previous token's, so ids need only change at
    each boundary (the batch contract makes them non-decreasing); a token's RoPE position is its
    index minus this, and it attends to the keys from this index to itself."""
    T = document_ids.shape[1]
    index = torch.arange(T, device=document_ids.device)
    new = torch.ones_like(document_ids, dtype=torch.bool)
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(new, index, 0).cummax(dim=1).values  # (B, T)


def document_mask(starts: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask of SDPA, (B, 1, T, T) bool: query i sees key j when j lies in
    [starts[i], i]. Built once per forward and shared by every layer."""
    index = torch.arange(starts.shape[1], device=starts.device)
    keys = index[None, None, :]  # (1, 1, T)
    mask = (keys <= index[None, :, None]) & (keys >= starts[:, :, None])  # (B, T, T)
    return mask[:, None]  # (B, 1, T, T), broadcast over heads


def document_block_mask(starts: torch.Tensor) -> Any:
    """The same mask as a flex_attention BlockMask: blocks of keys wholly outside a query block's
    documents are skipped rather than computed and masked."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q, kv):
        return (kv <= q) & (kv >= starts[b, q])

    B, T = starts.shape
    return create_block_mask(visible, B, None, T, T, device=starts.device, _compile=True)


_compiled_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, gqa: bool) -> torch.Tensor:
    """torch's flex_attention, compiled once per process (uncompiled it materializes every score).
    On CPU torch 2.13 has its forward only: use it there to score, not to train."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


@functools.cache
def torch_varlen_attn() -> Any:
    """torch's flash varlen attention where it has causal windows and GQA (torch 2.13 has), else None.
    Looked up on first use: its module imports torch._dynamo, ~1.7 s of every process's start on CPU."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn if {"window_size", "enable_gqa"} <= inspect.signature(varlen_attn).parameters.keys() else None


@functools.cache
def flash_capable(device: torch.device) -> bool:
    """Whether torch's flash kernels run on this CUDA device: Ampere (sm80) or newer."""
    return torch.cuda.get_device_capability(device)[0] >= 8


class DocumentSpans:
    """A packed batch's documents as spans of its tokens read row after row (B x T of them), the form
    varlen attention takes: document i is tokens bounds[i]:bounds[i + 1] (a row's start always starts
    one). Built once per forward from `document_starts`, with the one read of the boundaries to the
    host that the per-document loop and the kernel's max_len need (on CUDA a packed batch's forward
    thus waits for the GPU once), and shared by every layer."""

    def __init__(self, starts: torch.Tensor) -> None:
        B, T = starts.shape
        first = (starts == torch.arange(T, device=starts.device)).flatten().cpu()  # (B*T,): a document starts here
        self.bounds = torch.nonzero(first).flatten().tolist() + [B * T]
        self.spans = list(zip(self.bounds[:-1], self.bounds[1:]))
        self.max_len = max(end - start for start, end in self.spans)
        self.cu_seqlens = torch.tensor(self.bounds, dtype=torch.int32).to(starts.device)  # varlen_attn's, (n + 1,)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: DocumentSpans,
                     gqa: bool) -> torch.Tensor:
    """Causal attention within each document, computing no query-key pair across documents.
    q (B, n_heads, T, hd), k and v (B, n_kv, T, hd) -> (B, n_heads, T, hd).

    On CUDA in bf16 or fp16: torch's flash `varlen_attn` over the flattened batch, one kernel for
    all the documents. Elsewhere (CPU, float32, a torch or GPU without it): causal SDPA over each
    document's slice alone, the outputs concatenated back; on CPU the mask's numbers within rounding."""
    B, H, T, D = q.shape
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v))  # (B*T, heads, hd)
    flash = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and flash_capable(q.device)
    kernel = torch_varlen_attn() if flash else None
    if kernel is not None:
        cu, n = documents.cu_seqlens, documents.max_len
        y = kernel(q, k, v, cu, cu, n, n, window_size=(-1, 0), enable_gqa=gqa)  # (B*T, n_heads, hd)
    else:
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # (1, heads, B*T, hd)
        y = torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                      enable_gqa=gqa)[0].transpose(0, 1)  # (e - s, n_heads, hd)
                       for s, e in documents.spans])  # (B*T, n_heads, hd)
    return y.view(B, T, H, D).transpose(1, 2)  # (B, n_heads, T, hd)


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    `SmolLM.forward(ids, cache)` writes the new tokens' keys and values at `cache.length` and
    advances it; attention then reads everything written so far. No concatenation per step.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length,
                 config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0  # tokens written so far (the same for every layer once a forward ends)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KVCache holds {self.max_length} tokens; {end} were asked for")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv_heads, S, head_dim)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        C, q_dim, kv_dim = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(C, q_dim, bias=False)
        self.k_proj = nn.Linear(C, kv_dim, bias=False)
        self.v_proj = nn.Linear(C, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, C, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, documents: Any = None) -> torch.Tensor:
        """Causal self-attention; `documents` says what each query may see, and so which kernel runs:

        - None: the whole row, causally (plain windows, and decoding with `cache`): SDPA, is_causal;
        - DocumentSpans (a packed row, `document_attention` "varlen", the default): only its own
          document's earlier tokens, each document attended to on its own (`varlen_attention`:
          flash varlen on CUDA in bf16/fp16, causal SDPA per document elsewhere); no pair across
          documents is computed;
        - a bool (B, 1, T, T) tensor ("sdpa", and "varlen" under torch.compile): SDPA with that
          block-diagonal causal mask, every pair of the row computed and the masked ones discarded;
        - a flex_attention BlockMask ("flex"): blocks of pairs across documents skipped."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        mask, is_causal = None, True
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hd), S = past + T
            if past > 0:  # new queries see every cached key and the new keys up to themselves
                is_causal = False
                if T > 1:
                    S = past + T
                    mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
        gqa = self.n_kv_heads != self.n_heads  # each group of n_heads / n_kv_heads query heads shares a kv head
        if documents is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
        elif isinstance(documents, DocumentSpans):
            y = varlen_attention(q, k, v, documents, gqa)
        elif isinstance(documents, torch.Tensor):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=documents, enable_gqa=gqa)
        else:
            y = flex_attention(q, k, v, documents, gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, documents: Any = None) -> torch.Tensor:
        residual = x
        x = self.input_layernorm(x)
        x = self.self_attn(x, cos, sin, cache, documents)
        x = residual + x

        residual = x
        x = self.post_attention_layernorm(x)
        x = self.mlp(x)
        return residual + x


class SmolLM(nn.Module):
    # How a packed row's per-document attention runs (Attention.forward): "varlen" (each document
    # on its own: flash varlen on CUDA, SDPA per document elsewhere; no masked pair computed), "sdpa"
    # (a block-diagonal bool mask over the whole row) or "flex" (flex_attention and a BlockMask; its
    # backward is CUDA's only). Measured side by side: scripts/bench_sft.py, bench_document_attention.py.
    document_attention: str = "varlen"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize for pretraining from scratch.

        Every linear and the embedding draw from N(0, initializer_range), 1/sqrt(hidden_size) for
        SmolLM2, which keeps the residual stream at unit scale at the start; norms start at one.
        Kept apart from __init__ (as torchtitan does) so that a model that is about to receive
        converted weights can skip it, and a meta-device model can be initialized after moving.
        """
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # The inverse frequencies are not a parameter; recompute them in case of a meta init.
        self.rotary.reset_inv_freq()

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """embed -> layers -> norm: the final hidden states, (B, T, C), before the lm head.

        document_ids (B, T): the row holds several documents (a packed row), a new one wherever the
        id changes. Each token then attends only to the earlier tokens of its own document, and RoPE
        positions restart at 0 with each document: every document is scored as if it ran alone.
        What the layers take for it is built once here, for all of them, by `document_attention`:
        "varlen" the documents' spans (the boundaries read to the host once), "sdpa" SDPA's bool mask,
        "flex" a flex_attention BlockMask. Traced by torch.compile (the whole model), "varlen" takes
        the mask: its loop over documents would be a graph per batch. Without document_ids the row
        is one causal sequence (SDPA's is_causal, no mask)."""
        if document_ids is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            documents = None
        else:
            if cache is not None:
                raise ValueError("document_ids are for training and scoring; decoding with a KVCache takes none")
            if document_ids.shape != input_ids.shape:
                raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, "
                                 f"input_ids {tuple(input_ids.shape)}")
            starts = document_starts(document_ids)  # (B, T)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device) - starts  # (B, T)
            kind = self.document_attention
            if kind == "varlen" and not torch.compiler.is_compiling():
                documents = DocumentSpans(starts)
            elif kind == "flex":
                documents = document_block_mask(starts)
            elif kind in ("sdpa", "varlen"):
                documents = document_mask(starts)
            else:
                raise ValueError(f"document_attention is {kind!r}: one of 'varlen', 'sdpa', 'flex'")
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rotary(positions, compute_dtype(x))
        for layer in self.layers:
            # Decoding with a cache runs each layer's eager forward: a compiled layer (see
            # LitSmolLM's compile option) is specialized to training shapes, not a growing cache.
            if cache is not None:
                x = layer.forward(x, cos, sin, cache)
            elif documents is None:
                x = layer(x, cos, sin)
            else:
                x = layer(x, cos, sin, documents=documents)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, *,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, V); document_ids (B, T) as in
        `hidden_states`. Training uses `loss` instead, so that full logits are never held in memory."""
        return self.lm_head(self.hidden_states(input_ids, cache, document_ids))

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None, *,
             document_ids: torch.Tensor | None = None, chunk_size: int = 4096, compiled: bool = False) -> torch.Tensor:
        """Mean next-token cross entropy of the logits at input_ids (B, T) against targets (B, T):
        `F.cross_entropy(self(input_ids).flatten(0, 1), targets.flatten())`, computed from the hidden
        states by `chunked_cross_entropy` (`chunk_size` rows of logits at a time, `compiled` fuses
        each chunk) so that all logits are never held. Training, evaluation and the scripts all
        score through this one entry.

        loss_mask (B, T): a token where it is 0 carries no loss, and the mean is over the tokens
        where it is 1 (a conversation's prompt masked out, its replies scored). With none masked
        in, the loss is 0 and every gradient 0, so that a window of prompt only is not NaN.
        document_ids (B, T), aligned with input_ids: a packed row of documents, each attended to and
        positioned on its own (`hidden_states`). A packed row's loss is the mean over all its scored
        tokens, so it equals the token-weighted mean of its documents' losses run one at a time."""
        hidden = self.hidden_states(input_ids, document_ids=document_ids)  # (B, T, C)
        if loss_mask is not None:
            if loss_mask.shape != targets.shape:
                raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)}, targets {tuple(targets.shape)}")
            keep = loss_mask.bool()
            hidden, targets = hidden[keep], targets[keep]  # (N, C), (N,): the scored tokens only
            if targets.numel() == 0:  # zero, on the graph of every parameter (DDP expects their gradients)
                return (hidden.sum() + self.lm_head.weight[:0].sum()).float() * 0.0
        return chunked_cross_entropy(hidden, self.lm_head.weight, targets, chunk_size, compiled=compiled)

    def sequence_logps(self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, *,
                       chunk_size: int = 4096) -> torch.Tensor:
        """(B,) float32: for each row, the sum of the log-probabilities of its targets where loss_mask
        (B, T) is 1: a reply's log-probability given its prompt, as DPO scores it (TRL's logps). Logits
        are computed for the scored tokens only, `chunk_size` rows at a time, and under autograd each
        chunk is recomputed in the backward pass (activation checkpointing): all logits are never held."""
        hidden = self.hidden_states(input_ids)  # (B, T, C)
        keep = loss_mask.bool()
        rows = keep.nonzero(as_tuple=True)[0]  # the row of each scored token
        hidden, targets = hidden[keep], targets[keep]  # (N, C), (N,)
        weight = self.lm_head.weight
        grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        parts = []
        for start in range(0, targets.numel(), chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            parts.append(checkpoint(token_logps, h, weight, t, use_reentrant=False) if grad else token_logps(h, weight, t))
        sums = torch.zeros(input_ids.shape[0], device=hidden.device, dtype=torch.float32)
        if not parts:  # nothing scored: zeros, on the graph of every parameter (DDP expects their gradients)
            return sums + (hidden.sum() + weight[:0].sum()).float() * 0.0
        return sums.index_add(0, rows, torch.cat(parts))

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) float32 log-probabilities of targets (n,) under the lm head's logits of hidden (n, C)."""
    x = (hidden.to(compute_dtype(hidden)) @ weight.to(compute_dtype(hidden)).t()).float()  # (n, V)
    return x.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For one chunk of logits (n, V) and targets (n,): the sum of the rows' cross entropies and
    its gradient with respect to the logits, softmax - onehot, in the logits' dtype.

    Eager, it works in place over one float32 copy of the chunk (the least memory). Written as
    plain expressions without in-place updates it is also what `torch.compile` fuses into two
    kernels (a row reduction and one pointwise pass), which `SmolLM` uses on a GPU: see
    `compiled_chunk_loss_and_grad`.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    loss = (lse - x.gather(1, targets[:, None]).squeeze(1)).sum()
    if not torch.compiler.is_compiling():
        grad = x.sub_(lse[:, None]).exp_()  # softmax, in place
        grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
        return loss, grad.to(logits.dtype)
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    return loss, (torch.exp(x - lse[:, None]) - onehot.float()).to(logits.dtype)


_compiled_chunk_fn = None


def compiled_chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor):
    """`chunk_loss_and_grad` through torch.compile (compiled once per process, on first use)."""
    global _compiled_chunk_fn
    if _compiled_chunk_fn is None:
        _compiled_chunk_fn = torch.compile(chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk_fn(logits, targets)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of `hidden @ weight.T` against `targets`, one chunk of rows at a time.

    The forward pass computes each chunk's logits (in the autocast dtype), its loss, and at once
    the gradients with respect to `hidden` and `weight`; it then drops the chunk's logits. Peak
    extra memory is about two chunks of logits instead of all of them (16 x 2048 x 49152 float32
    logits are 6.4 GB), and no matmul is repeated. The backward pass only scales the stored
    gradients. A frozen weight (LoRA: the tied embedding / lm head) gets no gradient, and neither
    its (V, C) float32 buffer nor the matmul that fills it.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int, chunk_fn) -> torch.Tensor:
        n = hidden.shape[0]
        dtype = compute_dtype(hidden)
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        frozen = not ctx.needs_input_grad[1]
        grad_weight = None if frozen else torch.zeros_like(weight, dtype=torch.float32)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].to(dtype)
            chunk_loss, grad = chunk_fn(h @ w.t(), targets[start:start + chunk_size])
            loss += chunk_loss
            grad_hidden[start:start + chunk_size] = (grad @ w).to(hidden.dtype)
            if frozen:
                pass
            elif dtype == torch.float32:  # accumulate in place: no (V, C) temporary
                grad_weight.addmm_(grad.t(), h, alpha=1.0 / n)
            else:
                grad_weight.add_(grad.t() @ h, alpha=1.0 / n)
            del grad  # free this chunk's logits before the next chunk allocates its own
        ctx.save_for_backward(grad_hidden.div_(n), None if frozen else grad_weight.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else grad_weight * grad_output
        return grad_hidden * grad_output, grad_weight, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 4096, compiled: bool = False) -> torch.Tensor:
    """Mean next-token cross entropy of the lm head over hidden (..., C) and targets (...),
    equal to `F.cross_entropy(hidden @ weight.T, targets)` without materializing all logits.
    `compiled` fuses each chunk's softmax and gradient into two kernels (torch.compile).
    Without autograd (validation, evaluation) only the loss is computed, no gradient."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        chunk_fn = compiled_chunk_loss_and_grad if compiled else chunk_loss_and_grad
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_size, chunk_fn)
    w = weight.to(compute_dtype(hidden))
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        x = (hidden[start:start + chunk_size].to(w.dtype) @ w.t()).float()  # (chunk, V)
        t = targets[start:start + chunk_size]
        total += (torch.logsumexp(x, dim=-1) - x.gather(1, t[:, None]).squeeze(1)).sum()
    return total / hidden.shape[0]
