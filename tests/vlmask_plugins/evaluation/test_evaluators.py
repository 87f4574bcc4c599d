"""Evaluators on features whose answer is known: separable clusters, noise, identical
video and text vectors, and verb/noun marginalisation worked out by hand."""

from __future__ import annotations

import pytest
import torch

from vlmask.types import TokenGrid
from vlmask_plugins.evaluation import (
    EvalFeatures,
    Evaluator,
    KNNClassifier,
    LinearProbe,
    LogisticRegressionProbe,
    RetrievalEvaluator,
    SplitFeatures,
    ZeroShotClassifier,
    marginalise,
    pool_tokens,
)
from vlmask_plugins.evaluation.classification import group_top1
from vlmask_plugins.evaluation.text_space import recall_at_k


def split(features: torch.Tensor, labels: torch.Tensor, captions: list[str] | None = None,
          verbs: list[str | None] | None = None, nouns: list[str | None] | None = None,
          temporal: torch.Tensor | None = None, labelled: torch.Tensor | None = None) -> SplitFeatures:
    n = features.shape[0]
    pooled = {"mean": features} if temporal is None else {"mean": features, "temporal": temporal}
    return SplitFeatures(
        pooled=pooled,
        labels=labels,
        labelled=labels >= 0 if labelled is None else labelled,
        captions=captions or [""] * n,
        verbs=verbs or [None] * n,
        nouns=nouns or [None] * n,
    )


def clusters(per_class: int, num_classes: int, dim: int, seed: int, spread: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 3.0
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=generator), labels


CLASSES = ["open drawer", "close drawer", "open door", "close door"]


#: Both linear probes (``linear_probe``: L-BFGS; ``linear_probe_adam``: Adam) must pass the same tests.
PROBES = [LogisticRegressionProbe, LinearProbe]


def gaussian_features(**extra) -> EvalFeatures:
    train_x, train_y = clusters(30, 4, 16, seed=0)
    val_x, val_y = clusters(10, 4, 16, seed=1)
    return EvalFeatures(train=split(train_x, train_y), val=split(val_x, val_y), classes=CLASSES, **extra)


def test_evaluators_satisfy_the_protocol():
    for evaluator in (LinearProbe(), KNNClassifier(), RetrievalEvaluator(), ZeroShotClassifier()):
        assert isinstance(evaluator, Evaluator)


@pytest.mark.parametrize("probe", PROBES)
def test_linear_probes_classify_separable_clusters_almost_perfectly(probe):
    assert probe().evaluate(gaussian_features())["top1"] >= 0.95


def test_separable_clusters_are_classified_almost_perfectly():
    features = gaussian_features()
    assert KNNClassifier(k=5).evaluate(features)["top1"] >= 0.95
    assert KNNClassifier(k=5, voting="majority").evaluate(features)["top1"] >= 0.95


@pytest.mark.parametrize("probe", PROBES)
def test_random_features_with_random_labels_score_near_chance(probe):
    generator = torch.Generator().manual_seed(3)
    make = lambda n: split(torch.randn(n, 32, generator=generator), torch.randint(0, 4, (n,), generator=generator))  # noqa: E731
    features = EvalFeatures(train=make(400), val=make(400), classes=CLASSES)
    assert abs(probe().evaluate(features)["top1"] - 0.25) < 0.08
    assert abs(KNNClassifier().evaluate(features)["top1"] - 0.25) < 0.08


@pytest.mark.parametrize("probe", PROBES)
def test_temporal_pooling_sees_the_order_that_mean_pooling_loses(probe):
    # "forward": slot features (-m, +m); "backward": (+m, -m), plus noise. The mean over time is
    # the same for both classes; the time-keeping concatenation separates them linearly.
    generator = torch.Generator().manual_seed(0)
    motion = torch.randn(8, generator=generator)

    def make(n: int) -> SplitFeatures:
        labels = torch.arange(n) % 2
        sign = (1 - 2 * labels).float()[:, None]  # +1 forward, -1 backward
        tokens = torch.stack([-sign * motion, sign * motion], dim=1) + 0.5 * torch.randn(n, 2, 8, generator=generator)
        pooled = pool_tokens(tokens, TokenGrid(t=2, h=1, w=1))
        return split(pooled["mean"], labels, temporal=pooled["temporal"])

    features = EvalFeatures(train=make(120), val=make(60), classes=["forward", "backward"])
    assert probe(pooling="temporal").evaluate(features)["top1"] >= 0.95
    assert probe(pooling="mean").evaluate(features)["top1"] < 0.7


