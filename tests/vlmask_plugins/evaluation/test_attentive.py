"""The attentive probe (V-JEPA's frozen-evaluation protocol) on constructed token sets."""

from __future__ import annotations

import pytest
import torch

from vlmask.types import TokenGrid
from vlmask_plugins.evaluation import AttentiveProbe, EvalFeatures, LinearProbe, SplitFeatures
from vlmask.features import finite_rows, reduce_tokens

CLASSES = 4
TOKENS, DIM = 16, 16


def split_of(tokens: torch.Tensor, labels: torch.Tensor, verbs: list[str] | None = None,
             nouns: list[str] | None = None) -> SplitFeatures:
    n = labels.shape[0]
    return SplitFeatures(pooled={"mean": tokens.float().mean(dim=1)}, labels=labels, labelled=labels >= 0,
                         captions=[""] * n, verbs=verbs or [None] * n, nouns=nouns or [None] * n, tokens=tokens.half())


def marked_tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each clip: random tokens, except ONE token (at a random position) whose feature says the
    class: a marker direction (shared by all classes: the thing to attend to) plus a class
    direction. Every clip's tokens also carry the class direction NEGATED spread over the other
    tokens, so the mean over the clip's tokens holds no class information at all."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    tokens = torch.randn(n, TOKENS, DIM, generator=generator)
    tokens -= tokens.mean(dim=1, keepdim=True)  # every clip's mean: exactly zero
    marker = torch.zeros(DIM)
    marker[-1] = 8.0
    position = torch.randint(0, TOKENS, (n,), generator=generator)
    for i in range(n):
        signal = marker.clone()
        signal[int(labels[i])] += 6.0
        tokens[i, position[i]] += signal
        others = [j for j in range(TOKENS) if j != int(position[i])]
        tokens[i, others] -= signal / len(others)  # the mean stays zero
    return tokens, labels


def features_of(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], **extra) -> EvalFeatures:
    return EvalFeatures(train=split_of(*train), val=split_of(*val), classes=[f"c{i}" for i in range(CLASSES)], **extra)


def test_attends_to_the_one_token_that_carries_the_class_where_mean_pooling_is_blind():
    train, val = marked_tokens(160, seed=0), marked_tokens(80, seed=1)
    assert train[0].mean(dim=1).abs().max() < 1e-5  # nothing in the mean
    features = features_of(train, val)
    attentive = AttentiveProbe(epochs=40, lr=3e-3, batch_size=32, device="cpu").evaluate(features)
    linear = LinearProbe(max_epochs=30, device="cpu").evaluate(features)
    assert attentive["top1"] >= 0.9
    assert linear["top1"] <= 0.45  # chance 0.25: the mean-pooled features hold nothing


def test_random_tokens_with_random_labels_stay_near_chance():
    generator = torch.Generator().manual_seed(3)
    train = (torch.randn(160, TOKENS, DIM, generator=generator), torch.randint(0, CLASSES, (160,), generator=generator))
    val = (torch.randn(200, TOKENS, DIM, generator=generator), torch.randint(0, CLASSES, (200,), generator=generator))
    result = AttentiveProbe(epochs=20, batch_size=32, device="cpu").evaluate(features_of(train, val))
    assert 0.12 <= result["top1"] <= 0.40  # chance 0.25; 200 clips: 2 sigma ~ 0.06


def test_verb_and_noun_are_marginalised_from_action_scores():
    train, val = marked_tokens(160, seed=0), marked_tokens(40, seed=1)
    verbs_of, nouns_of = ["open", "open", "close", "close"], ["door", "box", "door", "box"]
    features = EvalFeatures(
        train=split_of(*train, [verbs_of[int(c)] for c in train[1]], [nouns_of[int(c)] for c in train[1]]),
        val=split_of(*val, [verbs_of[int(c)] for c in val[1]], [nouns_of[int(c)] for c in val[1]]),
        classes=[f"{v} {n}" for v, n in zip(verbs_of, nouns_of)], class_verbs=verbs_of, class_nouns=nouns_of)
    result = AttentiveProbe(epochs=40, lr=3e-3, batch_size=32, device="cpu").evaluate(features)
    assert set(result) == {"top1", "verb_top1", "noun_top1"}
    assert result["verb_top1"] >= result["top1"] and result["noun_top1"] >= result["top1"]


def test_without_token_features_the_section_is_absent_and_the_probe_is_deterministic():
    train, val = marked_tokens(40, seed=0), marked_tokens(20, seed=1)
    features = features_of(train, val)
    features.train.tokens = None
    assert AttentiveProbe(device="cpu").evaluate(features) is None
    again = features_of(train, val)
    probe = AttentiveProbe(epochs=3, device="cpu")
    first = probe.fit_predict(again.train.tokens, again.train.labels, again.val.tokens, CLASSES)
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(first, probe.fit_predict(again.train.tokens, again.train.labels, again.val.tokens, CLASSES))


