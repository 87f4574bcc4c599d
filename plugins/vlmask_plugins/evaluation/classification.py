"""Classification of frozen features: linear probes and k-NN (evaluators ``linear_probe``:
:class:`LogisticRegressionProbe`, L-BFGS; ``linear_probe_adam``: :class:`LinearProbe`; ``knn``).

Both read the training manifest's features as the labelled set and report top-1 accuracy on
the validation manifest. Accuracy is over every *labelled* validation clip: a clip whose label
is not among the training classes cannot be predicted and counts as an error (never dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmask.features import EvalFeatures, SplitFeatures, check_pooling
from vlmask.metrics import group_top1, marginalise, top1  # noqa: F401 (marginalise re-exported)

if TYPE_CHECKING:
    import numpy as np


def compute_device(device: str) -> torch.device:
    """``auto``: CUDA when torch sees it, else the CPU; ``cuda`` without CUDA is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch sees no CUDA device")
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))


def _labelled_train(split: SplitFeatures, features: Tensor) -> tuple[Tensor, Tensor]:
    keep = split.labels >= 0
    return features[keep], split.labels[keep]


def _can_classify(features: EvalFeatures) -> bool:
    return features.num_classes > 0 and bool((features.train.labels >= 0).any()) and bool(features.val.labelled.any())


@dataclass
class _Fit:
    weight: Tensor
    bias: Tensor
    holdout_accuracy: float
    holdout_loss: float
    epochs: int


class LinearProbe:
    """Linear probe on frozen features: multinomial logistic regression (the frozen-feature
    protocol of VideoMAE, Tong et al. NeurIPS 2022, and FILS, Ahmadian et al. BMVC 2024).

    Protocol: features are standardised with the mean and standard deviation of the fitting
    clips; a seeded ``holdout`` fraction of the labelled training clips is held out; for each
    L2 penalty in ``weight_decays`` a linear layer (zero init) is trained with Adam on
    mini-batches of ``batch_size`` for up to ``max_epochs`` epochs, keeping the epoch with the
    best held-out accuracy (ties: lower held-out loss) and stopping after ``patience`` epochs
    without improvement. The penalty and epoch with the best held-out accuracy give the
    reported model (it is not refitted on the held-out clips). With fewer than
    two fitting clips after holding out, there is no held-out split: the first penalty is
    trained for ``max_epochs``.

    Reports ``top1`` on the validation clips, and ``verb_top1`` / ``noun_top1`` when every class
    has a verb and a noun (``"<verb> <noun>"`` manifests): the softmax probabilities of the
    classes sharing a verb (noun) are summed and the best verb (noun) is compared with the
    clip's own. ``pooling`` picks the features (``mean`` or ``temporal``, see
    ``features.pool_tokens``); ``device`` ``auto`` fits on CUDA when there is one.
    """

    def __init__(
        self,
        pooling: str = "mean",
        weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2),
        lr: float = 1e-2,
        batch_size: int = 256,
        max_epochs: int = 100,
        patience: int = 15,
        holdout: float = 0.15,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        self.pooling = check_pooling(pooling)
        weight_decays = [float(w) for w in weight_decays]
        if not weight_decays or any(not math.isfinite(w) or w < 0 for w in weight_decays):
            raise ValueError(f"weight_decays must be a non-empty list of numbers >= 0, got {weight_decays}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        self.weight_decays = weight_decays
        self.lr, self.batch_size, self.max_epochs, self.patience = lr, batch_size, max_epochs, patience
        self.holdout, self.seed = holdout, seed
        self.device = compute_device(device)

    def evaluate(self, features: EvalFeatures) -> dict[str, float] | None:
        return _evaluate_pooled_probe(self, features)

    def fit_predict(self, x: Tensor, y: Tensor, x_eval: Tensor, num_classes: int) -> Tensor:
        """Fit on (x, y) with the protocol above; softmax probabilities (M, num_classes) of ``x_eval``."""
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(x.shape[0], generator=generator)
        n_hold = round(x.shape[0] * self.holdout)
        if n_hold < 1 or x.shape[0] - n_hold < 2:
            n_hold = 0
        hold, fit = order[:n_hold], order[n_hold:]
        mean = x[fit].mean(dim=0)
        std = x[fit].std(dim=0, unbiased=False).clamp_min(1e-6) if fit.numel() > 1 else torch.ones_like(mean)

        def standardise(v: Tensor) -> Tensor:
            return ((v - mean) / std).to(self.device)

        fit_x, fit_y = standardise(x[fit]), y[fit].to(self.device)
        hold_x, hold_y = standardise(x[hold]), y[hold].to(self.device)
        decays = self.weight_decays if n_hold else self.weight_decays[:1]
        best: _Fit | None = None
        for decay in decays:
            candidate = self._train(fit_x, fit_y, hold_x, hold_y, num_classes, decay)
            if best is None or (candidate.holdout_accuracy, -candidate.holdout_loss) > (best.holdout_accuracy, -best.holdout_loss):
                best = candidate
        assert best is not None
        with torch.no_grad():
            logits = standardise(x_eval) @ best.weight.T + best.bias
        return logits.softmax(dim=1).cpu()

    def _train(self, x: Tensor, y: Tensor, hold_x: Tensor, hold_y: Tensor, num_classes: int, decay: float) -> _Fit:
        generator = torch.Generator().manual_seed(self.seed + 1)
        weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=self.lr)
        use_holdout = hold_x.shape[0] > 0
        best = _Fit(weight.detach().clone(), bias.detach().clone(), -1.0, math.inf, 0)
        stale = 0
        for epoch in range(1, self.max_epochs + 1):
            for rows in torch.randperm(x.shape[0], generator=generator).to(x.device).split(self.batch_size):
                logits = x[rows] @ weight.T + bias
                loss = F.cross_entropy(logits, y[rows]) + 0.5 * decay * weight.pow(2).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if not use_holdout:
                continue
            with torch.no_grad():
                logits = hold_x @ weight.T + bias
                accuracy = float((logits.argmax(dim=1) == hold_y).float().mean())
                held_loss = float(F.cross_entropy(logits, hold_y))
            if (accuracy, -held_loss) > (best.holdout_accuracy, -best.holdout_loss):
                best = _Fit(weight.detach().clone(), bias.detach().clone(), accuracy, held_loss, epoch)
                stale = 0
            else:
                stale += 1
                if stale >= self.patience:
                    break
        if not use_holdout:
            best = _Fit(weight.detach().clone(), bias.detach().clone(), -1.0, math.inf, self.max_epochs)
        return best


