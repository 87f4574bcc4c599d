"""A transformers image-to-text model (BLIP, GIT, VisionEncoderDecoder) captioning sampled frames."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmask_plugins.captioners.interface import consensus_caption
from vlmask_plugins.text.interface import check_device, folder_fingerprint, freeze

COMBINES: tuple[str, ...] = ("consensus", "middle")


class HFImageToTextCaptioner:
    """Captions a clip with a local transformers image-to-text model run on its frames.

    FILS (BMVC 2024) captioned its uncaptioned videos once, offline, with a video-to-text model
    (VideoBLIP, built on BLIP-2, Li et al., ICML 2023). This plugin does the same with any
    image captioning model transformers loads as image-text-to-text: BLIP (Li et al., ICML
    2022), GIT (Wang et al., 2022) or a VisionEncoderDecoder (e.g. ViT + GPT-2).

    How a clip gets one caption (``combine``):

    * ``"consensus"`` (default): every one of the ``frames_per_clip`` evenly spaced frames is
      captioned (one batched, greedy ``generate``), and the caption most similar to the others
      (word overlap, :func:`~vlmask_plugins.captioners.interface.consensus_caption`) is kept:
      the clip's most repeated description wins, and a frame caught mid-transition is outvoted.
    * ``"middle"``: only the middle frame is captioned (``frames_per_clip`` times cheaper).

    Decoding is greedy (``do_sample=False``, one beam), so equal frames give equal captions.
    The model folder is loaded with ``local_files_only=True``: nothing is downloaded. Its
    processor is ``AutoProcessor`` when the folder holds one (BLIP, GIT), else
    ``AutoImageProcessor`` + ``AutoTokenizer`` (a VisionEncoderDecoder saved by parts).

    Args:
        path: local folder with ``config.json``, the weights, the image processor and the
            tokenizer (e.g. a ``save_pretrained`` copy of Salesforce/blip-image-captioning-base).
        frames_per_clip: evenly spaced frames decoded per clip.
        max_new_tokens: the longest caption, in tokens (after the prompt).
        prompt: text the caption starts from (BLIP's conditional captioning, e.g.
            ``"a video of"``); the prompt is removed from the returned caption.
        combine: ``"consensus"`` or ``"middle"`` (above).
        short_side: the shorter side frames are decoded at (never upscaled); the processor
            resizes to the model's input anyway, so this only saves decoding work.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    """

    def __init__(
        self,
        path: str,
        frames_per_clip: int = 4,
        max_new_tokens: int = 30,
        prompt: str | None = None,
        combine: str = "consensus",
        short_side: int | None = 384,
        device: str = "cpu",
    ) -> None:
        if not path:
            raise ValueError(
                "path is required for captioner 'hf_image_to_text': a local transformers image-to-text folder "
                "(e.g. a save_pretrained copy of Salesforce/blip-image-captioning-base); nothing is downloaded"
            )
        if not isinstance(frames_per_clip, int) or isinstance(frames_per_clip, bool) or frames_per_clip < 1:
            raise ValueError(f"frames_per_clip must be an integer >= 1, got {frames_per_clip!r}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise ValueError(f"prompt must be None or a non-empty string, got {prompt!r}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if short_side is not None and (not isinstance(short_side, int) or isinstance(short_side, bool) or short_side < 1):
            raise ValueError(f"short_side must be None or an integer >= 1, got {short_side!r}")
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            what = "does not exist" if not folder.exists() else "is not a transformers model folder (no config.json there)"
            raise FileNotFoundError(
                f"captioner 'hf_image_to_text' path {str(folder)!r} {what}; nothing is downloaded, so save the "
                f"model there (save_pretrained) or fix the path"
            )
        self.device = check_device(device)
        self.path = folder.resolve()
        self.frames_per_clip = frames_per_clip
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt.strip() if prompt is not None else None
        self.combine = combine
        self.short_side = short_side

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a captioning pass loads quietly
        self.model = freeze(_load_model(self.path)).to(self.device)
        self.processor, self.image_processor, self.tokenizer = _load_processing(self.path)
        self._lock = threading.Lock()  # fast tokenizers refuse concurrent use from threads
        self.identity: str = (
            f"hf_image_to_text:{self.path.name}:frames_per_clip={frames_per_clip}:combine={combine}:"
            f"max_new_tokens={max_new_tokens}:prompt={self.prompt!r}:short_side={short_side}:"
            f"{folder_fingerprint(self.path)}"
        )

    def caption(self, frames: list[np.ndarray]) -> str:
        """One caption for one clip's frames ((H, W, 3) uint8 RGB, in time order)."""
        return self.caption_batch([frames])[0]

    def caption_batch(self, clips: list[list[np.ndarray]]) -> list[str]:
        """One caption per clip; all their frames go through one ``generate`` call."""
        chosen: list[list[np.ndarray]] = []
        for number, frames in enumerate(clips):
            frames = [_check_frame(frame, number, i) for i, frame in enumerate(frames)]
            if not frames:
                raise ValueError(f"clip {number} has no frames")
            chosen.append([frames[len(frames) // 2]] if self.combine == "middle" else frames)
        flat = [frame for frames in chosen for frame in frames]
        if not flat:
            return []
        with self._lock:
            texts = self._generate(flat)
        out, at = [], 0
        for frames in chosen:
            out.append(consensus_caption(texts[at : at + len(frames)]))
            at += len(frames)
        return out

    def _generate(self, images: list[np.ndarray]) -> list[str]:
        settings: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "num_beams": 1}
        if self.processor is not None:
            if self.prompt is None:
                inputs = self.processor(images=images, return_tensors="pt")
            else:
                inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        else:
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            inputs = {"pixel_values": pixels.to(self.device)}
            if self.prompt is not None:
                inputs["decoder_input_ids"] = self._prompt_ids(len(images))
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, **settings)
        decoder = self.processor if self.processor is not None else self.tokenizer
        return [self._clean(text) for text in decoder.batch_decode(ids, skip_special_tokens=True)]

    def _prompt_ids(self, count: int) -> torch.Tensor:
        """The prompt as a decoder prefix (VisionEncoderDecoder): decoder start token + prompt tokens."""
        config = self.model.config
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(getattr(config, "decoder", None), "bos_token_id", None)
        tokens = self.tokenizer(self.prompt, add_special_tokens=False)["input_ids"]
        prefix = ([] if start is None else [int(start)]) + list(tokens)
        return torch.tensor([prefix] * count, dtype=torch.long, device=self.device)

    def _clean(self, text: str) -> str:
        text = " ".join(text.split())
        if self.prompt is not None and text.lower().startswith(self.prompt.lower()):
            text = text[len(self.prompt) :].strip()
        return text


def _check_frame(frame: Any, clip: int, index: int) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"clip {clip} frame {index} must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
    return frame


def _load_model(folder: Path) -> torch.nn.Module:
    """The model class transformers maps this folder's config to, newest auto class first."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type == "vision-encoder-decoder":
        return transformers.VisionEncoderDecoderModel.from_pretrained(str(folder), local_files_only=True)
    tried: list[str] = []
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            return auto.from_pretrained(str(folder), local_files_only=True)
        except ValueError as error:  # "Unrecognized configuration class ... for this kind of AutoModel"
            tried.append(f"{name}: {str(error).splitlines()[0][:200]}")
    raise ValueError(
        f"captioner 'hf_image_to_text': {str(folder)!r} holds a {config.model_type!r} model, which transformers "
        f"{transformers.__version__} does not load as an image-to-text model ({'; '.join(tried) or 'no auto class'})"
    )


def _load_processing(folder: Path) -> tuple[Any, Any, Any]:
    """(processor, None, None) for a folder with a full processor (BLIP, GIT), else
    (None, image processor, tokenizer) loaded separately (a VisionEncoderDecoder)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError):
        processor = None
    if processor is not None and getattr(processor, "image_processor", None) is not None and getattr(
        processor, "tokenizer", None
    ) is not None:
        return processor, None, None
    try:
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"captioner 'hf_image_to_text' path {str(folder)!r} lacks its image processor or tokenizer "
            f"(preprocessor_config.json, tokenizer files): {str(error).splitlines()[0][:300]}"
        ) from None
    return None, image_processor, tokenizer
