"""What the rollout and the held-out evaluation generate with: a dense copy of the policy, or the policy itself.

    Sampler        train.py's: --rollout_model's choice made once (auto: the copy on a GPU where it and
                   its sampling fit, counted with engine/sizes.py's formulas), a Generator that keeps the
                   generation batch that fit, and the fallback: a copy that cannot be built, runs out of
                   memory or overflows is given up for the policy for the rest of the run (said once,
                   sampling/dense_fallback); through the policy a non-finite round is skipped (counted,
                   sampling/non_finite_rounds), and NON_FINITE_ROUNDS in one step stop the run in one line
    merge_groups   the groups the rounds of a step kept, as one Rollout
    with_fallback  one call (an evaluation) on a copy built for it, or on the policy where the copy fails
"""

import contextlib
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cegppo
from engine import dense_copy, models, sizes
from engine.errors import UserError
from engine.generation import Generator

NON_FINITE_ROUNDS = 3   # non-finite rounds through the policy in one step before the run stops


class Sampler:
    """The rollout's sampler for one run of train.py: policy, tokenizer and its Config."""

    def __init__(self, policy, tokenizer, cfg, old_logprobs_from):
        self.policy, self.tokenizer, self.cfg = policy, tokenizer, cfg
        gen_batch = min(cfg.generation_batch_size, cfg.prompts_per_step * cfg.num_generations)
        kind = dense_copy.choose(cfg.rollout_model, policy, gen_batch, cfg.max_prompt_length + cfg.max_completion_length,
                                 prompt_tokens=cfg.max_prompt_length, micro_batch=cfg.micro_batch_size,
                                 top_p=cfg.top_p, prompts=sizes.shared_prefill_prompts(cfg))
        self.use_copy = kind == "dense"
        self.generate = Generator(cfg.generation_batch_size, share_prompts=cfg.shared_prefix,
                                  progress=("rollout", cfg.progress))
        self.copy, self.step, self.dense_fallback, self.non_finite_rounds = None, 0, 0, 0
        print(f"sampling through the {'dense copy' if self.use_copy else '4-bit policy'}; pi_old from the "
              f"{'sampler' if old_logprobs_from == 'sampler' else 'policy (one no-grad pass)'}", file=sys.stderr)
        dtype = models.model_compute_dtype(policy)
        if old_logprobs_from == "sampler" and dtype != torch.float32:
            print(f"warning: --old_logprobs sampler with {str(dtype).split('.')[-1]} compute: the sampler's rounded "
                  "numbers stand in for pi_old, so the first update's ratio is not 1 and --sampler_correction has "
                  "nothing to correct (its weights are 1); --old_logprobs auto recomputes pi_old", file=sys.stderr)

    @contextlib.contextmanager
    def rounds(self, step, clock):
        """One step's rollout rounds: the dense copy (where used) built once before them (timed as rollout_copy)
        and freed after, its memory back before the updates; this step's counts start at 0."""
        self.step, self.dense_fallback, self.non_finite_rounds = step, 0, 0
        failure = None
        if self.use_copy:
            try:
                self.copy = clock.time("rollout_copy", dense_copy.dense_copy, self.policy)
            except torch.OutOfMemoryError as e:
                failure = e.with_traceback(None)
        if failure is not None:                          # outside the except: the half-built copy is gone
            self._give_up(failure)
        try:
            yield self
        finally:
            if self.copy is not None:
                dense_copy.release(self.copy)
                self.copy = None

    def rollout(self, prompts, clock):
        """1. One round: G completions of each chat-formatted prompt (cegppo.rollout) from the copy or the
        policy, or None where through the policy the logits were not finite (an fp16 overflow: the round's
        prompts are skipped, the round is not used up, and NON_FINITE_ROUNDS in one step stop the run,
        since the overflow is then the model's, not a sample's). A copy that runs out of memory or overflows
        is given up at once (freeing it gives back far more than halving the generation batch would)."""
        cfg = self.cfg
        for model in (self.copy, self.policy):
            if model is None:
                continue
            self.generate.shrink_on_oom = model is self.policy
            failure = None
            try:
                with models.model_autocast(self.policy):     # the policy's compute dtype on a GPU, also for the copy
                    return clock.time("rollout", cegppo.rollout, model, self.tokenizer, prompts, cfg.num_generations,
                                      cfg.max_completion_length, cfg.temperature, cfg.top_p, self.generate)
            except (torch.OutOfMemoryError, cegppo.NonFiniteLogits) as e:
                if model is self.policy and isinstance(e, torch.OutOfMemoryError):
                    raise
                failure = e.with_traceback(None)         # its frames hold what the failed call allocated
            if model is not self.policy:                 # outside the except: those frames are gone
                self._give_up(failure)
        self.non_finite_rounds += 1
        if self.non_finite_rounds >= NON_FINITE_ROUNDS:
            raise UserError(f"step {self.step}: the policy's sampling logits were not finite in {NON_FINITE_ROUNDS} "
                            "rounds (an fp16 overflow); --resume (from the last checkpoint) with --dtype bf16 on a "
                            "GPU that has it, or --dtype fp32")
        tqdm.write(f"warning: step {self.step}: the policy's sampling logits are not finite (an fp16 overflow?); "
                   "this round's prompts are skipped")
        return None

    def _give_up(self, error):
        """The dense copy ran out of memory or produced non-finite probabilities (fp16 overflow): free it and
        sample through the 4-bit policy from now on. Said once; counted in sampling/dense_fallback."""
        why = "out of memory" if isinstance(error, torch.OutOfMemoryError) else "non-finite probabilities"
        tqdm.write(f"warning: step {self.step}: the dense rollout copy hit {why}; sampling through the 4-bit policy "
                   "from now on (as --rollout_model policy)")
        if self.copy is not None:
            dense_copy.release(self.copy)
            self.copy = None
        elif torch.cuda.is_available():
            torch.cuda.empty_cache()                     # what a half-built copy had allocated
        self.use_copy, self.dense_fallback = False, 1

    def merge(self, parts):
        """One Rollout of the groups [(rollout, group index)] the rounds kept (merge_groups), or None for none."""
        return merge_groups(parts, self.cfg.num_generations, self.tokenizer.pad_token_id)

    def evaluate(self, generate):
        """generate(model) for an evaluation, on a copy built for it where the rollout samples from one
        (with_fallback); non-finite logits through the policy are said, and returned instead of a result:
        (result, None) or (None, the NonFiniteLogits)."""
        result, overflow = with_fallback(self.policy, self.use_copy, generate,
                                         lambda line: tqdm.write(f"warning: evaluation: {line}"))
        if overflow is not None:
            tqdm.write(f"warning: evaluation: {overflow}")
        return result, overflow


