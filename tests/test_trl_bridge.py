"""The TRL bridge (trl_cegppo.py) and its example (examples/trl_gsm8k.py).

CPU, offline, tiny models. CI installs TRL (requirements-scale.txt); elsewhere these tests skip without it.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")       # before transformers / huggingface_hub are imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cegppo  # noqa: E402
from engine import lab, models

BETAS = [(0.0, 0.0), (0.5, 1.0), (0.75, 1.0), (1.0, 0.5)]


@pytest.fixture(scope="module")
def bridge():
    pytest.importorskip("trl", reason="TRL is not installed: pip install -r requirements-scale.txt")
    import trl_cegppo
    return trl_cegppo


def config(bridge, tmp_path, **kw):
    kw = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
              per_device_train_batch_size=4, num_generations=2, steps_per_generation=2,
              gradient_accumulation_steps=1, max_completion_length=8, logging_steps=1, seed=0) | kw
    return bridge.CEGPPOConfig(**kw)


def batch(seed=0, B=4, T=6):
    """logp (with grad), old logp, advantages of both signs, a mask with padding: ratios well outside 0.8-1.2."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = logp.detach() + (torch.rand(B, T, generator=g) - 0.5) * 1.6
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])[:B]
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[3, 2:] = 0
    return logp, old, adv, mask


# ---- (1) the loss: the bridge's mapping is cegppo_loss, value and gradient ---------------------
@pytest.mark.parametrize("beta1,beta2", BETAS)
def test_trl_loss_is_cegppo_loss(bridge, tmp_path, beta1, beta2):
    args = config(bridge, tmp_path, beta1=beta1, beta2=beta2)
    logp, old, adv, mask = batch()
    loss, stats = bridge.trl_loss(logp, old, adv, mask, args, num_tokens=13.0)
    (grad,) = torch.autograd.grad(loss, logp)
    ref, ref_stats = cegppo.cegppo_loss(logp, old, adv, mask, num_tokens=13.0, epsilon_low=0.2, epsilon_high=0.2,
                                        beta1=beta1, beta2=beta2, dual_clip=10.0)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)
    assert stats["clip_ratio/low_mean"] == ref_stats["clip_ratio/low_mean"] > 0
    assert stats["clip_ratio/high_mean"] == ref_stats["clip_ratio/high_mean"] > 0
    # On-policy (TRL leaves old_per_token_logps out): ratio 1, nothing clipped.
    loss, stats = bridge.trl_loss(logp, None, adv, mask, args)
    ref, _ = cegppo.cegppo_loss(logp, logp.detach(), adv, mask, **args.loss_knobs())
    assert torch.equal(loss, ref) and stats["clip_ratio/low_mean"] == stats["clip_ratio/high_mean"] == 0


def test_config_defaults_come_from_algos(bridge, tmp_path):
    args = config(bridge, tmp_path)
    assert args.loss_knobs() == cegppo.ALGOS["cegppo"]
    assert config(bridge, tmp_path, epsilon_high=None).loss_knobs()["epsilon_high"] == args.epsilon
    with pytest.raises(ValueError, match="beta=0.1: no KL term"):
        config(bridge, tmp_path, beta=0.1)
    with pytest.raises(ValueError, match="loss_type must stay 'dapo'"):
        config(bridge, tmp_path, loss_type="grpo")


@pytest.fixture(scope="module")
def tiny_trainer(bridge, tmp_path_factory):
    """A CEGPPOTrainer on the random tiny model (full fine-tuning: every weight gets a gradient)."""
    from datasets import Dataset

    def length_reward(completions, **kw):
        return [float(len(c) % 2) for c in completions]

    path = lab.tiny_model_path("tiny")
    args = config(bridge, tmp_path_factory.mktemp("trainer"), sft_coef=0.1)
    trainer = bridge.CEGPPOTrainer(model=path, reward_funcs=[length_reward], args=args,
                                   train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 8}))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1      # set by Trainer's loop; we call the loss directly
    return trainer


