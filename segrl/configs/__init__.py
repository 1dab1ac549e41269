"""The whole run configuration: one dataclass per component (see each section's fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .loader import ConfigError, describe, load, to_dict
from .scale import DistributedConfig, LoRAConfig
from .sections import DataConfig, EvalConfig, LogConfig, ModelConfig, SamplingConfig, TrainConfig
from .spo import SPOConfig
from .treepo import TreePOConfig


@dataclass
class SegrlConfig:
    """Everything a ``segrl train`` / ``segrl eval`` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    spo: SPOConfig = field(default_factory=SPOConfig)
    treepo: TreePOConfig = field(default_factory=TreePOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Cross-section checks (:func:`segrl.configs.checks.validate`); run on construction,
        call again after changing fields in Python."""
        from .checks import validate

        validate(self)


def load_config(path=None, overrides=None) -> SegrlConfig:
    """Load a :class:`SegrlConfig` from an optional YAML file plus dotted overrides, on top of
    the selected algorithm's recipe defaults (``segrl/recipes/<algo>[_<task>].yaml``)."""
    from ..recipes import implied_overrides, recipe_defaults

    overrides = implied_overrides(path, overrides)  # a data.train_file alone means data.task=file
    return load(SegrlConfig, path, overrides, base=recipe_defaults(path, overrides))


__all__ = [
    "ConfigError",
    "SegrlConfig",
    "ModelConfig",
    "DataConfig",
    "SamplingConfig",
    "TrainConfig",
    "EvalConfig",
    "LogConfig",
    "SPOConfig",
    "TreePOConfig",
    "LoRAConfig",
    "DistributedConfig",
    "load_config",
    "describe",
    "to_dict",
]
