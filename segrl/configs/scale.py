"""Config sections for scaling out: LoRA adapters and multi-process training."""

from __future__ import annotations

from dataclasses import dataclass

from .loader import check, option


@dataclass
class LoRAConfig:
    """LoRA adapters (PEFT). With ``r > 0`` only the adapters train, and the KL reference
    policy is the same model with its adapters disabled (no second copy in memory)."""

    r: int = option(0, help="LoRA rank (0 = off: full fine-tuning).")
    alpha: float = option(16.0, help="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = option(0.0, help="Dropout on the LoRA input.")
    target_modules: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="Module names (suffixes) that get adapters; 'all-linear' = every linear layer but the LM head.",
    )

    def __post_init__(self):
        check(self.r >= 0, "lora.r", "must be >= 0")
        check(self.alpha > 0, "lora.alpha", "must be > 0")
        check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        check(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")


@dataclass
class DistributedConfig:
    """Multi-process training under ``torchrun`` (ignored in a single process)."""

    backend: str = option("auto", help="torch.distributed backend: auto (nccl on GPU, gloo on CPU), gloo, nccl.", choices=("auto", "gloo", "nccl"))
    strategy: str = option("ddp", help="ddp (every rank holds the whole model; small models) or fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state sharded; large models).", choices=("ddp", "fsdp"))
