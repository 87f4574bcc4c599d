"""Evaluation in the text space: video-text retrieval and zero-shot classification
(evaluators ``retrieval`` and ``zero_shot``).

Both need the run's video-to-text projection (theta) and its frozen text encoder: a video is
``z_V = normalize(theta(mean-pooled features))``, a text ``z_T = normalize(text embedding)``,
and similarity is their dot product (cosine), as in FILS (Ahmadian et al., BMVC 2024, eq. 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmask_plugins.evaluation.classification import top1
from vlmask.features import EvalFeatures
from vlmask.caches import is_missing


def video_embeddings(features: EvalFeatures, mean_features: Tensor) -> Tensor:
    assert features.project is not None
    with torch.no_grad():
        return F.normalize(features.project(mean_features.float()).float(), dim=1)


def text_embeddings(features: EvalFeatures, texts: list[str]) -> Tensor:
    assert features.encode_text is not None
    return F.normalize(torch.as_tensor(features.encode_text(texts)).float(), dim=1)


def recall_at_k(similarity: Tensor, relevant: Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """Recall@k of queries (rows) over a gallery (columns): a query is a hit at k when any
    relevant gallery item is among its k most similar (ties broken by gallery order).

    >>> sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    >>> relevant = torch.tensor([[False, False, True], [True, False, False]])
    >>> recall_at_k(sim, relevant, (1, 2, 3))
    {1: 0.0, 2: 0.5, 3: 1.0}
    """
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} differ")
    order = similarity.argsort(dim=1, descending=True, stable=True)
    ranked_relevant = relevant.gather(1, order)
    return {k: float(ranked_relevant[:, :k].any(dim=1).float().mean()) for k in ks}


class RetrievalEvaluator:
    """Text-to-video and video-to-text retrieval on the validation manifest (FILS, BMVC 2024;
    the R@K protocol of MSR-VTT retrieval as in CLIP4Clip, Luo et al. 2022).

    Clips without a caption are left out. Captions may repeat (synthetic captions, narrations):
    text-to-video queries are the *distinct* captions, each ranking all videos, and a query is a
    hit at K when any video whose caption is identical is among the top K; video-to-text queries
    are the videos, each ranking the distinct captions, a hit when its own caption is among the
    top K. So duplicates neither inflate the query count nor crowd the text gallery. Reports
    ``t2v_r1``, ``t2v_r5``, ``v2t_r1``, ``v2t_r5`` (``ks`` changes the cut-offs: ``t2v_r<K>``).
    Absent without captions, a text encoder or a video-to-text projection.
    """

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        ks = tuple(int(k) for k in ks)
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {ks}")
        self.ks = ks

    def evaluate(self, features: EvalFeatures) -> dict[str, float] | None:
        val = features.val
        mean = val.features("mean")
        if features.project is None or features.encode_text is None or mean is None:
            return None
        rows = [i for i, caption in enumerate(val.captions) if not is_missing(caption)]
        if not rows:
            return None
        captions = [val.captions[i] for i in rows]
        distinct = list(dict.fromkeys(captions))  # first-seen order
        position = {caption: j for j, caption in enumerate(distinct)}
        owner = torch.tensor([position[c] for c in captions])  # (V,) distinct caption of each video
        videos = video_embeddings(features, mean[rows])
        texts = text_embeddings(features, distinct)
        similarity = texts @ videos.T  # (distinct captions, videos)
        relevant = owner[None, :] == torch.arange(len(distinct))[:, None]
        t2v = recall_at_k(similarity, relevant, self.ks)
        v2t = recall_at_k(similarity.T, relevant.T, self.ks)
        result = {f"t2v_r{k}": t2v[k] for k in self.ks}
        result.update({f"v2t_r{k}": v2t[k] for k in self.ks})
        return result


class ZeroShotClassifier:
    """Zero-shot classification through the text encoder (CLIP, Radford et al., ICML 2021;
    FILS, BMVC 2024): each class name is put into every prompt template, the normalised text
    embeddings of a class's prompts are averaged (CLIP's prompt ensembling) and normalised, and
    a video is assigned the class of highest cosine similarity with its projected feature.

    The default template ``"a video of {}"`` follows CLIP's finding that a short context beats
    the bare class name (sec. 3.1.4); set ``templates: ["{}"]`` for bare labels. The classes
    are the training manifest's (the probe's label space); a validation clip of another class
    counts as an error. Reports ``top1``; absent without labels, a text encoder or a projection.
    """

    def __init__(self, templates: tuple[str, ...] = ("a video of {}",)) -> None:
        templates = tuple(templates)
        if not templates:
            raise ValueError("templates must hold at least one template")
        for template in templates:
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ValueError(f"templates must each contain '{{}}' exactly once, got {template!r}")
        self.templates = templates

    def evaluate(self, features: EvalFeatures) -> dict[str, float] | None:
        val = features.val
        mean = val.features("mean")
        if features.project is None or features.encode_text is None or mean is None:
            return None
        if features.num_classes == 0 or not bool(val.labelled.any()):
            return None
        prompts = [template.format(name) for name in features.classes for template in self.templates]
        prompt_embeddings = text_embeddings(features, prompts).view(features.num_classes, len(self.templates), -1)
        class_embeddings = F.normalize(prompt_embeddings.mean(dim=1), dim=1)
        scores = video_embeddings(features, mean) @ class_embeddings.T
        return {"top1": top1(scores, val.labels, val.labelled)}