def trl_inputs(trainer, seed=0, B=4, P=3, T=6):
    """A batch dict as TRL's _generate_and_score_completions hands it to the loss."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    inputs = dict(prompt_ids=torch.randint(3, vocab, (B, P), generator=g),
                  prompt_mask=torch.ones(B, P, dtype=torch.long),
                  completion_ids=torch.randint(3, vocab, (B, T), generator=g),
                  completion_mask=torch.ones(B, T, dtype=torch.long), advantages=torch.tensor([1.0, -1.0, 0.5, -2.0]))
    inputs["completion_mask"][0, 4:] = 0
    inputs["completion_mask"][3, 2:] = 0
    with torch.no_grad():
        logp = logps_of(trainer, inputs)
    inputs["old_per_token_logps"] = logp + (torch.rand(B, T, generator=g) - 0.5) * 1.6
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum() * 2      # as if the batch were half a generation
    inputs["positive"] = torch.tensor([True, False, True, False])
    inputs["num_positive_tokens"] = (inputs["completion_mask"] * inputs["positive"][:, None]).sum() * 2
    return inputs


def logps_of(trainer, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    return trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, inputs["completion_ids"].size(1))[0]


def loss_and_grads(fn, trainer):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = fn()
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("beta1,beta2", [(0.0, 0.0), (0.5, 1.0)])
def test_trainer_loss_end_to_end(tiny_trainer, beta1, beta2):
    """GRPOTrainer._compute_loss replaced: TRL's forward, our cegppo_loss + SFT term, TRL's normalizer."""
    trainer, args = tiny_trainer, tiny_trainer.args
    args.beta1, args.beta2 = beta1, beta2
    inputs = trl_inputs(trainer)
    loss, grads = loss_and_grads(lambda: trainer._compute_loss(trainer.model, inputs), trainer)

    def by_hand():
        logp, mask = logps_of(trainer, inputs), inputs["completion_mask"]
        # TRL's "dapo" normalizer with steps_per_generation 2, one process, no accumulation: half the count
        pol, _ = cegppo.cegppo_loss(logp, inputs["old_per_token_logps"], inputs["advantages"], mask,
                                    num_tokens=inputs["num_items_in_batch"].item() / 2, **args.loss_knobs())
        sft = cegppo.positive_sft_loss(logp, mask, inputs["positive"],
                                       num_tokens=inputs["num_positive_tokens"].item() / 2)
        return pol + 0.1 * sft
    ref, ref_grads = loss_and_grads(by_hand, trainer)
    assert torch.equal(loss, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    m = trainer._metrics["train"]
    assert m["clip_ratio/low_mean"][-1] > 0 and m["clip_ratio/high_mean"][-1] > 0
    assert m["clip_ratio/region_mean"][-1] == pytest.approx(m["clip_ratio/low_mean"][-1]
                                                            + m["clip_ratio/high_mean"][-1])
    assert m["sft/loss"][-1] > 0 and "quadrants/pa_lp_frac" in m


@pytest.mark.parametrize("vllm_is", [None, "token", "sequence"])
def test_betas_zero_reproduce_trls_own_loss(tiny_trainer, vllm_is):
    """beta1 = beta2 = 0 without dual clip is TRL's own PPO-clip ("dapo") loss: value and gradient,
    also with TRL's vLLM importance-sampling weights (per token or per sequence, some masked to 0)."""
    from trl import GRPOTrainer
    trainer, args = tiny_trainer, tiny_trainer.args
    args.beta1 = args.beta2 = args.dual_clip = args.sft_coef = 0.0
    inputs = trl_inputs(trainer, seed=1)
    if vllm_is:
        g = torch.Generator().manual_seed(2)
        w = torch.rand(4, 6 if vllm_is == "token" else 1, generator=g) * 3
        inputs["importance_sampling_ratio"] = torch.where(w > 2.5, torch.zeros_like(w), w)
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True   # only the loss reads them here
    try:
        ours, g1 = loss_and_grads(lambda: trainer._compute_loss(trainer.model, inputs), trainer)
        trls, g2 = loss_and_grads(lambda: GRPOTrainer._compute_loss(trainer, trainer.model, inputs), trainer)
    finally:
        args.dual_clip, args.sft_coef, trainer.use_vllm = 10.0, 0.1, False
    assert torch.allclose(ours, trls, rtol=1e-6, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g1, g2))


# ---- (3) the SFT term ---------------------------------------------------------------------------
def test_positive_mask(bridge):
    # groups of 3: mixed -> its full-reward members; all right or all wrong -> nobody (train.py drops them)
    rewards = torch.tensor([1.0, 0.0, 1.0,   1.0, 1.0, 1.0,   0.0, 0.0, 0.0,   0.5, 1.0, float("nan")])
    assert bridge.positive_mask(rewards, 3).tolist() == [True, False, True] + [False] * 6 + [False, True, False]
    assert bridge.positive_mask(rewards, 3, full_reward=0.5)[9].item()


