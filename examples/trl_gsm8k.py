"""CE-GPPO on GSM8K with TRL's GRPOTrainer: one GPU, several GPUs, or a CPU smoke test.

The loss is cegppo.cegppo_loss through trl_cegppo.CEGPPOTrainer; the reward is cegppo.math_reward;
the prompt is cegppo.format_prompt; the data comes from data.load_rows. Everything else
(generation, batching, processes, logging, checkpoints) is TRL's and accelerate's.

    pip install -r requirements-scale.txt
    accelerate launch --num_processes 4 examples/trl_gsm8k.py --output_dir runs/trl_cegppo
    accelerate launch --num_processes 4 examples/trl_gsm8k.py --beta1 0 --beta2 0 --output_dir runs/trl_grpo
    python examples/trl_gsm8k.py --model Qwen/Qwen2.5-0.5B-Instruct --use_vllm --vllm_mode colocate
    python examples/trl_gsm8k.py --model tiny --dataset tiny --max_steps 2      # CPU, offline, seconds

Flags: this script's own (--model, --dataset, --question_field, --answer_field, --limit, --lora_r,
--lora_alpha) plus every field of CEGPPOConfig, i.e. GRPOConfig / TrainingArguments and --beta1,
--beta2, --dual_clip, --sft_coef (`--help` lists them all; `--config x.yaml` reads them from a file).
The defaults below follow train.py where TRL has the same knob: LoRA rank 16 on all linear layers,
lr 1e-5 constant after warm-up, weight decay 0.1, grad clip 1.0, 512 new tokens, and on one
process train.py's batch: 64 completions (8 prompts x 8) per generation, 4 optimizer updates of
16 each, in micro-batches of 8. TRL counts steps in optimizer updates, train.py in generations
(RL steps) of 4 updates: --max_steps 800, --warmup_steps 20 and --save_steps 100 here are
train.py's 200, 5 and 25.

Batch arithmetic (TRL's): a micro-batch is per_device_train_batch_size completions per process;
an optimizer update sees that x processes x gradient_accumulation_steps; a generation is
per_device_train_batch_size x processes x steps_per_generation completions (whole groups of
num_generations), so it feeds steps_per_generation / gradient_accumulation_steps updates. On N
processes the defaults generate 64 N completions per step: N times train.py's batch.

What is not here: evaluation (use eval.py on the saved adapter: --adapter runs/trl_cegppo), 4-bit
loading (each process holds the model in the compute dtype: bf16, or fp16 on GPUs before Ampere),
train.py's curves.png (TRL logs to the console, to `--report_to wandb/tensorboard/trackio`, and to
trainer_state.json in checkpoints).
"""

import os
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)      # cegppo, trl_cegppo and engine/ live at the repository root

from engine import data, errors, models  # noqa: E402, I001  first: it quiets bitsandbytes' import-time kernel lookup
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import TrlParser  # noqa: E402

import cegppo  # noqa: E402
from trl_cegppo import CEGPPOConfig, CEGPPOTrainer  # noqa: E402


@dataclass
class ScriptArguments:
    model: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={
        "help": "Hub id or local folder; 'tiny' and 'lab' are built in code (engine/lab.py) for offline runs."})
    dataset: str = field(default="gsm8k", metadata={
        "help": "gsm8k, math, tiny, lab, or a local .jsonl / .json / .parquet file."})
    question_field: str | None = field(default=None, metadata={"help": "Question field of a local file."})
    answer_field: str | None = field(default=None, metadata={"help": "Answer field of a local file."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank on all linear layers; 0 trains all weights."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 x rank)."})


