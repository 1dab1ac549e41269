"""Build the embedded default model: a tiny LLaMA warm-started on the arithmetic task.

``segrl build-default-model --out segrl/models/assets/default`` rebuilds the shipped
model from scratch on CPU (fp32, plain torch loop, AdamW), deterministically from ``seed``.

The supervised stage (SFT on ``prompt + solution + <eos>``, loss on the completion tokens only)
is stopped deliberately early, after :data:`SFT_STEPS` steps, so the model is only partly
competent: well formed (it writes the format and stops), but right on only about a quarter of
held-out problems when sampling at temperature 1.0. That leaves room for a later RL stage
(GRPO with groups of 8 samples at temperature 1.0) to raise accuracy, and makes groups with
mixed rewards common. :data:`SFT_STEPS` was picked with ``--search``, which evaluates during
SFT and stops at the first evaluation whose sampled pass@1 reaches :data:`SEARCH_STOP_AT`
(inside :data:`TARGET_BAND`); the evaluation draws from its own random generator, so training
is identical with or without it.

Search record (seed 0; sampled pass@1 at T=1.0 on the first 500 test problems, 4 samples each;
greedy accuracy in brackets). Accuracy rises steeply around step 750-800::

    step 600: 7.6% (8.5%, 200 problems)   step 770: 15.6% (23.2%)
    step 750: 15.0% (27.2%)               step 780: 20.8% (35.6%)
    step 760: 14.6% (22.4%)               step 790: 27.0% (44.8%)   <- SFT_STEPS
                                          step 800: 31.1% (50.5%, 200 problems)

Shipped model (step 790), 500 test problems x 8 samples at T=1.0: pass@1 27.9%, 74% of the
groups of 8 mixed (neither all right nor all wrong), 99.7% well formed, 100% stop with EOS;
greedy 44.8%.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from segrl.hf_compat import cache_kw, output_cache
from segrl.models.tokenizer import build_tokenizer
from segrl.tasks.arithmetic import arithmetic_correctness, extract_answer, make_arithmetic_task, solution


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class SFTConfig:
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    # Constant learning rate after warm-up, so stopping early is just "fewer steps".


# Chosen with --search (see the module docstring); the rebuild trains exactly this many steps.
SFT_STEPS = 790
DEFAULT_SEED = 0
TARGET_BAND = (0.15, 0.35)  # held-out pass@1 sampled at temperature 1.0
# --search stops at the first evaluation whose sampled pass@1 reaches this value (inside
# TARGET_BAND with a margin on both sides: pass@1 rises steeply at this stage of SFT).
SEARCH_STOP_AT = 0.22


def make_model(vocab_size: int, tok, shape: ModelShape = ModelShape(), seed: int = DEFAULT_SEED) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=64,
    )
    return model


def _encode_sft(rows, tok) -> list[tuple[torch.Tensor, int]]:
    """``(ids, n_prompt)`` per row: ``<bos> prompt solution <eos>``; ``n_prompt`` counts ``<bos>``."""
    out = []
    for row in rows:
        p = tok(row["prompt"])["input_ids"]
        c = tok(solution(row), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((torch.tensor(p + c, dtype=torch.long), len(p)))
    return out


def _collate(batch, pad_id: int):
    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(batch):
        input_ids[i, : len(ids)] = ids
        labels[i, n_prompt : len(ids)] = ids[n_prompt:]
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


@torch.no_grad()
def _sample(model, tok, prompts: list[str], n: int, greedy: bool, gen: torch.Generator, max_new_tokens: int = 64,
            batch_size: int = 256) -> list[list[str]]:
    """Private evaluation helper: ``n`` completions per prompt (a plain KV-cached loop, left-padded)."""
    model.eval()
    flat = [p for p in prompts for _ in range(n)]
    texts: list[str] = []
    for s in range(0, len(flat), batch_size):
        enc = tok(flat[s : s + batch_size], return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        b = ids.shape[0]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache, logits = output_cache(out), out.logits[:, -1]
        done = torch.zeros(b, dtype=torch.bool)
        new = torch.full((b, max_new_tokens), tok.pad_token_id, dtype=torch.long)
        last_pos = pos[:, -1]
        for t in range(max_new_tokens):
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float(), -1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
            new[:, t] = nxt
            done |= nxt == tok.eos_token_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype)], dim=1)
            last_pos = last_pos + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None], **cache_kw(cache),
                        use_cache=True)
            cache, logits = output_cache(out), out.logits[:, -1]
        for row in new.tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            texts.append(tok.decode(row, skip_special_tokens=False).replace(tok.pad_token, ""))
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def evaluate(model, tok, rows, n_samples: int = 8, seed: int = 1234, greedy: bool = True) -> dict:
    """Sampled pass@1 at temperature 1.0 (mean over ``n_samples`` per problem), fraction of
    problems whose samples are mixed (neither all right nor all wrong), well-formedness, and
    greedy accuracy."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    groups = _sample(model, tok, prompts, n_samples, greedy=False, gen=gen)
    per_problem, formed, stopped = [], 0, 0
    for comps, ans in zip(groups, answers):
        clean = [c.removesuffix(tok.eos_token) for c in comps]
        r = arithmetic_correctness(prompts=[None] * len(comps), completions=clean, answer=[ans] * len(comps))
        per_problem.append(sum(r) / len(r))
        formed += sum(extract_answer(c) is not None for c in clean)
        stopped += sum(c.endswith(tok.eos_token) for c in comps)
    total = n_samples * len(rows)
    res = {
        "pass@1_T1": sum(per_problem) / len(rows),
        "mixed_frac": sum(0 < p < 1 for p in per_problem) / len(rows),
        "well_formed": formed / total,
        "stopped": stopped / total,
        "n_problems": len(rows),
        "n_samples": n_samples,
    }
    if greedy:
        comps = [g[0].removesuffix(tok.eos_token) for g in _sample(model, tok, prompts, 1, greedy=True, gen=gen)]
        r = arithmetic_correctness(prompts=prompts, completions=comps, answer=answers)
        res["greedy"] = sum(r) / len(r)
    model.train()
    return res


