"""Two CPU processes (gloo) give the same update as one process on the same batch.

Each rank builds the real :class:`Trainer` (DDP around the policy), takes its half of one
fixed batch of training samples and runs ``optimize``; the weights after the step must equal
those of a single process that ran ``optimize`` on the whole batch (loss normalisers and the
gradient sum are global). Also: batch statistics (``global_mean_std``, GRPO
``scale_rewards=batch``) over two ranks equal those of the concatenated batch, and prompt
sharding gives disjoint slices.
"""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from segrl.algos.samples import TrainSample

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        c = torch.randint(4, 70, (4 + i % 5,), generator=g).tolist()
        r = torch.randint(4, 70, (3 + (i * 7) % 6,), generator=g).tolist()
        adv = torch.randn(len(r), generator=g).tolist()
        old = (-3.0 - torch.rand(len(r), generator=g)).tolist()
        mask = [1 if (i + j) % 5 else 0 for j in range(len(r))]
        out.append(TrainSample(c, r, old, adv, mask, group=i // 2))
    return out


def _cfg(model_dir, run_dir, strategy="ddp", **extra):
    from segrl.configs import load_config

    over = {
        "model.name_or_path": str(model_dir), "train.learning_rate": "0.01", "train.warmup_steps": "0",
        "train.micro_batch_size": "2", "train.max_grad_norm": "0", "train.beta": "0.0", "train.loss_type": "dapo",
        "data.num_train": "40", "log.output_dir": str(run_dir), "log.progress": "false", "log.report_to": "none",
        "distributed.strategy": strategy,
    }
    over.update(extra)
    return load_config(None, over)


def _use_sgd(tr):
    """Plain SGD (lr 1): the update is exactly minus the gradient, so the comparison is not
    blurred by Adam's first step (which divides by |g| and amplifies rounding in tiny g)."""
    tr.optimizer = torch.optim.SGD([p for p in tr.policy.parameters() if p.requires_grad], lr=1.0)
    return tr


def _weights(model):
    return {n: p.detach().full_tensor().clone() if hasattr(p, "full_tensor") else p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, world, port, model_dir, out_dir, strategy, extra):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    from segrl import distributed as D
    from segrl.trainer.trainer import Trainer

    tr = _use_sgd(Trainer(_cfg(model_dir, Path(out_dir) / "run", strategy, **extra)))
    assert tr.dist.world_size == world and tr.dist.rank == rank
    mine = D.shard(_samples(), tr.dist)
    metrics = tr.optimize(mine)
    # batch statistics across ranks equal those of the concatenated batch
    # (each prompt's whole group on one rank: groups 0-2 on rank 0, 3-4 on rank 1)
    x = torch.arange(10, dtype=torch.float64) ** 1.5
    sl = slice(0, 6) if rank == 0 else slice(6, 10)
    n, mean, std = D.global_mean_std(x[sl])
    adv = tr.algorithm.advantages(x[sl], (torch.arange(10) // 2)[sl])
    # SPO batch whitening and TreePO batch whitening use statistics over both ranks
    from segrl.algos.treepo import normalize_token_advantages, token_weighted_whiten
    from segrl.trainer.spo_algorithms import whiten_samples

    spo = D.shard(_samples(), tr.dist)
    whiten_samples(spo, "batch")
    tw = token_weighted_whiten(x[sl], (torch.arange(10) % 4 + 1)[sl], stats=D.global_mean_std)
    rows = [[float(i)] * (i % 3 + 1) for i in range(10)][sl]
    tok = normalize_token_advantages(rows, "batch_whiten", stats=D.global_mean_std)
    # prompt sharding: disjoint slices of one order, globally unique group ids
    trees = tr.new_trees(3)
    torch.save(
        {"weights": _weights(tr.model), "metrics": metrics, "stats": (n, mean, std), "adv": adv,
         "spo": [s.advantages for s in spo], "treepo": tw, "treepo_tok": tok,
         "rows": [t.row["id"] for t in trees], "groups": [t.group for t in trees]},
        Path(out_dir) / f"rank{rank}.pt",
    )
    D.barrier()
    torch.distributed.destroy_process_group()


def _single(model_dir, run_dir, strategy="ddp", **extra):
    from segrl.trainer.trainer import Trainer

    tr = _use_sgd(Trainer(_cfg(model_dir, run_dir, strategy, **extra)))
    assert not tr.dist.enabled
    metrics = tr.optimize(_samples())
    return tr, metrics


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    from tiny_hf import save_tiny_hf

    return save_tiny_hf(tmp_path_factory.mktemp("dist") / "m")


def _run_two(model_dir, out, strategy="ddp", **extra):
    mp.spawn(_worker, args=(2, _free_port(), str(model_dir), str(out), strategy, extra), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize(
    "strategy,extra",
    [("ddp", {}), ("ddp", {"train.loss_type": "grpo", "train.num_iterations": "2", "train.max_grad_norm": "0.5"}), ("fsdp", {})],
    ids=["ddp-dapo", "ddp-grpo-2iters-clip", "fsdp2-dapo"],
)
def test_two_gloo_processes_equal_one_process(model_dir, tmp_path, strategy, extra):
    ranks = _run_two(model_dir, tmp_path, strategy, **extra)
    tr, m1 = _single(model_dir, tmp_path / "single", **extra)
    w1 = _weights(tr.model)
    changed = max(float((w1[n] - p.detach()).abs().max()) for n, p in _weights(type(tr.model).from_pretrained(model_dir)).items())
    assert changed > 1e-4  # the step did move the weights
    for n in w1:
        assert torch.allclose(ranks[0]["weights"][n], w1[n], atol=1e-6, rtol=1e-5), n
        assert torch.equal(ranks[0]["weights"][n], ranks[1]["weights"][n]), n  # replicas stay identical
    assert abs(ranks[0]["metrics"]["loss"] - m1["loss"]) < 1e-5
    assert abs(ranks[0]["metrics"]["grad_norm"] - m1["grad_norm"]) < 1e-4 * max(1.0, m1["grad_norm"])


def test_batch_statistics_and_prompt_sharding(model_dir, tmp_path):
    ranks = _run_two(model_dir, tmp_path, **{"train.scale_rewards": "batch"})
    x = torch.arange(10, dtype=torch.float64) ** 1.5
    for r in ranks:
        n, mean, std = r["stats"]
        assert n == 10 and abs(mean - float(x.mean())) < 1e-9 and abs(std - float(x.std())) < 1e-9
    # GRPO with scale_rewards=batch: the std is over both ranks' trajectories
    from segrl.algos.advantages import grpo_advantage

    full = grpo_advantage(x, torch.arange(10) // 2, scale_rewards="batch")
    got = torch.cat([ranks[0]["adv"], ranks[1]["adv"]])
    assert torch.allclose(got, full, atol=1e-9)
    # SPO (batch scope) and TreePO (batch_whiten) whitening over both ranks = one process
    from segrl.algos.treepo import normalize_token_advantages, token_weighted_whiten
    from segrl.trainer.spo_algorithms import whiten_samples

    full_spo = _samples()
    whiten_samples(full_spo, "batch")
    for i, smp in enumerate(full_spo):  # shard = items[rank::2]
        assert smp.advantages == pytest.approx(ranks[i % 2]["spo"][i // 2], abs=1e-9)
    tw = token_weighted_whiten(x, torch.arange(10) % 4 + 1)
    assert torch.allclose(torch.cat([ranks[0]["treepo"], ranks[1]["treepo"]]), tw, atol=1e-9)
    tok = normalize_token_advantages([[float(i)] * (i % 3 + 1) for i in range(10)], "batch_whiten")
    flat = [a for row in ranks[0]["treepo_tok"] + ranks[1]["treepo_tok"] for a in row]
    assert flat == pytest.approx([a for row in tok for a in row], abs=1e-9)
    assert abs(tw[0]) > 0.5  # whitened, not left as is
    rows0, rows1 = ranks[0]["rows"], ranks[1]["rows"]
    assert len(rows0) == len(rows1) == 3 and not set(rows0) & set(rows1)
    assert not set(ranks[0]["groups"]) & set(ranks[1]["groups"])


def test_single_process_helpers_are_noops():
    from segrl import distributed as D

    info = D.setup()
    assert not info.enabled and info.is_main
    assert D.all_reduce_sum(3) == 3.0 and D.shard([1, 2, 3]) == [1, 2, 3]
    x = torch.tensor([1.0, 2.0, 4.0])
    n, mean, std = D.global_mean_std(x)
    assert n == 3 and abs(mean - float(x.mean())) < 1e-6 and abs(std - float(x.std())) < 1e-6
    from segrl.algos.advantages import masked_whiten

    m = torch.tensor([1, 1, 0])
    assert torch.allclose(masked_whiten(x, m, stats=D.global_mean_std), masked_whiten(x, m), atol=1e-6)


def _train_worker(rank, world, port, model_dir, out_dir, strategy):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from segrl.trainer.trainer import Trainer

    cfg = _cfg(model_dir, Path(out_dir) / "run", strategy, **{
        "train.max_steps": "2", "train.prompts_per_step": "2", "train.num_generations": "2",
        "sampling.max_completion_length": "6", "eval.num_problems": "4", "eval.num_samples": "1", "log.save_steps": "1",
    })
    Trainer(cfg).train()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_training_run_writes_one_run_directory(model_dir, tmp_path, strategy):
    """A whole (tiny) run under 2 gloo processes: rollouts per rank, evaluation, checkpoints
    and the final model written by rank 0 (FSDP2: gathered full weights), rank 1 logs apart."""
    mp.spawn(_train_worker, args=(2, _free_port(), str(model_dir), str(tmp_path), strategy), nprocs=2, join=True)
    run = tmp_path / "run"
    assert (run / "final_model" / "model.safetensors").exists() and (run / "summary.json").exists()
    assert (run / "rank1" / "metrics.jsonl").exists() and (run / "rollouts.rank1.jsonl").exists()
    assert len(list((run / "checkpoints").glob("*"))) >= 1
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(run / "final_model")
    assert m.config.num_hidden_layers == 2  # full (not sharded) weights
