"""LoRA via PEFT: only adapters train; the KL reference is the base model with adapters
disabled (no second copy of the weights)."""

import pytest
import torch

pytest.importorskip("peft")

from segrl.algos.logprobs import sequence_logprobs
from segrl.algos.samples import TrainSample
from segrl.configs import LoRAConfig, load_config
from segrl.models.lora import apply_lora, is_peft_model, trainable_parameters
from tiny_hf import build_tiny_model, save_tiny_hf

torch.set_num_threads(2)


def test_apply_lora_freezes_base_and_targets_modules():
    model = build_tiny_model(80)
    total0 = sum(p.numel() for p in model.parameters())
    pm = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert is_peft_model(pm)
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(("q_proj" in n or "v_proj" in n) for n in names)
    train, total = trainable_parameters(pm)
    # 2 layers x 2 modules x (A: r x 64 + B: out x r)
    assert train == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)
    assert total == total0 + train
    assert apply_lora(pm, LoRAConfig(r=4)) is pm  # already PEFT: unchanged
    assert apply_lora(build_tiny_model(80), LoRAConfig(r=0)).__class__.__name__ == "LlamaForCausalLM"


def test_all_linear_targets():
    pm = apply_lora(build_tiny_model(80), LoRAConfig(r=2, target_modules=["all-linear"]))
    mods = {n.split(".")[-4] for n, p in pm.named_parameters() if "lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= mods
    assert not any("lm_head" in n for n, _ in pm.named_parameters() if "lora" in n)


def _samples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        c = torch.randint(4, 70, (5 + i % 3,), generator=g).tolist()
        r = torch.randint(4, 70, (4 + i % 4,), generator=g).tolist()
        out.append(TrainSample(c, r, [-4.0] * len(r), [1.0 if i % 2 else -1.0] * len(r), [1] * len(r), group=i // 2))
    return out


def test_trainer_with_lora_reference_is_adapters_disabled(tmp_path):
    from segrl.trainer.trainer import Trainer

    d = save_tiny_hf(tmp_path / "m")
    cfg = load_config(None, {
        "model.name_or_path": str(d), "lora.r": "4", "lora.alpha": "8", "train.beta": "0.1",
        "train.learning_rate": "0.05", "train.warmup_steps": "0", "data.num_train": "20",
        "log.output_dir": str(tmp_path / "run"), "log.progress": "false", "log.report_to": "none",
    })
    tr = Trainer(cfg)
    assert is_peft_model(tr.model)
    assert tr.ref_model == "adapters-disabled"  # no deep copy of the model
    base = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_" not in n}
    # the optimizer only holds the adapters
    opt_params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in opt_params) == trainable_parameters(tr.model)[0]
    samples = _samples()
    batch = tr._collate(samples, 0)
    ids, attn, C = batch.full()
    with torch.no_grad():
        before = sequence_logprobs(tr.model, ids, attn, C, 1.0, 4)[0]
    for _ in range(3):
        m = tr.optimize(samples)
    assert m["kl"] >= 0
    with torch.no_grad():
        after = sequence_logprobs(tr.model, ids, attn, C, 1.0, 4)[0]
        ref = tr._ref_logprobs(batch)
    mask = attn[:, C:].bool()
    assert (after - before)[mask].abs().max() > 1e-3  # the adapters learned something
    assert torch.allclose(ref[mask], before[mask], atol=1e-5)  # reference = the untouched base
    for n, p in tr.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n  # base weights never change


def test_lora_checkpoint_and_final_model(tmp_path):
    from segrl.trainer.trainer import Trainer

    d = save_tiny_hf(tmp_path / "m")
    cfg = load_config(None, {
        "model.name_or_path": str(d), "lora.r": "2", "train.max_steps": "1", "train.prompts_per_step": "2",
        "train.num_generations": "2", "data.num_train": "20", "sampling.max_completion_length": "6",
        "log.output_dir": str(tmp_path / "run"), "log.progress": "false", "log.report_to": "none",
        "eval.eval_before": "false", "eval.eval_after": "false",
    })
    Trainer(cfg).train()
    final = tmp_path / "run" / "final_model"
    assert (final / "adapter_config.json").exists()  # PEFT saves the adapters only
