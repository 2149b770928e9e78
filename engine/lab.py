"""The offline world: a tiny Qwen2 model, its tokenizer, a toy arithmetic task and a warm start, built in code.

Nothing here touches the network. `--model tiny --dataset tiny` (tests, a first try) and
`--preset lab` (the CPU lab) run train.py and eval.py through exactly the GPU code path
(4-bit loading with bitsandbytes, LoRA, rollout, loss, checkpoints) on a model that is
written to a local folder by the functions below.

The tokenizer is byte-level with one token per printable ASCII character plus Qwen's three
special tokens and a Qwen-style chat template, so `AutoTokenizer` loads it back exactly
(transformers maps a qwen2 model folder to its Qwen2 tokenizer class, which expects byte-level
vocabularies).

The lab task (`--dataset lab`, see sum_solution) is built for the CE-GPPO lesson, not for
arithmetic: "What is a+b+c?" for digits a, b, c, answered in two worked additions. The warm
start's targets give the policy what the paper's analysis needs and a one-step task lacks:
  - longer responses (about 20 tokens) with several tokens of real uncertainty each: the order
    of each addition (4 equally right ways: entropy that no reward asks to keep or lose), the
    occasional off-by-one slip (wrong digits held at low probability: NA&LP tokens), and a bare
    guess instead of the working (always wrong: a lesson RL can learn in a few dozen steps);
  - 140 held-out questions that are new combinations of facts the training split teaches, so
    held-out accuracy measures the method and one question is worth less than 0.01.
The tiny task (`--dataset tiny`, the fast tests) is the older one-step digit arithmetic.

The carry task (`--preset carry`, see carry_solution) is the lab with headroom: "What is 47+38?" for
two-digit numbers, worked digit by digit, where the warm start has nearly never learnt to carry. Its
targets write the tens' sum without the carried 1 in all but CARRY_RATE of the questions that need
one, so the warm-started model solves the questions without a carry and, on those with one, writes
the carry step ("7+1=8,") only rarely: a right answer there needs a token the policy gives about 2%
at first (a low-probability token with a positive advantage when it is sampled: the PA&LP tokens of
the paper). Seven questions in ten need a carry, so most held-out questions are out of the warm
start's reach even at 16 samples, while it solves each of them now and then (docs/lab.md measures it).
"""

import hashlib
import json
import os
import random
import re
import shutil

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import cegppo

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Model sizes: "tiny" for tests (seconds), "lab" for the CPU lab (learns the toy task in minutes).
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "lab": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2),
    # Qwen2.5-0.5B's shapes (vocabulary, tied head included), random weights: for `python -m engine.bench
    # --synthetic-0.5b`, which measures speed and memory where no real checkpoint can be downloaded.
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    # Qwen2.5-1.5B's shapes, random weights: for gpu_check.py, train.py's default model size
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
}


CARRY_RATE = 0.02     # the carry task: the share of its warm-start targets that write the carry they need


def cache_dir():
    return os.environ.get("CEGPPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cegppo"))


