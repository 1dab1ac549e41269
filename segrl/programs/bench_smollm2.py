"""A short real RL run: SmolLM2-135M-Instruct (the ``smollm2-135m`` preset) on easy arithmetic.

The task is one-step addition/subtraction of small numbers asked in plain English through the
model's chat template ("What is 7 + 5? Answer with just the number."), graded by the final
number of the reply (GSM8K-style extraction, :func:`segrl.rewards.math_grading.gsm8k_accuracy`).
The 4-bit-dequantized 135M model gets roughly a fifth of these right, so most sampled groups
have mixed rewards and GRPO has signal from the first step. It is sized for a laptop CPU
(a few minutes per step on 2 cores)::

    python -m segrl.programs.bench_smollm2 --steps 12 --out runs/smollm2-arith

It prints the training reward per step and the held-out greedy accuracy before and after,
and writes ``summary.json`` / ``metrics.jsonl`` in the run directory.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def easy_arithmetic_task(n_train: int = 400, n_test: int = 64, seed: int = 0, max_operand: int = 20):
    from ..rewards.math_grading import gsm8k_accuracy
    from ..tasks.base import Task

    # distinct problems: (a, b) ordered pairs for '+', a >= b for '-'
    if n_train + n_test > max_operand**2 + max_operand * (max_operand + 1) // 2:
        raise ValueError("not enough distinct problems: raise max_operand or lower n_train/n_test")

    def rows(rng, n, split, exclude):
        out, seen = [], set(exclude)
        while len(out) < n:
            a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
            op = rng.choice("+-")
            if op == "-" and b > a:
                a, b = b, a
            key = f"{a}{op}{b}"
            if key in seen:
                continue
            seen.add(key)
            ans = a + b if op == "+" else a - b
            prompt = f"What is {a} {op} {b}? Answer with just the number."
            out.append({"prompt": prompt, "answer": str(ans), "id": f"{split}-{len(out)}", "key": key})
        return out

    test = rows(random.Random(f"easy-test-{seed}"), n_test, "test", ())
    train = rows(random.Random(f"easy-train-{seed}"), n_train, "train", {r["key"] for r in test})
    return Task(name="easy_arithmetic", train=train, test=test, correctness=gsm8k_accuracy)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--algo", default="grpo")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=32, help="max completion tokens")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--lora-r", type=int, default=0)
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/smollm2-arith")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides section.field=value")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from ..configs import load_config
    from ..trainer.trainer import Trainer

    over = {
        "model.name_or_path": a.model,
        "train.algo": a.algo,
        "train.max_steps": str(a.steps),
        "train.prompts_per_step": str(a.prompts),
        "train.num_generations": str(a.generations),
        "train.learning_rate": str(a.lr),
        "train.warmup_steps": "0",
        "train.micro_batch_size": "16",
        "train.seed": str(a.seed),
        "sampling.max_completion_length": str(a.max_tokens),
        "sampling.temperature": "1.0",
        "eval.num_problems": str(a.eval_problems),
        "eval.num_samples": "1",
        "eval.temperature": "0",
        "log.output_dir": a.out,
        "log.progress": "false",
        "log.report_to": "none",
        "log.save_rollouts": "true",
        "lora.r": str(a.lora_r),
    }
    for kv in a.set:
        k, v = kv.split("=", 1)
        over[k] = v
    cfg = load_config(None, over)
    t0 = time.time()
    tr = Trainer(cfg, task=easy_arithmetic_task(seed=a.seed))
    summary = tr.train()
    rewards = [json.loads(l)["reward"] for l in open(tr.run_dir / "metrics.jsonl") if '"reward"' in l]
    zero_std = [json.loads(l)["frac_reward_zero_std"] for l in open(tr.run_dir / "metrics.jsonl") if '"frac_reward_zero_std"' in l]
    out = {
        "model": a.model,
        "algo": a.algo,
        "steps": a.steps,
        "wall_s": round(time.time() - t0, 1),
        "heldout_greedy_acc_before": summary.get("before", {}).get("pass@1"),
        "heldout_greedy_acc_after": summary.get("after", {}).get("pass@1"),
        "train_reward_per_step": [round(r, 3) for r in rewards],
        "frac_groups_all_same_reward_per_step": [round(z, 3) for z in zero_std],
    }
    (tr.run_dir / "bench_smollm2.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
