"""The step's sampling: the sampler's own log-probs (--old_logprobs), dynamic sampling
(--max_generation_rounds), the dense copy's fallback, and a collapsed run's stop."""
import contextlib
import gc
import json
import os
import random
import signal
import weakref
import zlib

import pytest
import torch

import cegppo
import train
from engine import data, dense_copy, errors, generation, lab, models, progress, runlog
from engine.generation import Generator
from engine.sampler import Sampler


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def run_main(args):
    handler = signal.getsignal(signal.SIGINT)
    try:
        return train.main(args)
    finally:
        signal.signal(signal.SIGINT, handler)


def runs_differing_in(tmp_path, flag, values, *args):
    """Two-step runs alike but for one flag: {value: that run's metrics rows}."""
    got = {}
    for value in values:
        out = str(tmp_path / value)
        assert run_main([*args, "--max_steps", "2", "--eval_limit", "0", flag, value, "--output_dir", out]) == 0
        got[value] = rows(out)
    return got


# ----------------------------------------------------------------------------------------------
# The sampler's own log-probs
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moved_policy():
    """The tiny 4-bit + LoRA policy with LoRA weights moved off zero (so LoRA counts in every path)."""
    model, tok = models.load_model(lab.tiny_model_path("tiny"), four_bit=True, lora_rank=8, trainable=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model, tok


@pytest.mark.parametrize("sampler", ["policy", "dense"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampler_logprobs_equal_the_definition(moved_policy, sampler, temperature, top_p):
    model, tok = moved_policy
    prompts = [cegppo.format_prompt(tok, q) for q, _ in lab.toy_rows("train", tiny=True)[:3]]
    source = model if sampler == "policy" else dense_copy.dense_copy(model)
    torch.manual_seed(0)
    ro = cegppo.rollout(source, tok, prompts, 4, 20, temperature, top_p, Generator(batch_size=5))   # 3 generate() calls
    P, m = ro.prompt_len, ro.completion_mask.bool()
    with torch.no_grad():       # the plain definition on the whole [B*T, V] logits, through the policy
        logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                       position_ids=(ro.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, P - 1:-1]
        B, T, V = logits.shape
        lp, ent = cegppo.token_logprobs(logits.reshape(B * T, V), ro.input_ids[:, P:].reshape(-1), temperature)
    # float32 on a CPU: equal to rounding, whatever top_p did to the sampling
    assert (lp.view(B, T) - ro.sample_logp).abs()[m].max() < 1e-5
    assert (ent.view(B, T) - ro.sample_entropy).abs()[m].max() < 1e-5
    assert (ro.sample_entropy[m] > 0).all()
    # padding after the first EOS never contributes: exactly zero there
    assert m.float().mean() < 1 and (ro.sample_logp[~m] == 0).all() and (ro.sample_entropy[~m] == 0).all()


@pytest.mark.parametrize("mode", ["on", "auto", "off"])
def test_the_generation_progress_bar_ticks_per_token_when_asked(moved_policy, mode):
    import io
    model, tok = moved_policy
    prompts = [cegppo.format_prompt(tok, q) for q, _ in lab.toy_rows("train", tiny=True)[:3]]
    out = io.StringIO()
    calls = []

    class Counting(progress.GenerationProgress):
        def __call__(self, input_ids, scores):
            calls.append(input_ids.shape[1])
            return super().__call__(input_ids, scores)

    ticker = Counting("rollout", 6, cegppo.eos_ids(tok, model), mode, file=out)
    torch.manual_seed(0)
    # batch 4 of 6 sequences: two generate() calls, one object counts both
    ro = cegppo.rollout(model, tok, prompts, 2, 12, 1.0, 1.0, Generator(4, processors=[ticker]))
    ticker.close()
    # one call per decoded token of each generate(); every token of every completion counted once
    # (the first EOS included, nothing after it); finished: the rows whose EOS came before the last call
    L, lengths = ro.prompt_len, ro.completion_mask.sum(1)
    assert calls == [L + t for t in range(int(lengths[:4].max()))] + [L + t for t in range(int(lengths[4:].max()))]
    assert ticker.tokens == int(ro.completion_mask.sum())
    assert ticker.bar.n <= int((~ro.truncated).sum())
    if mode == "on":
        # the bar's own text is the whole count; what reached the screen is what the throttled redraws
        # (tqdm's 0.1 s) caught of it on the way, possibly nothing on a fast machine
        shown = [int(n) for n in __import__("re").findall(r"(\d+) tokens", out.getvalue())]
        assert out.getvalue().startswith("\rrollout:") and ticker.bar.postfix == f"{ticker.tokens} tokens"
        assert all(0 < n <= ticker.tokens for n in shown)
    else:                           # auto: not a terminal here (tests, logs) -> nothing; off -> nothing
        assert out.getvalue() == ""
    # watching changes nothing: the same seed gives the same completions without it
    torch.manual_seed(0)
    again = cegppo.rollout(model, tok, prompts, 2, 12, 1.0, 1.0, Generator(4))
    assert again.texts == ro.texts and torch.equal(again.sample_logp, ro.sample_logp)


def test_non_finite_logits_are_caught(moved_policy):
    model, tok = moved_policy
    dense = dense_copy.dense_copy(model)
    with torch.no_grad():       # an fp16 overflow, planted in a merged weight (the copy's own tensor)
        dense.model.layers[0].self_attn.q_proj.weight[0].fill_(float("inf"))
    prompts = [cegppo.format_prompt(tok, "What is 1+2?")]
    with pytest.raises(cegppo.NonFiniteLogits):
        cegppo.rollout(dense, tok, prompts, 2, 5)


def test_auto_picks_the_sampler_where_it_computes_in_float32(monkeypatch):
    cfg = train.parse_config(["--preset", "tiny"])
    assert train.old_logprobs_from(cfg) == "sampler"                        # CPU, float32
    for dtype in ("bf16", "fp16"):
        assert train.old_logprobs_from(train.parse_config(["--preset", "tiny", "--dtype", dtype])) == "policy"
    assert train.old_logprobs_from(train.parse_config(["--preset", "tiny", "--old_logprobs", "policy"])) == "policy"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)             # a GPU: half-precision decoding
    assert train.old_logprobs_from(cfg) == "policy"


def test_sampler_and_policy_old_logprobs_give_the_same_step(tmp_path):
    got = runs_differing_in(tmp_path, "--old_logprobs", ("sampler", "policy"), "--preset", "tiny")
    for a, b in zip(got["sampler"], got["policy"]):
        assert a["reward"] == b["reward"] and a["num_tokens"] == b["num_tokens"]     # the same rollouts
        assert a["sampling/old_logprobs_from_sampler"] == 1 and b["sampling/old_logprobs_from_sampler"] == 0
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6)             # within the mismatch
        assert a["sampling/sampling_logp_difference/max"] < 1e-5                      # measured, float32
        assert a["clip_ratio/first_update"] == 0 == b["clip_ratio/first_update"]     # nothing clipped on-policy
        assert a["time/old_logprob_s"] < b["time/old_logprob_s"]                     # no pass at all


# ----------------------------------------------------------------------------------------------
# Dynamic sampling
# ----------------------------------------------------------------------------------------------
def kind(answer):
    """The stub's verdict on a prompt, from its answer: 0 informative, 1 all right, 2 all wrong."""
    return zlib.crc32(str(answer).encode()) % 3


def stub_score(texts, answers):
    """Rewards by prompt, not by text: [1, 0, 0, 0] for informative prompts, all 1 or all 0 otherwise."""
    out = []
    for i, a in enumerate(answers):
        k = kind(a)
        out.append(1.0 if k == 1 or (k == 0 and i % 4 == 0) else 0.0)
    return torch.tensor(out)


def seeded_order(prompts, seed, count):
    """The prompts train.next_prompts hands out, in order, from the start of a run."""
    out, epoch = [], 0
    while len(out) < count:
        order = list(range(len(prompts)))
        random.Random(seed + epoch).shuffle(order)
        out += [prompts[i] for i in order]
        epoch += 1
    return out[:count]


def test_dynamic_sampling_fills_the_step_in_the_seeded_order(monkeypatch):
    monkeypatch.setattr(train, "score", stub_score)
    cfg = train.parse_config(["--preset", "tiny", "--max_generation_rounds", "20"])
    model, tok = models.load_model(models.resolve_model("tiny"), four_bit=True, lora_rank=8, trainable=True)
    prompts = data.usable_prompts(cfg, tok, data.load_data(cfg)[0])
    state, P, G = train.State(), cfg.prompts_per_step, cfg.num_generations
    kept, sampled = train.collect_groups(Sampler(model, tok, cfg, "sampler"), prompts, state, cfg, runlog.Clock())
    handed_out = seeded_order(prompts, cfg.seed, len(sampled.prompts))
    informative = [p for p in handed_out if kind(p[1]) == 0]
    assert sampled.rounds > 1 and state.pos == len(sampled.prompts) and sampled.prompts == handed_out
    assert kept.prompts == informative[:P]                           # the first P informative, in order
    assert sampled.surplus == len(informative) - P
    assert sampled.all_right == sum(kind(p[1]) == 1 for p in handed_out)
    assert sampled.all_wrong == sum(kind(p[1]) == 2 for p in handed_out)
    rollout = kept.rollout
    assert rollout.input_ids.shape[0] == P * G and len(rollout.texts) == P * G
    assert kept.rewards.view(P, G).tolist() == [[1.0, 0.0, 0.0, 0.0]] * P
    # the merged rollout's rows still line up: every kept row's text is its own completion's decode
    for b in range(P * G):
        ids = rollout.input_ids[b, rollout.prompt_len:][rollout.completion_mask[b].bool()]
        assert tok.decode(ids, skip_special_tokens=True) == rollout.texts[b]


def test_dynamic_sampling_stops_at_its_cap_and_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train, "score", lambda texts, answers: torch.tensor(
        [1.0 if kind(a) == 0 and i % 4 == 0 else 0.0 for i, a in enumerate(answers)]))
    out = str(tmp_path / "cap")
    assert run_main(["--preset", "tiny", "--max_steps", "3", "--max_generation_rounds", "2", "--eval_limit", "0",
                     "--output_dir", out, "--collapse_patience", "0"]) == 0
    r = rows(out)
    assert all(x["generation/rounds"] <= 2 for x in r)
    for x in r:                         # the counts add up to what was sampled and kept
        assert x["generation/groups_kept"] + x["generation/groups_all_wrong"] + x["generation/groups_all_right"] \
            + x["generation/groups_surplus"] == x["generation/prompts"]
        assert x["trained_responses"] == 4 * x["generation/groups_kept"]
        assert x["frac_reward_zero_std"] == pytest.approx(x["generation/groups_all_wrong"] / x["generation/prompts"])
    short = [x for x in r if x["generation/groups_kept"] < 4]
    assert short, "a third of the prompts is informative: two rounds of 4 cannot always fill a step"
    captured = capsys.readouterr()
    err = captured.out + captured.err
    for x in short:                     # the step line shows the missing groups and updates
        line = next(l for l in err.splitlines() if l.startswith(f"step {x['step']:4d}"))
        assert f"groups {x['generation/groups_kept']}/4" in line
        if x["updates"] < x["updates_asked"]:
            assert f"{x['updates']}/{x['updates_asked']} upd" in line


