"""Evaluation plugins (kind ``evaluator``): frozen-feature protocols of FILS (BMVC 2024).

- ``features``: pooling (``mean``, ``temporal``), extraction, the on-disk feature cache, and
  :class:`EvalFeatures` / :class:`Evaluator` (the interface: ``evaluate(features) -> dict | None``).
- ``classification``: ``linear_probe`` (:class:`LogisticRegressionProbe`, L-BFGS, the default),
  ``linear_probe_adam`` (:class:`LinearProbe`, mini-batch Adam), ``knn`` (:class:`KNNClassifier`),
  verb/noun marginalisation.
- ``attentive``: ``attentive_probe`` (:class:`AttentiveProbe`), V-JEPA's cross-attention pooler
  with learnable queries over the frozen token features.
- ``text_space``: ``retrieval`` (:class:`RetrievalEvaluator`), ``zero_shot`` (:class:`ZeroShotClassifier`).

``vlmask.evaluate`` drives them (``vlmask eval``, ``vlmask embed``, ``vlmask compare``).
"""

from vlmask.registry import Register
from vlmask_plugins.evaluation.attentive import AttentiveProbe
from vlmask_plugins.evaluation.classification import KNNClassifier, LinearProbe, LogisticRegressionProbe, marginalise
from vlmask.features import EvalFeatures, Evaluator, SplitFeatures, pool_tokens
from vlmask_plugins.evaluation.text_space import RetrievalEvaluator, ZeroShotClassifier

__all__ = [
    "AttentiveProbe",
    "EvalFeatures",
    "Evaluator",
    "KNNClassifier",
    "LinearProbe",
    "LogisticRegressionProbe",
    "RetrievalEvaluator",
    "SplitFeatures",
    "ZeroShotClassifier",
    "marginalise",
    "pool_tokens",
    "register_plugins",
]


def register_plugins(register: Register) -> None:
    """Register this package's plugins (called from vlmask_plugins.builtin)."""
    # L-BFGS is the default linear probe: more accurate than the Adam probe on the same features
    # and nothing to tune (benchmarks/README.md, "Linear probes"); the Adam probe stays an option
    register("evaluator", "linear_probe", LogisticRegressionProbe)
    register("evaluator", "linear_probe_adam", LinearProbe)
    register("evaluator", "knn", KNNClassifier)
    register("evaluator", "attentive_probe", AttentiveProbe)
    register("evaluator", "retrieval", RetrievalEvaluator)
    register("evaluator", "zero_shot", ZeroShotClassifier)
