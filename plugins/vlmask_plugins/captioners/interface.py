"""What a captioner provides (see the package docstring), and how per-frame captions become one."""

from __future__ import annotations

from typing import Sequence

from vlmask.kinds import Captioner, RowCaptioner

#: Frames decoded per clip when a captioner does not say (``frames_per_clip``).
DEFAULT_FRAMES_PER_CLIP = 4


__all__ = ["Captioner", "RowCaptioner", "DEFAULT_FRAMES_PER_CLIP", "word_overlap", "consensus_caption"]

# The captioner contracts are vlmask's (one table of kinds); re-exported here for plugin code.


def word_overlap(a: str, b: str) -> float:
    """Jaccard similarity of the two captions' lower-cased word sets (1.0 for two empty ones).

    >>> word_overlap("a red square moves", "the red square moves left")
    0.5
    """
    words_a, words_b = set(a.lower().split()), set(b.lower().split())
    if not words_a and not words_b:
        return 1.0
    return len(words_a & words_b) / len(words_a | words_b)


def consensus_caption(captions: Sequence[str]) -> str:
    """The caption most similar, on average, to the others (a medoid under :func:`word_overlap`).

    Repeated captions support each other, so the most frequent caption wins when there is
    one; otherwise the one sharing most words with the rest. Empty captions never win while a
    non-empty one exists; ties go to the caption nearest the middle of the list (the middle
    frame of the clip), then to the earlier one.

    >>> consensus_caption(["a dog runs", "a cat sits on a mat", "a dog runs on grass", "a dog runs"])
    'a dog runs'
    >>> consensus_caption(["", "a hand opens a door", ""])
    'a hand opens a door'
    """
    texts = [" ".join(c.split()) for c in captions]
    candidates = [i for i, text in enumerate(texts) if text] or list(range(len(texts)))
    if not candidates:
        return ""
    middle = (len(texts) - 1) / 2

    def score(i: int) -> tuple[float, float, int]:
        others = [word_overlap(texts[i], texts[j]) for j in range(len(texts)) if j != i]
        mean = sum(others) / len(others) if others else 1.0
        return (round(mean, 9), -abs(i - middle), -i)

    return texts[max(candidates, key=score)]
