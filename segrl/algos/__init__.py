"""Pure tensor functions of the method: advantage estimators, losses, samples, log-probs.

Importing the package registers the built-in estimators and loss aggregations in
:mod:`segrl.algos.registry`.
"""

from . import advantages, losses, registry, spo, treepo, treepo_segment  # noqa: F401