def build_default_model(
    out_dir: str | Path | None,
    seed: int = DEFAULT_SEED,
    steps: int = SFT_STEPS,
    shape: ModelShape = ModelShape(),
    sft: SFTConfig = SFTConfig(),
    n_train: int = 20000,
    eval_every: int = 0,
    eval_start: int = 0,
    eval_rows: int = 200,
    stop_in_band: bool = False,
    threads: int = 2,
    log=print,
) -> LlamaForCausalLM:
    """Create the tiny LLaMA, SFT it for ``steps`` steps, save it (and the tokenizer) to ``out_dir``.

    With ``eval_every > 0`` it also evaluates on ``eval_rows`` test problems every that many
    steps; with ``stop_in_band`` it stops at the first evaluation whose sampled pass@1 reaches
    :data:`SEARCH_STOP_AT` (how :data:`SFT_STEPS` was chosen). ``threads`` sets torch's CPU
    threads (on this model 1 and 2 threads give bit-identical weights; 1 is much faster on a
    busy CPU).
    """
    torch.set_num_threads(threads)
    t0 = time.time()
    tok = build_tokenizer()
    task = make_arithmetic_task(n_train=n_train, seed=seed)
    model = make_model(len(tok), tok, shape, seed)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    data = _encode_sft(task.train, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=sft.lr, betas=sft.betas, weight_decay=sft.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, sft.warmup_steps)))
    gen = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(data), generator=gen), 0
    model.train()
    history = []
    step = 0
    for step in range(1, steps + 1):
        if cursor + sft.batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=gen), 0
        idx = order[cursor : cursor + sft.batch_size].tolist()
        cursor += sft.batch_size
        input_ids, mask, labels = _collate([data[i] for i in idx], tok.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), sft.grad_clip)
        opt.step()
        sched.step()
        if step % 50 == 0:
            log(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if eval_every and step >= eval_start and step % eval_every == 0:
            res = evaluate(model, tok, task.test[:eval_rows], n_samples=4, greedy=True)
            res["step"] = step
            history.append(res)
            log("eval " + json.dumps(res))
            if stop_in_band and res["pass@1_T1"] >= SEARCH_STOP_AT:
                log(f"sampled pass@1 >= {SEARCH_STOP_AT} at step {step}: stopping")
                break
    model.eval()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        build_tokenizer().save_pretrained(str(out))  # a fresh one: no padding state from evaluation
        meta = {"seed": seed, "sft_steps": step, "shape": asdict(shape), "sft": asdict(sft), "n_train": n_train}
        (out / "build_info.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"done in {time.time() - t0:.0f}s")
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output folder (e.g. segrl/models/assets/default)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--steps", type=int, default=SFT_STEPS)
    ap.add_argument("--search", action="store_true", help="evaluate during SFT and stop in the target band")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-start", type=int, default=0, help="first step evaluated by --search")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--eval", metavar="DIR", default=None, help="only evaluate the model saved in DIR")
    ap.add_argument("--eval-rows", type=int, default=500, help="test problems evaluated (--eval, --search)")
    ap.add_argument("--eval-samples", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval:
        from transformers import AutoTokenizer

        model = LlamaForCausalLM.from_pretrained(args.eval, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(args.eval, local_files_only=True)
        task = make_arithmetic_task(seed=args.seed)
        t = time.time()
        res = evaluate(model, tok, task.test[: args.eval_rows], n_samples=args.eval_samples)
        print(json.dumps(res), f"({time.time() - t:.0f}s)")
        return
    build_default_model(
        args.out,
        seed=args.seed,
        steps=args.steps,
        eval_every=args.eval_every if args.search else 0,
        eval_start=args.eval_start,
        eval_rows=args.eval_rows,
        stop_in_band=args.search,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