class KNNClassifier:
    """k-nearest-neighbour classifier on frozen features (Wu et al., CVPR 2018 "InstDisc";
    Caron et al., ICCV 2021 "DINO"; the thesis/FILS frozen-feature protocol).

    Features are L2-normalised; each validation clip takes its ``k`` most cosine-similar
    training clips (k is capped at the number of labelled training clips). ``voting``:
    ``weighted`` (default, DINO's eval_knn): each neighbour votes for its class with weight
    ``exp(similarity / temperature)``; ``majority``: one vote each (``1 + 1e-6 * similarity``,
    so a tie between classes goes to the one whose neighbours are closer). The prediction is
    the class with the largest total. Reports ``top1``.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, voting: str = "weighted", pooling: str = "mean",
                 chunk: int = 1024, device: str = "auto") -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if voting not in ("weighted", "majority"):
            raise ValueError(f"voting must be 'weighted' or 'majority', got {voting!r}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.k, self.temperature, self.voting, self.chunk = k, temperature, voting, chunk
        self.pooling = check_pooling(pooling)
        self.device = compute_device(device)

    def evaluate(self, features: EvalFeatures) -> dict[str, float] | None:
        train_x, val_x = features.train.features(self.pooling), features.val.features(self.pooling)
        if train_x is None or val_x is None or not _can_classify(features):
            return None
        bank, bank_labels = _labelled_train(features.train, train_x)
        scores = self.class_scores(bank, bank_labels, val_x, features.num_classes)
        return {"top1": top1(scores, features.val.labels, features.val.labelled)}

    def class_scores(self, bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int) -> Tensor:
        """(M, num_classes) vote totals of the queries' k nearest bank rows."""
        bank = F.normalize(bank.float().to(self.device), dim=1)
        bank_labels = bank_labels.to(self.device)
        k = min(self.k, bank.shape[0])
        out = []
        for part in F.normalize(queries.float().to(self.device), dim=1).split(self.chunk):
            similarity, neighbour = (part @ bank.T).topk(k, dim=1)
            if self.voting == "weighted":
                weights = (similarity / self.temperature).exp()
            else:
                weights = 1.0 + 1e-6 * similarity
            votes = torch.zeros(part.shape[0], num_classes, device=self.device)
            votes.scatter_add_(1, bank_labels[neighbour], weights)
            out.append(votes.cpu())
        return torch.cat(out)