def _byte_to_unicode():
    """GPT-2's byte-level alphabet: each byte maps to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(vocab_size=None):
    """A character-level, byte-level BPE tokenizer (no merges) over printable ASCII and newline, plus one
    token for the instruction sentence of cegppo.INSTRUCTION. vocab_size: pad the vocabulary to this
    size with tokens "~0", "~1", ... that encoding never produces but decoding writes out, so that a
    random model with a large vocabulary decodes to distinct texts."""
    b2u = _byte_to_unicode()
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tokens = SPECIAL + [b2u[ord(c)] for c in chars]
    if vocab_size:
        tokens += [f"~{i}" for i in range(vocab_size - len(tokens) - 1)]      # - 1: the instruction token
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:], chat_template=CHAT_TEMPLATE)
    # The fixed instruction of every prompt as one token, as a BPE merge of a frequent phrase would be:
    # prompts shrink from about 110 characters to about 35 tokens, and the CPU lab runs several times faster.
    fast.add_tokens([cegppo.INSTRUCTION])
    return fast


def build_model(size="tiny", seed=0):
    """(random-init Qwen2ForCausalLM, tokenizer), deterministic for a given size and seed."""
    shape = {"tie_word_embeddings": False, **SIZES[size]}
    tok = build_tokenizer(shape.pop("vocab_size", None))
    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, **shape)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def save_atomic(model, tok, folder):
    """Write model and tokenizer to folder via a temp folder and a rename (no half-written cache)."""
    tmp = f"{folder}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    try:
        os.rename(tmp, folder)
    except OSError:          # another process won the race: its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_model_path(size="tiny", seed=0):
    """Folder of the random-init tiny model, built on first use."""
    folder = os.path.join(cache_dir(), f"{size}-init-seed{seed}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        with torch.random.fork_rng():
            save_atomic(*build_model(size, seed), folder)
    return folder


# ----------------------------------------------------------------------------------------------
# The tiny task (tests): one-step arithmetic on digits
# ----------------------------------------------------------------------------------------------
def _expressions(seed, max_operand=9):
    """Every a op b with 1 <= a, b <= max_operand and op in + - * (243 for digits), shuffled with seed."""
    exprs = [f"{a}{op}{b}" for a in range(1, max_operand + 1) for b in range(1, max_operand + 1) for op in "+-*"]
    random.Random(seed).shuffle(exprs)
    return exprs


def _is_test(expr):
    """Held-out split by a hash of the question: the two splits never share a question."""
    return int(hashlib.md5(expr.encode()).hexdigest(), 16) % 5 == 0


def _value(expr):
    """(a, op, b, value) of 'a op b'."""
    a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", expr).groups()
    return a, op, b, {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def toy_solution(expr, rng, guess_frac):
    """A tiny-task warm-start target: '7*8=\\boxed{56}' (always right) or, with probability
    guess_frac, a bare guess '\\boxed{54}' (always off by 1 to 3)."""
    a, op, b, v = _value(expr)
    if rng.random() < guess_frac:
        v += rng.choice([-3, -2, -1, 1, 2, 3])
        return f"\\boxed{{{v}}}"
    return f"{a}{op}{b}=\\boxed{{{v}}}"


# ----------------------------------------------------------------------------------------------
# The lab task: sums of three digits, worked in two steps, each written in either order
# ----------------------------------------------------------------------------------------------
def _sums(seed):
    """Every 'a+b+c' with digits 1..9 (729 questions), shuffled with seed.

    Held-out questions are new combinations of facts the training split teaches (every one-digit
    sum and every 'two-digit + digit' sum up to 27 occurs in it), so held-out accuracy measures the
    worked method, not memorised answers; 140 held-out questions make one worth < 0.01.
    """
    exprs = [f"{a}+{b}+{c}" for a in range(1, 10) for b in range(1, 10) for c in range(1, 10)]
    random.Random(seed).shuffle(exprs)
    return exprs


# ----------------------------------------------------------------------------------------------
# The carry task: two-digit sums, the carry rarely written by the warm start
# ----------------------------------------------------------------------------------------------
def _carry_pairs(seed):
    """The carry task's questions: every (a, b) of two-digit numbers whose ones digits carry, and a third of
    those whose ones do not (picked by a hash), so that about 7 in 10 need a carry; shuffled with seed."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)
             if a % 10 + b % 10 >= 10 or int(hashlib.md5(f"{a}+{b}".encode()).hexdigest(), 16) % 3 == 0]
    random.Random(seed).shuffle(pairs)
    return pairs


def needs_carry(question):
    """Does 'What is a+b?' need a carry from the ones to the tens?"""
    a, b = map(int, question[len("What is "):-1].split("+"))
    return a % 10 + b % 10 >= 10


def carry_rows(split="train", seed=0):
    """[(question, answer)] of the carry task; the held-out split (a hash of the question) is never trained on."""
    pairs = [(a, b) for a, b in _carry_pairs(seed) if _is_test(f"{a}+{b}") == (split != "train")]
    return [(f"What is {a}+{b}?", str(a + b)) for a, b in pairs]