def test_resume_is_exact_after_a_kill_inside_a_filled_step(monkeypatch, tmp_path):
    monkeypatch.setattr(train, "score", stub_score)
    args = ["--preset", "tiny", "--max_steps", "4", "--eval_limit", "0", "--max_generation_rounds", "10"]
    assert run_main([*args, "--output_dir", str(tmp_path / "whole")]) == 0
    whole = rows(str(tmp_path / "whole"))
    assert all(x["generation/rounds"] > 1 for x in whole)

    # the same run killed in the second round of step 3 (the checkpoint is at step 2)
    real, calls = cegppo.rollout, []
    rounds_before = sum(x["generation/rounds"] for x in whole[:2])

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == rounds_before + 2:
            raise KeyboardInterrupt           # kill -9 as far as the run folder can tell
        return real(*a, **k)

    out = str(tmp_path / "killed")
    monkeypatch.setattr(cegppo, "rollout", dies)
    with pytest.raises(KeyboardInterrupt):
        run_main([*args, "--output_dir", out])
    monkeypatch.setattr(cegppo, "rollout", real)
    assert len(rows(out)) == 2
    assert run_main([*args, "--output_dir", out, "--resume"]) == 0
    resumed = rows(out)
    assert [x["step"] for x in resumed] == [1, 2, 3, 4]
    for x, y in zip(whole, resumed):
        for k in ("reward", "entropy", "loss", "generation/prompts", "generation/rounds", "num_tokens",
                  "clip_ratio/low_mean", "clip_ratio/high_mean"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)