def test_marginalisation_by_hand():
    # classes: open drawer, close drawer, open door, close door
    p = torch.tensor([[0.4, 0.1, 0.3, 0.2],
                      [0.1, 0.35, 0.3, 0.25]])
    verbs, names = marginalise(p, ["open", "close", "open", "close"])
    assert names == ["close", "open"]
    assert torch.allclose(verbs, torch.tensor([[0.3, 0.7], [0.6, 0.4]]))
    nouns, names = marginalise(p, ["drawer", "drawer", "door", "door"])
    assert names == ["door", "drawer"]
    assert torch.allclose(nouns, torch.tensor([[0.5, 0.5], [0.55, 0.45]]))
    # row 1: the top action is "close drawer" (0.35), but nouns say door (0.55): marginalising
    # is not the same as reading the verb and noun of the top action.
    truth_nouns = ["drawer", "door"]
    assert group_top1(p, ["drawer", "drawer", "door", "door"], truth_nouns) == 0.5  # row 0 tie -> first (door) is wrong
    assert group_top1(p, ["open", "close", "open", "close"], ["open", "close"]) == 1.0
    assert group_top1(p, ["open", None, "open", "close"], ["open", "close"]) is None


@pytest.mark.parametrize("probe", PROBES)
def test_probe_reports_verb_and_noun_accuracy_only_when_classes_have_them(probe):
    verbs = [c.split()[0] for c in CLASSES]
    nouns = [c.split()[1] for c in CLASSES]
    base = gaussian_features()
    val = base.val
    val_with_parts = split(val.pooled["mean"], val.labels,
                           verbs=[verbs[i] for i in val.labels], nouns=[nouns[i] for i in val.labels])
    features = EvalFeatures(train=base.train, val=val_with_parts, classes=CLASSES, class_verbs=verbs, class_nouns=nouns)
    result = probe().evaluate(features)
    assert set(result) == {"top1", "verb_top1", "noun_top1"}
    assert result["verb_top1"] >= result["top1"] and result["noun_top1"] >= result["top1"]
    assert set(probe().evaluate(base)) == {"top1"}


def test_unknown_validation_classes_count_as_errors_and_unlabelled_clips_are_left_out():
    base = gaussian_features()
    labels = base.val.labels.clone()
    labelled = torch.ones_like(labels, dtype=torch.bool)
    labels[:10] = -1  # a class the training set never had
    labelled[30:] = False  # no label at all
    labels[30:] = -1
    val = split(base.val.pooled["mean"], labels, labelled=labelled)
    features = EvalFeatures(train=base.train, val=val, classes=CLASSES)
    # 30 labelled rows, 10 of them unknown (wrong), the other 20 separable (right)
    assert KNNClassifier(k=5).evaluate(features)["top1"] == pytest.approx(20 / 30)


def test_knn_weighted_and_majority_votes_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # majority over k=5: three votes for class 1; weighted (T=0.07): the two close ones win
    assert KNNClassifier(k=5, voting="majority").class_scores(bank, labels, query, 2).argmax().item() == 1
    assert KNNClassifier(k=5, voting="weighted").class_scores(bank, labels, query, 2).argmax().item() == 0
    assert KNNClassifier(k=50).class_scores(bank, labels, query, 2).shape == (1, 2)  # k capped at the bank


def identity_text_space(captions: list[str], vectors: torch.Tensor) -> dict:
    table = dict(zip(captions, vectors))
    return {"project": lambda x: x, "encode_text": lambda texts: torch.stack([table[t] for t in texts])}


def test_retrieval_with_identical_video_and_text_vectors_is_perfect():
    vectors = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    captions = [f"caption {i}" for i in range(12)]
    labels = torch.full((12,), -1)
    features = EvalFeatures(train=split(vectors, labels), val=split(vectors, labels, captions=captions),
                            classes=[], **identity_text_space(captions, vectors))
    assert RetrievalEvaluator().evaluate(features) == {"t2v_r1": 1.0, "t2v_r5": 1.0, "v2t_r1": 1.0, "v2t_r5": 1.0}


def test_retrieval_counts_any_video_with_the_identical_caption_and_skips_missing_captions():
    # videos 0 and 1 share a caption; video 0's vector is the caption's, video 1's is far off.
    # Video 3 has no caption and is left out.
    text = torch.eye(3)
    videos = torch.stack([text[0], -text[0] + 0.1 * text[1], text[1], text[2]])
    captions = ["same", "same", "other", ""]
    features = EvalFeatures(
        train=split(videos, torch.full((4,), -1)),
        val=split(videos, torch.full((4,), -1), captions=captions),
        classes=[],
        **identity_text_space(["same", "other"], text[:2]),
    )
    result = RetrievalEvaluator(ks=(1, 2)).evaluate(features)
    assert result["t2v_r1"] == 1.0  # both distinct captions find one of their videos first
    assert result["v2t_r1"] == pytest.approx(2 / 3)  # video 1 ranks "other" above "same"
    assert result["v2t_r2"] == 1.0