class LogisticRegressionProbe:
    """Linear probe by a convex solver: multinomial logistic regression fitted to convergence with
    L-BFGS (scikit-learn's ``LogisticRegression(solver="lbfgs")``), the regularisation chosen on
    held-out training clips. Same report as :class:`LinearProbe` (``top1``, ``verb_top1``,
    ``noun_top1``).

    Protocol (the linear-evaluation protocol of CLIP, Radford et al. ICML 2021, sec. 3.2 and
    appendix A.3: L-BFGS logistic regression with the inverse L2 strength C swept on a
    validation split; here the sweep is a grid): features are standardised with the training
    clips' mean and std; a seeded ``holdout`` fraction of the labelled training clips is held
    out; for each C in ``cs`` (default 10^-3 .. 10^3) a model is fitted on the rest; the C with
    the best held-out accuracy (ties: lower held-out log-loss, then the smaller C) is refitted on
    all training clips. Nothing to tune: the optimum of a convex problem does not depend on a
    learning rate, epochs or batch size. With fewer than two fitting clips after holding out
    (or one class), ``cs[len(cs) // 2]`` is used without a sweep.
    """

    def __init__(self, pooling: str = "mean", cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0),
                 holdout: float = 0.15, max_iter: int = 1000, seed: int = 0) -> None:
        self.pooling = check_pooling(pooling)
        cs = tuple(float(c) for c in cs)
        if not cs or any(not math.isfinite(c) or c <= 0 for c in cs):
            raise ValueError(f"cs must be a non-empty list of numbers > 0, got {list(cs)}")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.cs, self.holdout, self.max_iter, self.seed = cs, holdout, max_iter, seed
        self.chosen_c: float | None = None

    def evaluate(self, features: EvalFeatures) -> dict[str, float] | None:
        return _evaluate_pooled_probe(self, features)

    def _fit(self, x: "np.ndarray", y: "np.ndarray", c: float) -> Any:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        from threadpoolctl import threadpool_limits

        model = LogisticRegression(C=c, solver="lbfgs", max_iter=self.max_iter, tol=1e-4)
        # BLAS threads follow torch's setting: on a busy CPU, more spinning threads than free
        # cores made one fit 20x slower (benchmarks/README.md, "Linear probes")
        with warnings.catch_warnings(), threadpool_limits(torch.get_num_threads()):
            warnings.simplefilter("ignore", ConvergenceWarning)  # the cap of max_iter is the protocol
            return model.fit(x, y)

    def fit_predict(self, x: Tensor, y: Tensor, x_eval: Tensor, num_classes: int) -> Tensor:
        """Fit on (x, y) with the protocol above; probabilities (M, num_classes) of ``x_eval``
        (0 for classes without a training clip)."""
        import numpy as np
        from sklearn.metrics import log_loss

        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(mean)
        xs = ((x - mean) / std).double().numpy()
        ys = y.numpy()
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed)).numpy()
        n_hold = round(x.shape[0] * self.holdout)
        fit, hold = order[n_hold:], order[:n_hold]
        c = self.cs[len(self.cs) // 2]
        if n_hold >= 1 and len(fit) >= 2 and len(set(ys[fit].tolist())) > 1 and len(self.cs) > 1:
            best: tuple[float, float, float] | None = None
            for candidate in self.cs:
                model = self._fit(xs[fit], ys[fit], candidate)
                p = np.zeros((len(hold), num_classes))
                p[:, model.classes_] = model.predict_proba(xs[hold])
                accuracy = float((p.argmax(axis=1) == ys[hold]).mean())
                loss = float(log_loss(ys[hold], np.clip(p, 1e-12, 1.0), labels=list(range(num_classes))))
                key = (accuracy, -loss, -candidate)
                if best is None or key > best:
                    best, c = key, candidate
        self.chosen_c = c
        if len(set(ys.tolist())) < 2:  # one class: it is always predicted
            out = torch.zeros(x_eval.shape[0], num_classes)
            out[:, int(ys[0])] = 1.0
            return out
        model = self._fit(xs, ys, c)
        probabilities = np.zeros((x_eval.shape[0], num_classes))
        probabilities[:, model.classes_] = model.predict_proba(((x_eval - mean) / std).double().numpy())
        return torch.from_numpy(probabilities).float()


def _evaluate_pooled_probe(probe: Any, features: EvalFeatures) -> dict[str, float] | None:
    """A probe on pooled features (``probe.pooling``, ``probe.fit_predict``): fit on the labelled
    training rows, report on the validation clips; None when the section cannot be computed."""
    train_x, val_x = features.train.features(probe.pooling), features.val.features(probe.pooling)
    if train_x is None or val_x is None or not _can_classify(features):
        return None
    probabilities = probe.fit_predict(*_labelled_train(features.train, train_x), val_x, features.num_classes)
    return _classification_report(probabilities, features)


def _classification_report(probabilities: Tensor, features: EvalFeatures) -> dict[str, float]:
    """``top1`` and, where classes have them, ``verb_top1`` / ``noun_top1`` of class probabilities."""
    val = features.val
    result = {"top1": top1(probabilities, val.labels, val.labelled)}
    labelled_rows = val.labelled.tolist()
    for name, class_groups, truth in (("verb_top1", features.class_verbs, val.verbs),
                                      ("noun_top1", features.class_nouns, val.nouns)):
        truth = [t if ok else None for t, ok in zip(truth, labelled_rows)]
        accuracy = group_top1(probabilities, class_groups, truth)
        if accuracy is not None:
            result[name] = accuracy
    return result
