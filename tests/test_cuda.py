"""On a CUDA GPU (skipped without one): bf16-mixed training through fit, no host-device sync
per step, the compiled loss and the SDPA backends agreeing with the CPU reference (packed rows with
SDPA masks, flex_attention and flash varlen_attn too); the real
`--trainer.strategy fsdp` (its parameter groups and training against one plain GPU), and 16-mixed
clipping the true gradient norm with Lightning's GradScaler and FSDP's ShardedGradScaler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fitutil
from smollm.fit import main
from smollm.model import chunked_cross_entropy

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_args(tmp_path, data, max_steps, extra=()):
    corpus, tok = data
    return fitutil.fit_args(tmp_path / "run", corpus, tok, max_steps, 1000, [
        "--trainer.accelerator", "cuda", "--trainer.precision", "bf16-mixed",
        "--trainer.log_every_n_steps", "100", *extra])


@pytest.mark.parametrize("compile", ["false", "true"])
def test_a_training_step_makes_no_host_device_sync(tmp_path, data, compile):
    # Documented syncs happen only at logging steps (every log_every_n_steps), validation and
    # checkpoint saves; steps 3 to 6 here have none of them.
    fitutil.SyncDetector.found.clear()
    detector = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.SyncDetector"})
    assert main(cuda_args(tmp_path, data, 8, ["--model.compile", compile, detector])) == 0
    assert fitutil.SyncDetector.found == []


def test_bf16_training_on_cuda_resumes_and_its_checkpoint_loads(tmp_path, data):
    from smollm.checkpoint import model_from_checkpoint as load_checkpoint_model

    assert main(cuda_args(tmp_path, data, 4)) == 0
    assert main(cuda_args(tmp_path, data, 6, ["--ckpt_path", "last"])) == 0
    model, _ = load_checkpoint_model(str(tmp_path / "run" / "checkpoints" / "tiny" / "step=000006.ckpt"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_on_cuda_is_never_applied_and_stops_the_run(tmp_path, data, capsys):
    poison = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.PoisonWeights", "init_args": {"at_step": 4}})
    code = main(cuda_args(tmp_path, data, 10, ["--checkpoint.every_n_train_steps", "1", poison]))
    assert code == 2
    assert "error: step 4:" in capsys.readouterr().err
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "tiny").glob("step=*.ckpt"))
    assert saved == ["step=000001.ckpt", "step=000002.ckpt", "step=000003.ckpt"]


def test_compiled_chunked_loss_equals_eager_in_bf16():
    torch.manual_seed(0)
    hidden = torch.randn(3000, 64, device="cuda", requires_grad=True)
    weight = (torch.randn(1000, 64, device="cuda") * 0.1).requires_grad_()
    targets = torch.randint(1000, (3000,), device="cuda")
    grads = []
    for compiled in (False, True):
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(hidden, weight, targets, 1024, compiled=compiled)
        loss.backward()
        grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("backend", ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_gqa_attention_on_each_backend_matches_float64(backend):
    # SDPA with enable_gqa, as Attention calls it, in bf16 on each backend, against float64 on
    # the CPU with the key/value heads repeated by hand. bf16 operands land near 4e-3.
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 256, 64), torch.randn(2, 3, 256, 64), torch.randn(2, 3, 256, 64)
    reference = F.scaled_dot_product_attention(q.double(), k.repeat_interleave(3, 1).double(),
                                               v.repeat_interleave(3, 1).double(), is_causal=True)
    try:
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            out = F.scaled_dot_product_attention(*(t.cuda().bfloat16() for t in (q, k, v)),
                                                 is_causal=True, enable_gqa=True)
    except RuntimeError as e:  # this backend does not take GQA (or this GPU) in this torch
        pytest.skip(f"{backend}: {str(e).splitlines()[0]}")
    assert (out.double().cpu() - reference).norm() / reference.norm() < 1e-2


def recorded_run(root: Path, data, strategy: str, precision: str, extra=()) -> tuple[list[dict], dict, dict]:
    """4 steps on one GPU in a fresh process: (records, parameter groups, step-4 weights)."""
    corpus, tok = data
    callbacks = [json.dumps({"class_path": "fitutil.Recorder", "init_args": {"path": str(root / "rec.jsonl")}}),
                 json.dumps({"class_path": "fitutil.GroupNames", "init_args": {"path": str(root / "groups.json")}})]
    args = fitutil.fit_args(root, corpus, tok, 4, 4, [
        "--trainer.accelerator", "cuda", "--trainer.devices", "1", "--trainer.strategy", strategy,
        "--trainer.precision", precision, *extra, *("--trainer.callbacks+=" + c for c in callbacks)])
    result = fitutil.run_fit(args)
    assert result.returncode == 0, result.stderr[-3000:]
    groups = json.loads(Path(f"{root / 'groups.json'}.rank0").read_text())
    weights = torch.load(root / "checkpoints" / "tiny" / "step=000004.ckpt", weights_only=True)["state_dict"]
    return fitutil.read_records(root / "rec.jsonl"), groups, weights


def assert_same_training(a: tuple, b: tuple, rel: float) -> None:
    (ra, _, wa), (rb, _, wb) = a, b
    assert [r["windows"] for r in ra] == [r["windows"] for r in rb]
    assert [r["grad_norm"] for r in ra] == pytest.approx([r["grad_norm"] for r in rb], rel=rel)
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=rel)
    assert wa.keys() == wb.keys()
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], rtol=rel, atol=rel / 10, msg=key)


def test_fsdp_on_cuda_has_the_groups_of_one_gpu_and_trains_as_it(tmp_path, data):
    """The production `--trainer.strategy fsdp` (CUDA device, NCCL, offload_to_cpu gathering of
    the full checkpoint) on one GPU against no strategy, in 32-true."""
    plain = recorded_run(tmp_path / "plain", data, "auto", "32-true")
    fsdp = recorded_run(tmp_path / "fsdp", data, "fsdp", "32-true")
    assert fsdp[1]["groups"] == plain[1]["groups"] and fsdp[1]["with_muon"] == plain[1]["with_muon"]
    assert len(plain[1]["groups"]["decay"]) == 1 + 7 * 2 and plain[0][0]["grad_norm"] > 1.0
    assert_same_training(fsdp, plain, rel=1e-5)


def test_16_mixed_on_cuda_clips_and_logs_the_true_gradient_norm(tmp_path, data):
    """With the fused AdamW (which unscales in its step) training is that of the non-fused AdamW,
    whose gradients Lightning unscales itself. Under FSDP (ShardedGradScaler) the norm is the true
    one too, within float16's own differences: Lightning's FSDP computes and reduces in float16."""
    reference = recorded_run(tmp_path / "plain", data, "auto", "16-mixed", ["--model.fused_adamw", "false"])
    assert 1.0 < reference[0][0]["grad_norm"] < 100  # above the clip, and not x 65536
    assert_same_training(recorded_run(tmp_path / "fused", data, "auto", "16-mixed"), reference, rel=1e-4)
    sharded = recorded_run(tmp_path / "fsdp", data, "fsdp", "16-mixed")[0]
    assert [r["grad_norm"] for r in sharded] == pytest.approx([r["grad_norm"] for r in reference[0]], rel=2e-2)
    assert [r["loss"] for r in sharded] == pytest.approx([r["loss"] for r in reference[0]], rel=1e-2)


@pytest.mark.parametrize("kind", ["varlen", "sdpa", "flex"])
def test_a_packed_row_on_cuda_trains_as_on_the_cpu(kind):
    """Per-document attention on the GPU (varlen, which in float32 is causal SDPA per document; SDPA's
    bool mask; flex_attention, whose backward CUDA has) gives the CPU's loss and gradients for a
    packed row, float32."""
    from smollm import ModelConfig, SmolLM

    torch.manual_seed(0)
    cpu = SmolLM(ModelConfig.from_name("tiny", vocab_size=300))
    gpu = SmolLM(cpu.config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    gpu.document_attention = kind
    ids = torch.randint(0, 300, (2, 257), generator=torch.Generator().manual_seed(1))
    documents = torch.tensor([[0] * 100 + [1] * 56 + [2] * 100, [0] * 3 + [1] * 253])
    losses = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        x, d = ids.to(device), documents.to(device)
        loss = model.loss(x[:, :-1], x[:, 1:], document_ids=d)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-4
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_varlen_attention_on_cuda_in_bf16_trains_as_the_mask():
    """The default per-document attention on CUDA under bf16 autocast runs torch's flash varlen_attn
    (one kernel over the flattened batch, GQA, causal within each document), and gives the loss and
    gradients of the SDPA mask within bf16's error: two rows of several documents each, the losses
    against the float32 CPU reference too."""
    import smollm.model as m
    from smollm import ModelConfig, SmolLM

    kernel, calls = m.torch_varlen_attn(), []
    assert kernel is not None  # torch 2.13 has it: the kernel below is the one tested

    def counted(*args, **kw):
        calls.append(1)
        return kernel(*args, **kw)

    torch.manual_seed(0)
    cpu = SmolLM(ModelConfig.from_name("tiny", vocab_size=300))
    assert cpu.config.num_key_value_heads < cpu.config.num_attention_heads  # GQA
    gpu = SmolLM(cpu.config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 300, (2, 257), generator=torch.Generator().manual_seed(1))
    documents = torch.tensor([[0] * 100 + [1] * 56 + [2] * 37 + [3] * 63, [0] * 3 + [1] * 200 + [2] * 53])
    mask = torch.rand(2, 256, generator=torch.Generator().manual_seed(2)) < 0.7
    cpu.document_attention = "sdpa"
    reference = cpu.loss(ids[:, :-1], ids[:, 1:], mask, document_ids=documents).item()
    results = {}
    lookup = m.torch_varlen_attn
    m.torch_varlen_attn = lambda: counted
    try:
        for kind in ("varlen", "sdpa"):
            calls.clear()
            gpu.document_attention = kind
            x, d = ids.cuda(), documents.cuda()
            with torch.autocast("cuda", torch.bfloat16):
                loss = gpu.loss(x[:, :-1], x[:, 1:], mask.cuda(), document_ids=d)
            loss.backward()
            results[kind] = loss.item(), {n: p.grad.float().cpu() for n, p in gpu.named_parameters()}, len(calls)
            gpu.zero_grad(set_to_none=True)
    finally:
        m.torch_varlen_attn = lookup
    assert results["varlen"][2] == cpu.config.num_hidden_layers and results["sdpa"][2] == 0  # the kernel ran
    for kind, (loss, _, _) in results.items():
        assert abs(loss - reference) < 2e-2, (kind, loss, reference)
    for name, g in results["sdpa"][1].items():
        error = (results["varlen"][1][name] - g).norm() / g.norm()
        assert error < 2e-2, (name, error.item())
