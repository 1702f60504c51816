"""The model: size, config checks, parity with transformers, causality, KV cache, loss; the memory estimate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smollm import ModelConfig, SmolLM
from smollm.hf import load_hf, save_hf
from smollm.model import KVCache, chunked_cross_entropy


def ids(batch: int = 2, length: int = 12, seed: int = 1, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_135m_parameter_count():
    config = ModelConfig.from_name("135m")
    with torch.device("meta"):
        model = SmolLM(config)
    assert model.num_params == config.num_params == 134_515_008


# The published config.json of each SmolLM2 (the architecture fields; sources in smollm/config.py).
SMOLLM2_CONFIG_JSON = {
    "360m": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
             "vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
             "num_attention_heads": 15, "num_key_value_heads": 5, "max_position_embeddings": 8192,
             "rope_theta": 100000, "rope_scaling": None, "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
             "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02},
    "1.7b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
             "vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 8192,
             "rope_theta": 130000, "rope_scaling": None, "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
             "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02},
}


@pytest.mark.parametrize("name, n_params", [("360m", 361_821_120), ("1.7b", 1_711_376_384)])
def test_family_presets_are_smollm2_exactly(name, n_params):
    from smollm.hf import config_from_hf

    config = ModelConfig.from_name(name)
    # every field as load_hf would build it from the published config.json
    assert config == config_from_hf(SMOLLM2_CONFIG_JSON[name])
    with torch.device("meta"):
        model = SmolLM(config)
    assert model.num_params == config.num_params == n_params
    assert config.head_dim == config.hidden_size // config.num_attention_heads == 64


# Tiny models of each family member's shape: head_dim 64, the same query:key/value head ratio and
# MLP ratio, the same rope_theta; fewer and narrower layers, a small vocabulary.
FAMILY_SHAPES = {
    "360m": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3,
                 num_key_value_heads=1, head_dim=64, vocab_size=512),  # GQA 3:1, MLP 8/3
    "1.7b": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=64, vocab_size=512),  # no GQA, MLP 4x
}


@pytest.mark.parametrize("name", sorted(FAMILY_SHAPES))
def test_family_shapes_match_transformers_both_ways(tmp_path, name):
    from transformers import LlamaForCausalLM

    config = ModelConfig.from_name(name, **FAMILY_SHAPES[name])
    x = ids(vocab=config.vocab_size)
    torch.manual_seed(0)
    ours = SmolLM(config).eval()
    save_hf(ours, tmp_path / "ours")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="sdpa").eval()
    assert theirs.config.num_key_value_heads == config.num_key_value_heads
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits)

    theirs = hf_llama(config)  # their random init, into ours
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_hf(tmp_path / "theirs")
    assert loaded.config == config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), theirs(x).logits)


def test_135m_flops_per_token():
    assert ModelConfig.from_name("135m").flops_per_token(2048) == pytest.approx(1.23e9, rel=0.01)


@pytest.mark.parametrize("name, overrides, message", [
    ("huge", {}, "unknown model preset 'huge'"),
    ("tiny", {"hidden_size": 66}, "hidden_size 66 is not divisible by num_attention_heads 4"),
    ("tiny", {"num_key_value_heads": 3}, "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    ("tiny", {"n_layer": 3}, "unknown ModelConfig field"),
])
def test_config_errors(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_name(name, **overrides)


def hf_llama(config: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, initializer_range=config.initializer_range,
        attn_implementation="sdpa")
    return LlamaForCausalLM(hf_config).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_parity_ours_to_transformers(tmp_path, tied):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ours = SmolLM(ModelConfig.from_name("tiny", tie_word_embeddings=tied)).eval()
    save_hf(ours, tmp_path)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits)


@pytest.mark.parametrize("tied", [True, False])
def test_parity_transformers_to_ours(tmp_path, tied):
    torch.manual_seed(0)
    theirs = hf_llama(ModelConfig.from_name("tiny", tie_word_embeddings=tied))
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config == ModelConfig.from_name("tiny", tie_word_embeddings=tied)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits)


@torch.no_grad()
def test_causality(tiny_model):
    x = ids(batch=1, length=16)
    t = 9
    changed = x.clone()
    changed[0, t] = (x[0, t] + 1) % tiny_model.config.vocab_size
    a, b = tiny_model(x), tiny_model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3


@torch.no_grad()
def test_kv_cache_one_token_at_a_time(tiny_model):
    x = ids(length=10)
    full = tiny_model(x)
    cache = KVCache(tiny_model.config, batch_size=2, max_length=10)
    steps = [tiny_model(x[:, :4], cache)]  # prefill
    steps += [tiny_model(x[:, t:t + 1], cache) for t in range(4, 10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kv_cache_chunk_after_prefix(tiny_model):
    x = ids(length=12)
    full = tiny_model(x)
    cache = KVCache(tiny_model.config, batch_size=2, max_length=16)
    first = tiny_model(x[:, :5], cache)
    chunk = tiny_model(x[:, 5:12], cache)  # 7 new tokens see the 5 cached and each other causally
    torch.testing.assert_close(torch.cat([first, chunk], dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KVCache holds 16 tokens"):
        tiny_model(x[:, :5], cache)


@pytest.mark.parametrize("chunk_size", [7, 32, 1000])  # 7 does not divide N = 32 + 5
def test_chunked_cross_entropy_equals_cross_entropy(chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = (torch.randn(50, 16, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=g)

    loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    (loss * 3.0).backward()  # a non-unit upstream gradient
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    ref = F.cross_entropy(hidden @ weight.t(), targets)
    (ref * 3.0).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


@pytest.mark.parametrize("tied", [True, False])
def test_the_models_loss_is_cross_entropy_on_its_logits(tied):
    """SmolLM.loss, the one loss entry of training, evaluation and the scripts, equals
    F.cross_entropy on the forward's logits in float32, gradients included."""
    torch.manual_seed(0)
    model = SmolLM(ModelConfig.from_name("tiny", vocab_size=300, tie_word_embeddings=tied))
    x, targets = ids(vocab=300), ids(seed=2, vocab=300)
    loss = model.loss(x, targets, chunk_size=7)  # 7 does not divide 2 x 12 rows
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(x).flatten(0, 1), targets.flatten())
    ref.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-5
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():  # validation and evaluation: the loss alone, the same figure
        assert abs(model.loss(x, targets, chunk_size=5).item() - ref.item()) < 1e-5