def test_recall_at_k_by_hand():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    relevant = torch.tensor([[False, False, True], [True, False, False]])
    assert recall_at_k(similarity, relevant, (1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_zero_shot_uses_the_class_prompts():
    centres = torch.eye(4)
    prompts = [f"a video of {c}" for c in CLASSES]
    labels = torch.arange(4).repeat(3)
    videos = centres[labels] + 0.1 * torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    features = EvalFeatures(train=split(videos, labels), val=split(videos, labels), classes=CLASSES,
                            **identity_text_space(prompts, centres))
    assert ZeroShotClassifier().evaluate(features) == {"top1": 1.0}
    reversed_space = identity_text_space(prompts, centres.flip(0))
    features.encode_text = reversed_space["encode_text"]
    assert ZeroShotClassifier().evaluate(features) == {"top1": 0.0}
    with pytest.raises(KeyError):  # the bare-label template asks the text encoder for other texts
        ZeroShotClassifier(templates=("{}",)).evaluate(features)


def test_sections_that_cannot_be_computed_return_none():
    features = gaussian_features()  # no projection, no text encoder, no captions
    assert RetrievalEvaluator().evaluate(features) is None
    assert ZeroShotClassifier().evaluate(features) is None
    assert LinearProbe(pooling="temporal").evaluate(features) is None  # no temporal features
    unlabelled = EvalFeatures(train=split(features.train.pooled["mean"], torch.full((120,), -1)),
                              val=features.val, classes=CLASSES)
    assert LinearProbe().evaluate(unlabelled) is None
    assert KNNClassifier().evaluate(unlabelled) is None
    text = identity_text_space(["x"], torch.ones(1, 16))
    no_captions = gaussian_features(**text)
    assert RetrievalEvaluator().evaluate(no_captions) is None


@pytest.mark.parametrize("factory, kwargs, word", [
    (LinearProbe, {"pooling": "max"}, "pooling"),
    (LinearProbe, {"weight_decays": ()}, "weight_decays"),
    (LinearProbe, {"holdout": 1.0}, "holdout"),
    (LinearProbe, {"lr": 0.0}, "lr"),
    (LinearProbe, {"device": "tpu"}, "device"),
    (LogisticRegressionProbe, {"cs": ()}, "cs"),
    (LogisticRegressionProbe, {"cs": (0.0,)}, "cs"),
    (LogisticRegressionProbe, {"holdout": 1.0}, "holdout"),
    (LogisticRegressionProbe, {"pooling": "max"}, "pooling"),
    (KNNClassifier, {"k": 0}, "k must"),
    (KNNClassifier, {"voting": "soft"}, "voting"),
    (KNNClassifier, {"temperature": 0.0}, "temperature"),
    (RetrievalEvaluator, {"ks": (0,)}, "ks"),
    (ZeroShotClassifier, {"templates": ("a video",)}, "templates"),
])
def test_bad_arguments_name_themselves(factory, kwargs, word):
    with pytest.raises(ValueError, match=word):
        factory(**kwargs)


def test_probe_is_deterministic():
    features = gaussian_features()
    probe = LinearProbe(weight_decays=(1e-3,))
    train_x, train_y = features.train.pooled["mean"], features.train.labels
    a = probe.fit_predict(train_x, train_y, features.val.pooled["mean"], 4)
    b = probe.fit_predict(train_x, train_y, features.val.pooled["mean"], 4)
    assert torch.equal(a, b)
    assert torch.allclose(a.sum(dim=1), torch.ones(a.shape[0]))


def test_lbfgs_probe_chooses_c_on_held_out_clips_and_refits_deterministically():
    features = gaussian_features()
    train_x, train_y = features.train.pooled["mean"], features.train.labels
    probe = LogisticRegressionProbe(cs=(1e-6, 1.0))
    a = probe.fit_predict(train_x, train_y, features.val.pooled["mean"], 4)
    assert probe.chosen_c == 1.0  # C = 1e-6 shrinks every weight to ~0: held-out accuracy at chance
    b = probe.fit_predict(train_x, train_y, features.val.pooled["mean"], 4)
    assert torch.equal(a, b) and torch.allclose(a.sum(dim=1), torch.ones(a.shape[0]))
    missing = train_y != 3  # a class with no training clip gets probability 0
    p = LogisticRegressionProbe().fit_predict(train_x[missing], train_y[missing], features.val.pooled["mean"], 4)
    assert p.shape == (40, 4) and float(p[:, 3].abs().max()) == 0.0


def test_the_registered_linear_probe_is_lbfgs_and_the_adam_probe_stays_an_option():
    from vlmask.plugins import default_plugins

    registry = default_plugins().registry
    assert registry.get("evaluator", "linear_probe").factory is LogisticRegressionProbe
    assert registry.get("evaluator", "linear_probe_adam").factory is LinearProbe
