"""On a CUDA GPU only: `CEGPPO_GPU_TESTS=1 python -m pytest -q -o addopts= tests/test_gpu.py` (the rest of
the suite runs on the CPU, with CUDA hidden: tests/conftest.py; docs/gpu.md). Seconds on any card."""
import os

import pytest
import torch

import cegppo
import train
from engine import dense_copy, lab, logprobs, models, runfiles
from engine.generation import Generator

pytestmark = pytest.mark.gpu


@pytest.fixture()
def cuda_policy():
    torch.manual_seed(0)
    model, tok = models.load_model(lab.warm_start_path("tiny"), four_bit=True, lora_rank=8, trainable=True)
    assert next(model.parameters()).device.type == "cuda"
    return model, tok


def test_precision_rule_on_this_card(cuda_policy):
    major = torch.cuda.get_device_capability()[0]
    assert models.compute_dtype() == (torch.bfloat16 if major >= 8 else torch.float16)
    assert models.model_compute_dtype(cuda_policy[0]) == models.compute_dtype()
    assert torch.backends.cuda.matmul.allow_tf32 == (major >= 8)          # load_model switched TF32 on


def test_first_update_ratio_is_one_under_autocast(cuda_policy):
    model, tok = cuda_policy
    cfg = train.parse_config(["--model", "tiny", "--micro_batch_size", "4"])
    prompts = [cegppo.format_prompt(tok, q) for q, _ in lab.toy_rows("train", tiny=True)[:2]]
    with models.model_autocast(model):
        ro = cegppo.rollout(model, tok, prompts, 4, 12, 1.0, 1.0, Generator(8))
    scorer = logprobs.Scorer(cfg.temperature, cfg.shared_prefix)
    partition = logprobs.update_partition(ro, cfg)
    old, _ = scorer.no_grad(model, ro, partition, with_entropy=False)          # train.py's step 4
    # what is guaranteed: the first update's micro-batch is one the old log-probs were scored in
    # (logprobs.update_partition), so the same kernels see the same shapes and the ratio is 1 bit for bit
    idx = partition[0][0]
    lp, mask, _ = scorer.with_grad(model, ro, idx)                            # train.py's step 5
    assert lp.dtype == torch.float32
    T = mask.shape[1]
    old_lp = old[idx, :T].to(lp.device)
    adv = torch.tensor([1.0, -1.0] * 2, device=lp.device)[:len(idx)]
    loss, st = cegppo.cegppo_loss(lp, old_lp, adv, mask, num_tokens=int(mask.sum()), **cegppo.ALGOS["cegppo"])
    assert st["ratio/max"] == 1.0
    kept = mask.bool()                                                         # padding columns are not compared
    assert torch.equal(lp.detach()[kept], old_lp[kept])
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_release_gives_the_copy_back(cuda_policy):
    model, _ = cuda_policy
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    dense = dense_copy.dense_copy(model)
    held = torch.cuda.memory_allocated() - before
    assert held >= dense_copy.copy_bytes(model) > 0
    dense_copy.release(dense)
    assert torch.cuda.memory_allocated() == before and all(p.is_meta for p in dense.parameters())


def test_checkpoint_from_this_gpu_loads_on_the_cpu(tmp_path):
    state = runfiles.rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    path = os.path.join(tmp_path, "state.pt")
    torch.save({"rng": state, "x": torch.ones(2, device="cuda")}, path)
    loaded = runfiles.load_state(path)                          # weights_only, onto the CPU
    assert loaded["x"].device.type == "cpu"
    runfiles.set_rng_state(loaded["rng"])                       # the CUDA states back, from CPU tensors
    assert torch.equal(torch.cuda.get_rng_state(0), state["cuda"][0])