# ----------------------------------------------------------------------------------------------
# The dense copy's fallback, and a collapsed run
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["oom", "non-finite", "oom-building"])
def test_dense_copy_failure_falls_back_to_the_policy(monkeypatch, tmp_path, failure):
    real_copy, real_give_up = dense_copy.dense_copy, Sampler._give_up
    held, alive_when_given_up = [], []        # a tensor the failed call allocated; alive when the copy is given up?

    def failing_copy(model, into=None):
        if failure == "oom-building":
            half_built = torch.empty(1000)                   # what a half-built copy had allocated
            held.append(weakref.ref(half_built))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        dense = real_copy(model, into)
        if failure == "non-finite":
            with torch.no_grad():       # a merged weight: the copy's own tensor (the head is shared)
                dense.model.layers[0].self_attn.q_proj.weight[0].fill_(float("inf"))
        else:
            def oom(**kw):
                cache = torch.empty(1000)                    # what the failed generate() had allocated
                held.append(weakref.ref(cache))
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            dense.generate = oom
        return dense

    def giving_up(self, error):
        gc.collect()
        alive_when_given_up.append(any(ref() is not None for ref in held))
        return real_give_up(self, error)

    monkeypatch.setattr(dense_copy, "dense_copy", failing_copy)
    monkeypatch.setattr(Sampler, "_give_up", giving_up)
    out = str(tmp_path / failure)
    assert run_main(["--preset", "tiny", "--max_steps", "2", "--eval_limit", "0", "--rollout_model", "dense",
                     "--output_dir", out]) == 0
    r = rows(out)
    assert [x["sampling/dense_fallback"] for x in r] == [1, 0]       # once; step 2 samples through the policy
    assert "time/rollout_copy_s" not in r[1]
    assert all(x["updates"] >= 1 for x in r)
    # what the failed call had allocated is freed before the copy is given up (and the GPU's cache
    # emptied), not held by the exception's traceback through the fallback
    assert alive_when_given_up == [False]