def carry_solution(a, b, rng, carry, slip):
    """A carry-task warm-start target for 'What is {a}+{b}?': '7+8=15,4+3=7,7+1=8,\\boxed{85}', the ones, then
    the tens, then (where the ones' sum has two digits) the carried 1 added, then the answer: the tens' result
    and the ones' last digit. The carry step is written with probability `carry` only: otherwise the target
    stops at the tens' sum and its answer is wrong by 10, the mistake RL has to find its way out of. Each
    addition slips by one with probability `slip` (wrong digits, unlikely: NA&LP tokens)."""
    s0 = _add(a % 10, b % 10, rng, slip)
    s1 = _add(a // 10, b // 10, rng, slip)
    out = f"{a % 10}+{b % 10}={s0},{a // 10}+{b // 10}={s1},"
    if s0 >= 10 and rng.random() < carry:
        t = _add(s1, 1, rng, slip)
        out, s1 = out + f"{s1}+1={t},", t
    return out + f"\\boxed{{{s1}{s0 % 10}}}"


def rows(task, split="train", seed=0):
    """[(question, answer)] of a built-in task: tiny, lab or carry."""
    return carry_rows(split, seed) if task == "carry" else toy_rows(split, tiny=task == "tiny", seed=seed)


def toy_rows(split="train", tiny=False, seed=0):
    """[(question, answer)]: the lab task (three-digit sums), or with `tiny` the tests' 64 / 16 rows
    of one-step digit arithmetic."""
    if tiny:
        exprs = [e for e in _expressions(seed) if _is_test(e) == (split != "train")]
        return [(f"What is {e}?", str(_value(e)[3])) for e in exprs[:64 if split == "train" else 16]]
    exprs = [e for e in _sums(seed) if _is_test(e) == (split != "train")]
    return [(f"What is {e}?", str(sum(map(int, e.split("+"))))) for e in exprs]


def _add(x, y, rng, slip):
    """x + y, off by one with probability slip: the careless slips of the warm start's targets."""
    return x + y + (rng.choice([-1, 1]) if rng.random() < slip else 0)


def sum_solution(expr, rng, guess_frac, slip):
    """A lab warm-start target for 'What is {expr}?' (expr = 'a+b+c').

    guess (probability guess_frac): '\\boxed{17}', the total without working, always off by 1 to 3.
    worked: 'b+a=12,12+c=\\boxed{15}': the first two digits in either order, then the partial sum
    and the last digit in either order. All 4 ways are right, so the policy has entropy that carries
    no reward. (Pairs in any order, 12 ways, were tried: the warm-started 4-layer model then copied
    the wrong digits too often for RL to learn.) Each addition slips by one with probability `slip`,
    which leaves wrong digits as low-probability tokens (NA&LP) that RL has to push down.
    """
    a, b, c = map(int, expr.split("+"))
    if rng.random() < guess_frac:
        return f"\\boxed{{{a + b + c + rng.choice([-3, -2, -1, 1, 2, 3])}}}"
    x, y = (a, b) if rng.random() < 0.5 else (b, a)
    s = _add(x, y, rng, slip)
    t = _add(s, c, rng, slip)
    u, v = (s, c) if rng.random() < 0.5 else (c, s)
    return f"{x}+{y}={s},{u}+{v}=\\boxed{{{t}}}"


def _target(task, question, rng, w):
    """The warm-start target for a question of the task."""
    expr = question[len("What is "):-1]
    if task == "tiny":
        return toy_solution(expr, rng, w["guess_frac"])
    if task == "carry":
        return carry_solution(*map(int, expr.split("+")), rng, w["carry"], w["slip"])
    return sum_solution(expr, rng, w["guess_frac"], w["slip"])


# Warm-start settings per model size: SFT steps, batch, learning rate, share of (wrong) guesses,
# and for the lab the slip rate per addition and the name of the target format (both in the cache
# key, so changing the targets rebuilds the cached warm start).
WARM = {"tiny": dict(steps=300, batch=32, lr=3e-3, guess_frac=0.5),
        "lab": dict(steps=1200, batch=32, lr=3e-3, guess_frac=0.5, slip=0.1, task="sums-4-ways"),
        # the lab's model size, the carry task: the carry step in CARRY_RATE of the targets that need one
        "carry": dict(size="lab", steps=1200, batch=32, lr=3e-3, carry=CARRY_RATE, slip=0.05, task="carry-2digit")}
TASKS = tuple(WARM)                     # the built-in tasks, each also a model (its warm start): --model, --dataset


def warm_start_path(task="lab", seed=0):
    """Folder of the model after a short supervised warm start on the toy task, cached on disk.

    RL only learns from groups whose completions differ in reward, so it needs a policy that
    sometimes succeeds: a random model never writes \\boxed{} and every group is all zeros. The
    warm start teaches the answer format and the arithmetic facts, from targets of which half are
    worked answers (right, but for the lab's occasional slips) and half bare guesses (always wrong,
    see toy_solution and sum_solution), so that RL starts from a mean reward well between 0 and 1
    and has a lesson to learn: work it out (and, on the lab, carefully).
    The folder name is a hash of every setting, so a sweep of runs builds it once.
    """
    w = WARM[task]
    size = w.get("size", task)
    key = hashlib.md5(json.dumps([size, seed, w, SIZES[size], cegppo.INSTRUCTION, CHAT_TEMPLATE, 1],
                                 sort_keys=True).encode()).hexdigest()[:10]
    folder = os.path.join(cache_dir(), f"{task}-warm-{key}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    with torch.random.fork_rng():       # building the cache must not change the caller's random stream
        _warm_start(task, seed, w, folder)
    return folder


def _warm_start(task, seed, w, folder):
    size = w.get("size", task)
    print(f"warm start: supervised fine-tune of the {size} model on the {task} task "
          f"({w['steps']} steps, cached in {folder})", flush=True)
    model, tok = build_model(size, seed)
    train_rows = rows(task, "train", seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=w["lr"], weight_decay=0.0)
    model.train()
    for step in range(w["steps"]):
        batch = [rng.choice(train_rows) for _ in range(w["batch"])]
        prompts = [cegppo.format_prompt(tok, q) for q, _ in batch]
        answers = [_target(task, q, rng, w) + tok.eos_token for q, _ in batch]
        p_ids = [tok(p)["input_ids"] for p in prompts]
        a_ids = [tok(a)["input_ids"] for a in answers]
        L = max(len(p) + len(a) for p, a in zip(p_ids, a_ids))
        ids = torch.full((len(batch), L), tok.pad_token_id)
        labels = torch.full((len(batch), L), -100)
        for i, (p, a) in enumerate(zip(p_ids, a_ids)):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)       # loss on the answer only
        lr = w["lr"] * min(1.0, (step + 1) / 20) * (1 - step / w["steps"]) ** 0.5
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tok.pad_token_id), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % 50 == 0:
            print(f"  warm start step {step + 1}/{w['steps']}  loss {loss.item():.3f}", flush=True)
    save_atomic(model, tok, folder)