def _defaults():
    """train.py's defaults, where CEGPPOConfig has the same knob; flags override them. The precision
    follows the project's one rule (models.compute_dtype): bf16 on GPUs with native bf16 (compute
    capability 8.0+), fp16 with loss scaling on older GPUs (a T4), float32 on a CPU."""
    gpu = torch.cuda.is_available()
    dtype = models.compute_dtype()
    return dict(
        output_dir="runs/trl_cegppo", num_generations=8, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, steps_per_generation=8, max_completion_length=512,
        temperature=1.0, top_p=1.0, learning_rate=1e-5, lr_scheduler_type="constant_with_warmup",
        warmup_steps=20, weight_decay=0.1, max_grad_norm=1.0, max_steps=800, logging_steps=1,
        save_steps=100, seed=42, report_to="none", disable_dropout=True, ddp_find_unused_parameters=False,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, gradient_checkpointing=gpu)


def model_dtype(config, lora_r):
    """The weights' dtype: the compute dtype the config's bf16 / fp16 flags say, except float32 for
    full fine-tuning (--lora_r 0) under fp16, whose loss scaling needs float32 trainable weights
    (with LoRA, peft keeps the adapters in float32 and the frozen base can be fp16)."""
    if config.bf16:
        return "bfloat16"
    return "float16" if config.fp16 and lora_r > 0 else "float32"


def parse(argv=None):
    parser = TrlParser((ScriptArguments, CEGPPOConfig))
    parser.set_defaults(**_defaults())
    script, config = parser.parse_args_and_config(argv)
    return script, config


def math_reward(completions, answer, **kwargs):
    """TRL's reward-function signature: one float per completion. cegppo.math_reward decides (1.0 / 0.0)."""
    def text(c):       # conversational datasets give [{"role": "assistant", "content": ...}]
        return c if isinstance(c, str) else c[-1]["content"]
    return [cegppo.math_reward(text(c), a) for c, a in zip(completions, answer)]


def build_dataset(tokenizer, script):
    """Prompts as train.py formats them (the tokenizer's chat template around question + INSTRUCTION)."""
    rows = data.load_rows(script.dataset, "train", script.question_field, script.answer_field, script.limit)
    if not rows:
        raise errors.UserError(f"--dataset {script.dataset}: no rows")
    return Dataset.from_dict({"prompt": [cegppo.format_prompt(tokenizer, q) for q, _ in rows],
                              "answer": [a for _, a in rows]})


def build_trainer(argv=None):
    script, config = parse(argv)

    with config.main_process_first(desc="model"):   # 'tiny' / 'lab' are built once, by the main process
        name = models.resolve_model(script.model)
    models.check_model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = None
    if script.lora_r > 0:      # dropout 0: dropout would make the ratio differ from 1 even on-policy
        peft_config = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha or 2 * script.lora_r,
                                 lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    config.model_init_kwargs = {"dtype": model_dtype(config, script.lora_r), **(config.model_init_kwargs or {})}
    return CEGPPOTrainer(model=name, reward_funcs=[math_reward], args=config,
                         train_dataset=build_dataset(tokenizer, script), processing_class=tokenizer,
                         peft_config=peft_config)


def train(argv=None):
    """Build, train, save; returns the trainer (tests read trainer.state.log_history)."""
    trainer = build_trainer(argv)
    a = trainer.args
    if trainer.accelerator.is_main_process:
        print(f"CE-GPPO on TRL: {trainer.accelerator.num_processes} process(es) on {trainer.accelerator.device.type}; "
              f"beta1 {a.beta1} beta2 {a.beta2} epsilon {a.epsilon}/{a.epsilon_high} dual_clip {a.dual_clip} "
              f"sft_coef {a.sft_coef}; {a.generation_batch_size} completions per generation, "
              f"{a.steps_per_generation // a.gradient_accumulation_steps * a.num_iterations} updates each", flush=True)
    resume = a.resume_from_checkpoint          # a folder, or true: the latest checkpoint in output_dir
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(a.output_dir)
    return trainer


def main(argv=None):
    train(argv)
    # With several processes, close the process group before Python exits: left to the interpreter's
    # teardown, gloo's worker threads can abort one rank ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    errors.run_script(main)