def test_sft_term_by_hand(bridge, tmp_path):
    args = config(bridge, tmp_path, sft_coef=0.1)
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    zero_adv = torch.zeros(2)                         # no policy gradient: only the SFT term is left
    loss, stats = bridge.trl_loss(logp, None, zero_adv, mask, args, positive=torch.tensor([True, False]))
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(0.1 * (1 + 2) / 2) and stats["sft/loss"] == pytest.approx(1.5)
    assert torch.allclose(grad, torch.tensor([[-0.05, -0.05, 0.0], [0.0, 0.0, 0.0]]))
    # the mini-batch's count of positive tokens as denominator (micro-batches add up)
    loss, _ = bridge.trl_loss(logp, None, zero_adv, mask, args, positive=torch.tensor([True, False]),
                              num_positive_tokens=4)
    assert loss.item() == pytest.approx(0.1 * 3 / 4)
    # nobody earned the full reward: zero, with a graph, zero gradient
    loss, stats = bridge.trl_loss(logp, None, zero_adv, mask, args, positive=torch.tensor([False, False]))
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0 and stats["sft/loss"] == 0 and not grad.any()
    # sft_coef 0: no term, no metric
    _, stats = bridge.trl_loss(logp, None, zero_adv, mask, config(bridge, tmp_path),
                               positive=torch.tensor([True, True]))
    assert "sft/loss" not in stats


# ---- (4) the version pin ------------------------------------------------------------------------
def test_version_check(bridge, monkeypatch):
    monkeypatch.delenv(bridge.ALLOW_UNTESTED_ENV, raising=False)
    bridge.check_trl_version("1.16.0")
    bridge.check_trl_version("1.16.3")
    for bad in ("1.15.2", "1.17.0", "0.19.1"):
        with pytest.raises(ImportError) as e:
            bridge.check_trl_version(bad)
        msg = str(e.value)
        assert f"trl {bad} is installed" in msg and "trl>=1.16,<1.17" in msg
        assert "pip install -r requirements-scale.txt" in msg and bridge.ALLOW_UNTESTED_ENV in msg
    monkeypatch.setenv(bridge.ALLOW_UNTESTED_ENV, "1")
    bridge.check_trl_version("1.17.0")
    with open(os.path.join(ROOT, "requirements-scale.txt")) as f:
        assert f"trl{bridge.TESTED_TRL}" in f.read().replace(" ", "")


def test_import_stops_on_untested_trl(bridge, monkeypatch):
    """The check runs when the module is imported (a fresh copy here, so the real module stays intact)."""
    import trl
    monkeypatch.delenv(bridge.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    spec = importlib.util.spec_from_file_location("trl_cegppo_probe", os.path.join(ROOT, "trl_cegppo.py"))
    with pytest.raises(ImportError, match=r"needs trl>=1.16,<1.17 but trl 1.17.0 is installed"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# ---- (2) + the example: training runs, several updates per generation, so clipping happens ---
EXAMPLE_ARGS = ["--model", "tiny", "--dataset", "tiny", "--max_steps", "2", "--max_completion_length", "32",
                "--num_generations", "4", "--steps_per_generation", "2", "--gradient_accumulation_steps", "1",
                "--lora_r", "0", "--learning_rate", "1e-2", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
                "--sft_coef", "0.1", "--use_cpu", "--bf16", "false", "--gradient_checkpointing", "false"]


@pytest.fixture(scope="module")
def warm_tiny(bridge):
    """The warm-started tiny model (its completions are sometimes right), built once before any launch."""
    return models.resolve_model("tiny")


def test_example_two_steps(bridge, warm_tiny, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import trl_gsm8k
    # 16 completions per generation: 4 groups of 4, so some group almost surely has mixed rewards
    trainer = trl_gsm8k.train(EXAMPLE_ARGS + ["--per_device_train_batch_size", "8", "--output_dir", str(tmp_path)])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert logs[0]["clip_ratio/region_mean"] == 0                 # the first update is on-policy
    assert logs[1]["clip_ratio/region_mean"] > 0                  # the second is not: clipping happens
    assert "sft/loss" in logs[0] and 0 < logs[0]["rewards/math_reward/mean"] < 1
    assert os.path.isfile(os.path.join(tmp_path, "model.safetensors"))


# ---- (5) two processes (gloo on CPU) through accelerate ---------------------------------------
def test_example_two_processes(bridge, warm_tiny, tmp_path):
    """accelerate's --cpu launcher starts one process unless MPI is set up; --multi_gpu on a CPU machine
    starts the processes with torch.distributed (gloo), and the example's --use_cpu keeps them there."""
    with socket.socket() as s:          # a free port: another test session may hold accelerate's default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(ROOT, "examples", "trl_gsm8k.py"), *EXAMPLE_ARGS,
           "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "2 process(es) on cpu" in out, out[-3000:]
    assert "'clip_ratio/region_mean'" in out and time.time() - t < 300