def test_a_loss_mask_scores_only_the_tokens_it_keeps():
    torch.manual_seed(0)
    model = SmolLM(ModelConfig.from_name("tiny", vocab_size=300))
    x, targets = ids(vocab=300), ids(seed=2, vocab=300)
    mask = torch.zeros_like(targets)
    mask[0, 3:9] = 1
    mask[1, 10:] = 1  # 8 tokens kept: the mean is over them, not over 24
    per_token = F.cross_entropy(model(x).flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    assert abs(model.loss(x, targets, mask).item() - per_token[mask.bool()].mean().item()) < 1e-5
    assert abs(model.loss(x, targets, mask.bool(), chunk_size=3).item() - per_token[mask.bool()].mean().item()) < 1e-5
    # A masked-out token's target changes nothing, not the loss and not a gradient.
    other = targets.clone()
    other[0, 0] = (other[0, 0] + 1) % 300
    loss = model.loss(x, targets, mask)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    again = model.loss(x, other, mask)
    again.backward()
    assert torch.equal(loss, again)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    # All ones is no mask; none kept is a loss of 0 with zero gradients for every parameter, not NaN.
    assert torch.equal(model.loss(x, targets, torch.ones_like(targets)), model.loss(x, targets))
    model.zero_grad()
    empty = model.loss(x, targets, torch.zeros_like(targets))
    empty.backward()
    assert empty.item() == 0.0 and all(p.grad is not None and not p.grad.any() for p in model.parameters())
    with pytest.raises(ValueError, match="loss_mask has shape"):
        model.loss(x, targets, mask[:, 1:])


def test_the_memory_estimate_knows_the_optimizer():
    """AdamW keeps two moments a parameter; Muon one momentum buffer a decoder-layer matrix, with
    AdamW's two for the embedding and the norms. Weights and gradients are the same for both."""
    from smollm.config import estimate_memory

    config = ModelConfig.from_name("135m")
    n = config.num_params
    adamw = estimate_memory(config, optimizer="adamw")
    assert (adamw.weights, adamw.gradients, adamw.optimizer) == (4 * n, 4 * n, 8 * n)
    assert adamw.model_and_optimizer == adamw.total == 16 * n  # no batch: no activations, no logits
    muon = estimate_memory(config, optimizer="muon")
    matrices = sum(p.numel() for name, p in SmolLM(ModelConfig.from_name("tiny")).named_parameters()
                   if ".layers." in f".{name}" and name.endswith("proj.weight"))
    tiny_muon, tiny_adamw = (estimate_memory(ModelConfig.from_name("tiny"), optimizer=o) for o in ("muon", "adamw"))
    assert tiny_adamw.optimizer - tiny_muon.optimizer == 4 * matrices
    assert muon.optimizer < adamw.optimizer and muon.weights == adamw.weights
    # A batch adds activations and two chunks of float32 logits, whatever the optimizer.
    step = estimate_memory(config, 32, 2048, optimizer="adamw", bf16=True)
    assert step.total / 2**30 == pytest.approx(45.79, abs=0.005)  # the figure fit has always checked
    assert step.logits == 2 * 8192 * config.vocab_size * 4
    assert estimate_memory(config, 32, 2048, optimizer="muon", bf16=True).total == step.total - (adamw.optimizer
                                                                                                 - muon.optimizer)
    with pytest.raises(Exception, match="unknown optimizer 'sgd'"):
        estimate_memory(config, optimizer="sgd")


def test_init_weights_std():
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny")
    model = SmolLM(config)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            assert torch.all(p == 1), name
        else:
            assert p.std().item() == pytest.approx(config.initializer_range, rel=0.05), name
    assert model.lm_head.weight is model.embed_tokens.weight


# ---- what keeps the GPU fast: whole graphs under torch.compile ----

def _layer_and_inputs(T: int, start: int = 0):
    from smollm.model import DecoderLayer, RotaryEmbedding

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", num_hidden_layers=1)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(start, start + T), torch.float32)
    return cfg, DecoderLayer(cfg, 0), torch.randn(2, T, cfg.hidden_size), cos, sin


def test_a_decoder_layer_compiles_as_one_graph_for_a_training_step():
    # fullgraph=True raises at the first graph break, forward or backward (aot_eager traces both).
    cfg, layer, x, cos, sin = _layer_and_inputs(16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x.requires_grad_()
    out = compiled(x, cos, sin)
    out.square().mean().backward()
    torch.testing.assert_close(out, layer(x, cos, sin))
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_a_decoder_layer_compiles_as_one_graph_for_a_cached_decoding_step():
    cfg, layer, prompt, cos, sin = _layer_and_inputs(8)
    cache, eager_cache = KVCache(cfg, 2, 16), KVCache(cfg, 2, 16)
    with torch.no_grad():
        layer(prompt, cos, sin, cache), layer(prompt, cos, sin, eager_cache)
        cache.length = eager_cache.length = 8
        _, _, token, cos1, sin1 = _layer_and_inputs(1, start=8)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        out = compiled(token, cos1, sin1, cache)  # one new token against 8 cached
        torch.testing.assert_close(out, layer(token, cos1, sin1, eager_cache))
    torch.testing.assert_close(cache.k, eager_cache.k)  # the compiled step wrote the cache too


# ---- RoPE's inverse frequencies stay float32 whatever the model is cast to ----

def _fsdp_bf16_mixed(model: SmolLM, tmp_path):
    """The model as Lightning's FSDP runs it under bf16-mixed (its MixedPrecision, buffer_dtype
    bf16 included), on one CPU process."""
    import torch.distributed as dist
    from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    return FullyShardedDataParallel(model, mixed_precision=FSDPPrecision("bf16-mixed").mixed_precision_config,
                                    device_id=torch.device("cpu"))


def _bf16_true(model: SmolLM, _):
    from lightning.pytorch.plugins.precision import HalfPrecision

    return HalfPrecision("bf16-true").convert_module(model)


CASTS = {"to(bfloat16)": lambda m, _: m.to(torch.bfloat16), "half()": lambda m, _: m.half(),
         "bf16-true": _bf16_true, "fsdp bf16-mixed": _fsdp_bf16_mixed}


@pytest.mark.parametrize("cast", CASTS)
def test_rope_in_a_cast_model_is_the_float32_models(cast, tmp_path):
    """Training in bf16 (or fp16) rotates queries and keys exactly as float32 inference does:
    the inverse frequencies, and the cos/sin they give, are never rounded by the cast."""
    import torch.distributed as dist

    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny")
    reference = SmolLM(config)
    model = SmolLM(config)
    model.load_state_dict(reference.state_dict())
    assert "rotary.inv_freq" not in model.state_dict()  # derived, never saved: checkpoints keep their keys
    received = []
    model.layers[0].register_forward_pre_hook(lambda _, args: received.append(args[1:3]))
    try:
        cast_model = CASTS[cast](model, tmp_path)
        with torch.no_grad():
            cast_model(ids(1, 64, vocab=config.vocab_size))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    (cos, sin), = received
    assert cos.dtype in (torch.bfloat16, torch.float16)  # the layer computed in the cast dtype
    positions = torch.arange(64)
    want_cos, want_sin = reference.rotary(positions, cos.dtype)  # what inference applies
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    far = torch.arange(8192)  # and float32-exact tables at every position, however far
    for got, want in zip(model.rotary(far, torch.float32), reference.rotary(far, torch.float32)):
        assert torch.equal(got, want)
    assert model.rotary.inv_freq.dtype == torch.float32
