"""LoRA adapters through PEFT.

With ``lora.r > 0`` the policy becomes a ``peft.PeftModel``: the base weights are frozen, only
the low-rank adapters train (and only they are in the optimizer and the checkpoints), and the
KL reference policy is the *same* model run with its adapters disabled
(``model.disable_adapter()``), so no second copy of the weights is kept in memory.
"""

from __future__ import annotations

from ..errors import require


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def apply_lora(model, cfg):
    """Wrap ``model`` with LoRA adapters as described by a :class:`~segrl.configs.LoRAConfig`
    (returned unchanged when ``cfg.r == 0`` or it already is a PEFT model)."""
    if cfg.r <= 0 or is_peft_model(model):
        return model
    require("peft", "peft", "lora.r > 0 (LoRA adapters)", "PEFT")
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules
    targets = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    lc = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lc)
    if getattr(model, "is_gradient_checkpointing", False) and hasattr(peft_model, "enable_input_require_grads"):
        # frozen embeddings give checkpointed blocks inputs without grad; make them carry one
        peft_model.enable_input_require_grads()
    return peft_model


def trainable_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total


def merge_lora(model):
    """A plain ``transformers`` model with the adapters merged into the base weights (for
    export; the PEFT model is consumed)."""
    return model.merge_and_unload() if is_peft_model(model) else model