def test_a_collapsed_run_says_so_saves_and_stops(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train, "score", lambda texts, answers: torch.zeros(len(texts)))
    out = str(tmp_path / "collapsed")
    assert run_main(["--preset", "tiny", "--max_steps", "10", "--eval_limit", "0", "--collapse_patience", "3",
                     "--max_generation_rounds", "1", "--output_dir", out]) == runlog.COLLAPSED
    assert [x["updates"] for x in rows(out)] == [0, 0, 0]
    assert rows(out)[-1]["stopped"] == "collapsed" and "stopped" not in rows(out)[0]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("collapsed: no group has carried a reward signal since step 0")
    assert "--beta1" in last and "--learning_rate" in last
    state = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=True)
    assert state["step"] == 3
    # resumed (as an interrupted --seeds run resumes every seed), a collapsed run stays stopped
    assert run_main(["--preset", "tiny", "--max_steps", "10", "--eval_limit", "0", "--collapse_patience", "3",
                     "--max_generation_rounds", "1", "--output_dir", out, "--resume"]) == runlog.COLLAPSED
    assert len(rows(out)) == 3


def test_a_saturated_run_stops_with_its_adapter(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train, "score", lambda texts, answers: torch.ones(len(texts)))
    out = str(tmp_path / "saturated")
    assert run_main(["--preset", "tiny", "--max_steps", "10", "--eval_limit", "0", "--collapse_patience", "2",
                     "--max_generation_rounds", "1", "--output_dir", out]) == 0
    assert len(rows(out)) == 2 and rows(out)[-1]["stopped"] == "saturated"
    assert "saturated: every group has scored all right" in capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))


