"""Evaluation plugins (kind ``evaluator``): frozen-feature protocols of FILS (BMVC 2024).

- ``features``: pooling (``mean``, ``temporal``), extraction, the on-disk feature cache, and
  :class:`EvalFeatures` / :class:`Evaluator` (the interface: ``evaluate(features) -> dict | None``).
- ``classification``: ``linear_probe`` (:class:`LinearProbe`), ``knn`` (:class:`KNNClassifier`),
  verb/noun marginalisation.
- ``text_space``: ``retrieval`` (:class:`RetrievalEvaluator`), ``zero_shot`` (:class:`ZeroShotClassifier`).

``vlmask.evaluate`` drives them (``vlmask eval``, ``vlmask embed``, ``vlmask compare``).
"""

from vlmask.registry import Register
from vlmask_plugins.evaluation.classification import KNNClassifier, LinearProbe, marginalise
from vlmask.features import EvalFeatures, Evaluator, SplitFeatures, pool_tokens
from vlmask_plugins.evaluation.text_space import RetrievalEvaluator, ZeroShotClassifier

__all__ = [
    "EvalFeatures",
    "Evaluator",
    "KNNClassifier",
    "LinearProbe",
    "RetrievalEvaluator",
    "SplitFeatures",
    "ZeroShotClassifier",
    "marginalise",
    "pool_tokens",
    "register_plugins",
]


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    register("evaluator", "linear_probe", LinearProbe)
    register("evaluator", "knn", KNNClassifier)
    register("evaluator", "retrieval", RetrievalEvaluator)
    register("evaluator", "zero_shot", ZeroShotClassifier)
