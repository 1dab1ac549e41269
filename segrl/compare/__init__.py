"""``segrl compare``: the methods side by side at equal budgets of generated tokens.

Every method (GRPO, RLOO, SPO-chain, SPO-tree, TreePO, GRPO with TreePO sampling) trains on
the same task and model with the same seeds until the rollout engine has decoded the same
number of tokens (``train.max_generated_tokens``; every sampled token counts, SPO-chain's
Monte-Carlo continuations included), with held-out evaluations before, at evenly spaced
fractions of the budget (``eval.eval_every_tokens``) and after. Outputs under ``--out``:

* ``<method>/seed<k>/`` — each run's directory (as ``segrl train`` writes it);
* ``results.md``, ``results.csv`` — final held-out pass@1, mean and 95% t-interval over
  seeds, generated tokens, steps, training wall-clock; also printed;
* ``accuracy_vs_tokens.png``, ``accuracy_vs_time.png`` — held-out pass@1 curves;
* ``results.json`` — all of the above plus every run's evaluation curve.

Modules: :mod:`.methods` (what is compared, defaults), :mod:`.runner` (one run),
:mod:`.stats` (t-interval), :mod:`.table`, :mod:`.plots`, :mod:`.cli` (the command).
"""

from .cli import main, run_compare

__all__ = ["main", "run_compare"]
