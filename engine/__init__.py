"""The engine room: the machinery around the algorithm (cegppo.py) and the loop (train.py).

A learner reads cegppo.py and train.py; what they call lives here, each piece in one named place:

    cli          flags parsed from train.py's Config (presets, --algo's knobs, the checks), the flags page
    errors       the one error type (UserError): bad input becomes one `error:` line and exit code 2
    models       the 4-bit + LoRA policy, the precision rule, CPU threads
    data         named datasets, the offline tasks, local files -> (question, answer) rows
    lab          the offline world: tiny Qwen2 models, their tokenizer, the toy tasks and warm starts
    generation   generate() at speed and within memory: sub-batches, out-of-memory halving, each prompt once
    dense_copy   the dense copy of the policy that a GPU's rollout samples from
    sampler      what the rollout and the evaluation generate with: the dense copy or the policy
    logprobs     the log-prob passes of a real run: chunked, each group's prompt once (packed), Scorer
    sizes        tensor sizes of a Qwen2-style model, the arithmetic of memory accounting
    memory       memory.py's table: what one train.py step holds on a GPU, computed
    progress     progress bars inside generate()
    runfiles     a run folder's files: atomic checkpoints, exact resume
    rows         a run's .jsonl rows, read while it may still be writing them
    runlog       a step's line and row, timing, peak memory, Ctrl-C, wandb, exit codes
    seeds        --seeds and --jobs: one command, several seeds
    token_page   tokens.html: what the update did to each token
    bench        the maintainers' benchmark (python -m engine.bench)
"""