def test_a_split_run_is_neither_collapsed_nor_saturated(monkeypatch, tmp_path, capsys):
    # each group all right or all wrong, two of each: no signal, but the model has not collapsed
    # (it solves half the prompts every time) and is not done (it never solves the others)
    G = train.parse_config(["--preset", "tiny"]).num_generations
    monkeypatch.setattr(train, "score", lambda texts, answers: torch.tensor(
        [1.0 if (i // G) % 2 == 0 else 0.0 for i in range(len(texts))]))
    out = str(tmp_path / "split")
    assert run_main(["--preset", "tiny", "--max_steps", "10", "--eval_limit", "0", "--collapse_patience", "2",
                     "--max_generation_rounds", "1", "--output_dir", out]) == runlog.SPLIT == 4
    assert len(rows(out)) == 2 and rows(out)[-1]["stopped"] == "split"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("split: every group has scored all right or all wrong since step 0 (2 steps; "
                           "the last step: 2 groups all right, 2 all wrong)")
    # not counted as a collapse by the seed table, and a --seeds run goes on to its next seed
    import plot
    assert plot.run_summary(out)["collapse_step"] is None
    assert runlog.SPLIT in runlog.NO_SIGNAL_EXIT


def test_the_no_signal_label_covers_every_step_since_the_last_signal(monkeypatch, tmp_path, capsys):
    # the label of a window of steps without signal, step by step: all wrong, then all right, is split
    kind = train.no_signal_kind
    wrong, right, both = (runlog.Sampled(all_right=r, all_wrong=w) for r, w in ((0, 4), (4, 0), (2, 2)))
    assert [kind(wrong), kind(right), kind(both)] == ["collapsed", "saturated", "split"]
    assert [kind(wrong, "collapsed"), kind(right, "saturated"), kind(right, "collapsed"), kind(wrong, "saturated"),
            kind(wrong, "split"), kind(both, "collapsed")] == ["collapsed", "saturated", "split", "split", "split",
                                                               "split"]
    # a run whose steps score all wrong, all wrong, then all right: not saturated (exit 0, its adapter
    # saved as if done) on the strength of the last step, but split
    calls = []

    def scores(texts, answers):
        calls.append(1)
        return torch.full((len(texts),), 1.0 if len(calls) == 3 else 0.0)
    monkeypatch.setattr(train, "score", scores)
    out = str(tmp_path / "window")
    assert run_main(["--preset", "tiny", "--max_steps", "10", "--eval_limit", "0", "--collapse_patience", "3",
                     "--max_generation_rounds", "1", "--output_dir", out]) == runlog.SPLIT
    assert rows(out)[-1]["stopped"] == "split" and not os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("split: every group has scored all right or "
                                                                         "all wrong since step 0 (3 steps")


def test_quadrant_fractions_of_the_trained_tokens_add_up_to_1(tmp_path):
    out = str(tmp_path / "q")
    assert run_main(["--preset", "tiny", "--max_steps", "2", "--eval_limit", "0", "--output_dir", out]) == 0
    for x in rows(out):
        assert x["trained_responses"] > 0
        fracs = [x[f"quadrants/{q}_frac"] for q in cegppo.QUADRANTS]
        assert sum(fracs) == pytest.approx(1.0, abs=1e-6)


def test_non_finite_logits_through_the_policy_skip_the_round(monkeypatch, tmp_path, capsys):
    # fp16 sampling through the policy itself can overflow too; with no copy to give up, the round's
    # prompts are skipped, counted and said, and the step fills from the next round
    real, calls = cegppo.rollout, []

    def overflowing_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise cegppo.NonFiniteLogits("the sampler's logits are not finite")
        return real(*a, **k)
    monkeypatch.setattr(cegppo, "rollout", overflowing_once)
    out = str(tmp_path / "nonfinite")
    assert run_main(["--preset", "tiny", "--max_steps", "2", "--eval_limit", "0", "--rollout_model", "policy",
                     "--output_dir", out]) == 0
    r = rows(out)
    assert [x["sampling/non_finite_rounds"] for x in r] == [1, 0]
    assert r[0]["generation/rounds"] >= 1 and r[0]["updates"] >= 1            # the skipped round not counted
    said = capsys.readouterr()
    assert "the policy's sampling logits are not finite" in said.out + said.err     # tqdm.write: stdout
    # one generation round per step (dynamic sampling off): a skipped round is not used up
    calls.clear()
    out1 = str(tmp_path / "one-round")
    assert run_main(["--preset", "tiny", "--max_steps", "1", "--eval_limit", "0", "--rollout_model", "policy",
                     "--max_generation_rounds", "1", "--output_dir", out1]) == 0
    r = rows(out1)[0]
    assert (r["sampling/non_finite_rounds"], r["generation/rounds"]) == (1, 1) and r["updates"] >= 1
    # the dense copy fails, and so does its retry through the policy: the copy is given up, the round skipped
    calls.clear()
    monkeypatch.setattr(cegppo, "rollout", lambda *a, **k: calls.append(1) or (
        real(*a, **k) if len(calls) > 2 else (_ for _ in ()).throw(cegppo.NonFiniteLogits("x"))))
    out2 = str(tmp_path / "both")
    assert run_main(["--preset", "tiny", "--max_steps", "1", "--eval_limit", "0", "--rollout_model", "dense",
                     "--output_dir", out2]) == 0
    r = rows(out2)[0]
    assert (r["sampling/dense_fallback"], r["sampling/non_finite_rounds"]) == (1, 1) and r["updates"] >= 1
    # every round non-finite: the overflow is the model's; one clear line after three, not a traceback
    monkeypatch.setattr(cegppo, "rollout", lambda *a, **k: (_ for _ in ()).throw(cegppo.NonFiniteLogits("x")))
    with pytest.raises(errors.UserError, match=r"step 1: the policy's sampling logits were not finite in 3 rounds"):
        run_main(["--preset", "tiny", "--max_steps", "2", "--eval_limit", "0", "--rollout_model", "policy",
                  "--output_dir", str(tmp_path / "always")])


def test_the_kv_cache_is_kept_in_the_autocast_dtype(moved_policy, monkeypatch):
    # through the 4-bit policy k and v come out in float32; under autocast (a GPU's, here the CPU's
    # bf16) generate() gets a cache that stores them in bf16 as they come: half the memory, no cast of
    # the whole cache at every step, and the very numbers attention would have cast them to
    model, tok = moved_policy
    prompts = [cegppo.format_prompt(tok, q) for q, _ in lab.toy_rows("train", tiny=True)[:3]]
    stored, real = [], generation.CastKVCache.update

    def recording(self, k, v, layer, *a, **kw):
        out = real(self, k, v, layer, *a, **kw)
        stored.append((k.dtype, out[0].dtype, out[1].dtype))
        return out

    def run():
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cegppo.rollout(model, tok, prompts, 4, 12, 1.0, 1.0, Generator(64))
    monkeypatch.setattr(generation.CastKVCache, "update", recording)
    torch.manual_seed(0)
    cegppo.rollout(model, tok, prompts, 4, 12, 1.0, 1.0, Generator(64))                # no autocast (a CPU): the default cache
    assert not stored
    cast = run()
    # what the cache holds is bf16; what it is given is the 4-bit layers' float32 at every decode step
    # (the prompt's keys and values, encoded once and expanded per sub-batch, come in already bf16)
    assert stored and {s[1:] for s in stored} == {(torch.bfloat16, torch.bfloat16)}
    assert {s[0] for s in stored} <= {torch.float32, torch.bfloat16} and (torch.float32, torch.bfloat16,
                                                                         torch.bfloat16) in stored

    class Plain(generation.DynamicCache):             # the default cache, for comparison
        def __init__(self, dtype, **kwargs):
            super().__init__(**kwargs)
    monkeypatch.setattr(generation, "CastKVCache", Plain)
    plain = run()
    assert cast.texts == plain.texts and torch.equal(cast.sample_logp, plain.sample_logp)


def test_the_sampler_correction_reaches_the_loss_and_the_metrics(tmp_path, monkeypatch):
    # --old_logprobs policy (a GPU's default) under bf16 autocast, simulated on the CPU: the sampler's
    # log-probs (generate(), one token at a time) and pi_old (the training forward over whole rows)
    # round differently, so the weights pi_old / pi_sample are not 1 and must reach each token's loss
    real_autocast = models.autocast
    monkeypatch.setattr(models, "autocast", lambda device, dtype: torch.autocast("cpu", dtype=torch.bfloat16)
                        if device == "cpu" else real_autocast(device, dtype))
    runs = runs_differing_in(tmp_path, "--sampler_correction", ("off", "token_truncate"), "--model", "tiny",
                             "--old_logprobs", "policy", "--sampler_correction_cap", "1.001")
    for off, on in zip(runs["off"], runs["token_truncate"]):
        assert on["reward"] == off["reward"] and on["num_tokens"] == off["num_tokens"]    # the same samples
        assert on["sampling/sampling_logp_difference/mean"] > 0                           # bf16 rounding
        # off: every weight exactly 1; on: weights on both sides of 1, those above the cap cut to it
        assert off["sampling/importance_sampling_ratio/min"] == off["sampling/importance_sampling_ratio/max"] == 1
        assert on["sampling/importance_sampling_ratio/min"] < 1 and on["sampling/importance_sampling_ratio/max"] == \
            pytest.approx(1.001)
        assert on["sampling/correction_truncated"] > 0 and off["sampling/correction_truncated"] == 0
    # the first update of step 1 starts from the same policy and tokens: only the weights differ
    assert runs["off"][0]["loss"] != runs["token_truncate"][0]["loss"]


def test_the_samplers_numbers_as_pi_old_in_half_precision_are_warned_about(tmp_path, capsys):
    out = str(tmp_path / "w")
    assert run_main(["--model", "tiny", "--max_steps", "1", "--eval_limit", "0", "--dtype", "bf16",
                     "--old_logprobs", "sampler", "--output_dir", out]) == 0
    assert "warning: --old_logprobs sampler with bfloat16 compute" in capsys.readouterr().err
    assert run_main(["--model", "tiny", "--max_steps", "1", "--eval_limit", "0", "--old_logprobs", "sampler",
                     "--output_dir", str(tmp_path / "fp32")]) == 0
    assert "warning: --old_logprobs sampler" not in capsys.readouterr().err       # float32: they are pi_old


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sampling_through_the_policy_casts_the_head_once(moved_policy, dtype):
    # under autocast (a GPU's, here the CPU's) the 4-bit policy's float32 LM head would be cast to the
    # compute dtype at every decode step; generation.head_cast_once casts it once per rollout, and the
    # samples and their log-probs are bit for bit those of the per-step casts (counted with torch's
    # profiler: aten::_to_copy on the head's [V, d] shape)
    model, tok = moved_policy
    head = model.get_output_embeddings()
    assert head.weight.dtype == torch.float32
    prompts = [cegppo.format_prompt(tok, q) for q, _ in lab.toy_rows("train", tiny=True)[:2]]

    def run(once):
        torch.manual_seed(0)
        with torch.profiler.profile(record_shapes=True) as prof, torch.autocast("cpu", dtype=dtype):
            if once:
                ro = cegppo.rollout(model, tok, prompts, 4, 12, 1.0, 1.0, Generator(64))
            else:
                with pytest.MonkeyPatch.context() as m:
                    m.setattr(generation, "head_cast_once", lambda model: contextlib.nullcontext())
                    ro = cegppo.rollout(model, tok, prompts, 4, 12, 1.0, 1.0, Generator(64))
        casts = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes and
                 list(e.input_shapes[0]) == list(head.weight.shape)]
        return ro, len(casts)
    once, n_once = run(True)
    per_step, n_per_step = run(False)
    steps = once.completion_mask.shape[1]
    assert n_once == 1 and n_per_step == steps > 1
    assert once.texts == per_step.texts and torch.equal(once.sample_logp, per_step.sample_logp)
    assert "forward" not in vars(head)                        # the head's own forward is back


def test_train_and_eval_show_the_generation_progress_when_asked(tmp_path):
    # the bars reach the real scripts: --progress on shows them inside each rollout and evaluation call;
    # auto stays quiet where output is not a terminal (here: captured, as in logs and CI)
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    said = {}
    for mode in ("on", "auto"):
        out = str(tmp_path / mode)
        t = subprocess.run([sys.executable, "train.py", "--model", "tiny", "--max_steps", "1", "--eval_limit", "4",
                            "--progress", mode, "--output_dir", out], cwd=root, capture_output=True, text=True)
        e = subprocess.run([sys.executable, "eval.py", "--model", "tiny", "--dataset", "tiny", "--limit", "4",
                            "--max_completion_length", "12", "--progress", mode, "--output_dir", out + "-eval"],
                           cwd=root, capture_output=True, text=True)
        assert t.returncode == 0 and e.returncode == 0, (t.stderr + e.stderr)[-3000:]
        said[mode] = (t.stderr, e.stderr)
    (train_on, eval_on), (train_auto, eval_auto) = said["on"], said["auto"]
    assert "rollout:" in train_on and "eval: generating:" in train_on          # train.py's held-out evaluation too
    assert "eval: generating:" in eval_on
    assert not any(s in text for s in ("rollout:", "eval: generating:", "eval:") for text in (train_auto, eval_auto))