@pytest.mark.parametrize("kwargs, word", [({"queries": 0}, "queries"), ({"heads": 0}, "heads"), ({"lr": 0}, "lr"),
                                          ({"token_budget": 0}, "token_budget"), ({"weight_decay": -1}, "weight_decay")])
def test_bad_arguments_name_themselves(kwargs, word):
    with pytest.raises(ValueError, match=word):
        AttentiveProbe(**kwargs)


def test_heads_that_do_not_divide_the_width_are_a_clear_error():
    train, val = marked_tokens(8, seed=0), marked_tokens(4, seed=1)
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        AttentiveProbe(heads=3, epochs=1, device="cpu").evaluate(features_of(train, val))


def test_tokens_over_the_budget_are_pooled_spatially_never_in_time():
    grid = TokenGrid(t=2, h=4, w=4)
    tokens = torch.arange(2 * 16, dtype=torch.float32).view(1, 32, 1)
    assert torch.equal(reduce_tokens(tokens, grid, 32), tokens)
    reduced = reduce_tokens(tokens, grid, 8)  # k=2: each slot 4x4 -> 2x2
    assert reduced.shape == (1, 8, 1)
    first_slot = tokens[0, :16, 0].view(4, 4)
    assert reduced[0, 0, 0] == first_slot[:2, :2].mean() and reduced[0, 7, 0] == tokens[0, 16:, 0].view(4, 4)[2:, 2:].mean()
    assert reduce_tokens(tokens, grid, 2).shape == (1, 2, 1)  # 1x1 per slot
    with pytest.raises(ValueError, match="temporal slots"):
        reduce_tokens(tokens, grid, 1)
    with pytest.raises(ValueError, match="do not form"):
        reduce_tokens(tokens[:, :30], grid, 8)


def test_a_row_of_nan_tokens_drops_the_clip():
    pooled = {"mean": torch.zeros(3, 2), "tokens": torch.zeros(3, 4, 2, dtype=torch.float16)}
    pooled["tokens"][1, 2, 0] = float("nan")
    assert finite_rows(pooled).tolist() == [True, False, True]


def quiet_class_tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token: loud noise (std 10) in most dimensions, and the class in the last CLASSES
    dimensions at a hundredth of that scale (+0.05 on the class's dimension, noise std 0.02): the
    information is all there, in directions of low variance."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    tokens = torch.randn(n, TOKENS, DIM, generator=generator) * 10.0
    tokens[:, :, -CLASSES:] = 0.02 * torch.randn(n, TOKENS, CLASSES, generator=generator)
    tokens[torch.arange(n), :, DIM - CLASSES + labels] += 0.05
    return tokens, labels


def test_standardizing_recovers_class_information_in_low_variance_directions():
    features = features_of(quiet_class_tokens(128, seed=0), quiet_class_tokens(64, seed=1))
    settings = {"epochs": 30, "batch_size": 32, "device": "cpu"}
    standardized = AttentiveProbe(**settings)  # the default
    assert standardized.standardize
    assert standardized.evaluate(features)["top1"] >= 0.8
    # without it the per-token LayerNorm leaves the class at ~0.6% of each token's scale: near chance (0.25)
    assert AttentiveProbe(standardize=False, **settings).evaluate(features)["top1"] <= 0.45


def test_depth_adds_self_attention_blocks_before_the_cross_attention():
    from vlmask_plugins.evaluation.attentive import AttentiveClassifier

    assert len(AttentiveClassifier(DIM, CLASSES, depth=1).pooler.blocks) == 0  # V-JEPA's probe
    deeper = AttentiveClassifier(DIM, CLASSES, queries=4, depth=3)  # V-JEPA 2's shape: blocks, then cross-attention
    assert len(deeper.pooler.blocks) == 2
    tokens = torch.randn(5, TOKENS, DIM)
    assert deeper(tokens).shape == (5, CLASSES)
    # the blocks mix tokens: changing one token changes what the others contribute
    shuffled = tokens.clone()
    shuffled[:, 0] += 1.0
    assert not torch.allclose(deeper.pooler.blocks[0](tokens)[:, 1], deeper.pooler.blocks[0](shuffled)[:, 1])
    features = features_of(marked_tokens(160, seed=0), marked_tokens(80, seed=1))
    assert AttentiveProbe(depth=2, epochs=40, lr=3e-3, batch_size=32, device="cpu").evaluate(features)["top1"] >= 0.8
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        AttentiveProbe(depth=0)
    with pytest.raises(ValueError, match="standardize must be true or false"):
        AttentiveProbe(standardize="yes")
