"""The engine room: the machinery around the algorithm (cegppo.py) and the loop (train.py).

A learner reads cegppo.py and train.py; what they call lives here, each piece in one named place:

    cli          flags parsed from a config dataclass, the flags page, the one error type
    models       the 4-bit + LoRA policy, the precision rule, CPU threads
    data         named datasets, the offline tasks, local files -> (question, answer) rows
    lab          the offline world: tiny Qwen2 models, their tokenizer, the toy tasks and warm starts
    dense_copy   the dense copy of the policy that a GPU's rollout samples from
    shared_prefix  each group's prompt once in the log-prob passes
    sizes        tensor sizes of a Qwen2-style model, the arithmetic of memory accounting
    progress     progress bars inside generate()
    runfiles     a run folder's files: atomic checkpoints, exact resume, rows
    runlog       step timing, peak memory, Ctrl-C, wandb, exit codes
    seeds        --seeds and --jobs: one command, several seeds
    token_page   tokens.html: what the update did to each token
    bench        the maintainers' benchmark (python -m engine.bench)
"""