def merge_groups(parts, G, pad):
    """One Rollout of the groups [(rollout, group index)], possibly from several rounds: prompts left-padded
    to the longest prompt, completions right-padded to the longest completion; None for no groups."""
    if not parts:
        return None
    L = max(r.prompt_len for r, _ in parts)
    T = max(r.completion_mask.shape[1] for r, _ in parts)
    cols = {k: [] for k in ("input_ids", "attention_mask", "completion_mask", "truncated", "sample_logp",
                            "sample_entropy", "texts")}
    for r, g in parts:
        rows, p, t = slice(g * G, (g + 1) * G), r.prompt_len, r.completion_mask.shape[1]
        for k, value in (("input_ids", pad), ("attention_mask", 0)):
            x = getattr(r, k)
            cols[k].append(torch.cat([F.pad(x[rows, :p], (L - p, 0), value=value),
                                      F.pad(x[rows, p:], (0, T - t), value=value)], 1))
        for k in ("completion_mask", "sample_logp", "sample_entropy"):
            cols[k].append(F.pad(getattr(r, k)[rows], (0, T - t)))
        cols["truncated"].append(r.truncated[rows])
        cols["texts"] += r.texts[rows]
    return cegppo.Rollout(**{k: v if k == "texts" else torch.cat(v) for k, v in cols.items()}, prompt_len=L)


def with_fallback(policy, use_copy, generate, say):
    """generate(model) on a dense copy of `policy` where use_copy, else on the policy itself. A copy that
    cannot be built (out of memory), or whose generate() runs out of memory or gives non-finite logits
    (an fp16 overflow: cegppo.NonFiniteLogits), is freed, `say`s why in one line, and generate(policy)
    runs instead; what the failed call held is freed first (its exception kept without the traceback,
    whose frames would hold it). The copy is released once generate() returns. Returns (result, None),
    or (None, the NonFiniteLogits) where the policy's logits are not finite either."""
    copy, failure = None, None
    if use_copy:
        try:
            copy = dense_copy.dense_copy(policy)
        except torch.OutOfMemoryError as e:
            failure = e.with_traceback(None)
    if copy is not None:
        try:
            return generate(copy), None
        except (torch.OutOfMemoryError, cegppo.NonFiniteLogits) as e:
            failure = e.with_traceback(None)
        finally:
            dense_copy.release(copy)
    if failure is not None:                 # past the except: the failed call's frames are gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        why = "out of memory" if isinstance(failure, torch.OutOfMemoryError) else "non-finite logits"
        say(f"the dense copy hit {why}: generating through the 4-bit policy instead")
    overflow = None
    try:
        return generate(policy), None
    except cegppo.NonFiniteLogits as e:
        overflow = e.with_traceback(None)
    return None, overflow
