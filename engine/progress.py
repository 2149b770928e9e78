"""Progress bars inside a long generate() call (train.py's and eval.py's --progress)."""

import sys

import torch
from tqdm import tqdm
from transformers import LogitsProcessor


PROGRESS = ("auto", "on", "off")          # train.py's and eval.py's --progress


def progress_shown(mode):
    """Is a progress bar of --progress `mode` shown: on, or auto on a terminal (not in tests or logs)."""
    return mode == "on" or (mode == "auto" and sys.stderr.isatty())


class GenerationProgress(LogitsProcessor):
    """A progress bar that generate() ticks once per decoded token: sequences finished (the bar) and
    tokens generated. For cegppo.rollout's `processors`; it leaves the logits as they are.

    mode "auto": shown on a terminal once a rollout has run `delay_s` seconds (short ones, tests and
    logs stay quiet); "on": always (to `file`); "off": never. One object serves a whole rollout,
    whatever its generation sub-batches: a call whose input is not longer than the last one's is
    the first decode step of the next sub-batch."""

    def __init__(self, desc, sequences, eos_token_ids, mode="auto", delay_s=2.0, file=None):
        self.shown = progress_shown(mode)
        self.bar = tqdm(total=sequences, desc=desc, unit="seq", delay=0 if mode == "on" else delay_s,
                        disable=not self.shown, leave=False, dynamic_ncols=True, file=file or sys.stderr)
        self.eos = torch.tensor(list(eos_token_ids))
        self.tokens, self.done_before, self.last_len, self.sub_batch_tokens = 0, 0, 0, 0
        self.ended = None                                    # [b] bool: the sub-batch's rows that wrote an EOS

    def __call__(self, input_ids, scores):
        if self.ended is None or input_ids.shape[1] <= self.last_len:      # a sub-batch's first decode step
            self.done_before += 0 if self.ended is None else int(self.ended.sum())
            self.eos = self.eos.to(input_ids.device)
            self.ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            self.sub_batch_tokens = 0
        else:                                                # the last column: the token decoded before
            self.ended |= torch.isin(input_ids[:, -1], self.eos)
        self.last_len = input_ids.shape[1]
        finished = int(self.ended.sum())
        self.tokens += input_ids.shape[0] - finished         # a token is decoded now for every live row
        self.sub_batch_tokens += input_ids.shape[0] - finished
        self.bar.update(self.done_before + finished - self.bar.n)
        self.bar.set_postfix_str(f"{self.tokens} tokens", refresh=False)
        return scores

    def retry(self):
        """The sub-batch in progress failed (out of memory) and starts again: what it had counted is dropped."""
        if self.ended is not None:
            self.tokens -= self.sub_batch_tokens
            self.ended = None
        self.sub_batch_tokens = 0

    def processors(self):
        """What to hand cegppo.rollout: this bar, or nothing where it would not show (no cost per token)."""
        return [self] if self.shown else []

    def close(self):
        self.bar.close()
