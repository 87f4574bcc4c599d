"""Moving encoders in and out of vlmask: Hugging Face ``VideoMAEModel``, original VideoMAE
checkpoints and a timm-style state dict (the run's git commit: ``vlmask.provenance``).

Export (``vlmask export RUN_DIR --to hf-videomae --out DIR``)
    :func:`export_hf_videomae` writes a run's student encoder as a Hugging Face ``VideoMAEModel``
    folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) plus
    ``encoder.safetensors`` (:func:`export_timm_state_dict`) and ``vlmask_export.json``
    (provenance), then loads it back with ``transformers`` and checks the features.
    :func:`encoder_to_hf_videomae` is the conversion itself.

Import
    :func:`import_hf_videomae` builds a :class:`~vlmask_plugins.encoders.vit.VideoViT` from a
    Hugging Face VideoMAE folder; :func:`load_videomae_state_dict` loads an original VideoMAE
    ``.pth`` (or a Hugging Face / timm-style state dict) into an existing encoder, strictly by
    default, and returns a :class:`LoadReport`.

Two facts make the conversion exact:

* **Key bias.** vlmask (timm) has one fused ``qkv`` Linear with a bias on q, k and v. VideoMAE
  (original and Hugging Face) has q and v biases and *no* key bias. Dropping the key bias
  ``b_k`` changes no output: the score of query ``i`` and key ``j`` gains ``q_i . b_k``, the
  same for every key ``j`` of that query, and softmax over ``j`` is invariant to a constant
  shift. So the export drops ``b_k`` (the outputs are equal up to float rounding, checked) and
  the import sets it to zero.
* **Positions.** Both use VideoMAE's fixed 1-D sin-cos table over the (t, h, w)-ordered tokens,
  computed the same way (float64, cast to float32). Hugging Face VideoMAE has no learned
  positions, so an encoder with ``pos_embed="learned"`` is refused by the export.

The layouts differ: Hugging Face ``pixel_values`` are (B, T, C, H, W); vlmask takes
(B, C, T, H, W): ``hf_model(video.transpose(1, 2))`` equals ``encoder(video)``.
"""

# The export and the import live in hf_export.py and hf_import.py; this module re-exports their
# public names so that ``from vlmask_plugins.interop.hf_videomae import ...`` keeps working.
from vlmask_plugins.interop.hf_export import (
    EXPORT_TOLERANCE,
    EncoderShape,
    Preprocessing,
    compare_with_hf,
    dataset_preprocessing,
    encoder_shape,
    encoder_to_hf_videomae,
    export_hf_videomae,
    export_timm_state_dict,
    hf_image_processor,
    hf_videomae_config,
    hf_videomae_model,
    save_hf_videomae,
    timm_metadata,
)
from vlmask_plugins.interop.hf_import import (
    WRAPPER_KEYS,
    InteropError,
    LoadReport,
    StateDictMismatchError,
    import_hf_videomae,
    infer_source_grid,
    interpolate_positions,
    load_videomae_state_dict,
    read_config_json,
    read_state_dict,
)

__all__ = [
    "EXPORT_TOLERANCE",
    "EncoderShape",
    "InteropError",
    "LoadReport",
    "Preprocessing",
    "StateDictMismatchError",
    "WRAPPER_KEYS",
    "compare_with_hf",
    "dataset_preprocessing",
    "encoder_shape",
    "encoder_to_hf_videomae",
    "export_hf_videomae",
    "export_timm_state_dict",
    "hf_image_processor",
    "hf_videomae_config",
    "hf_videomae_model",
    "import_hf_videomae",
    "infer_source_grid",
    "interpolate_positions",
    "load_videomae_state_dict",
    "read_config_json",
    "read_state_dict",
    "save_hf_videomae",
    "timm_metadata",
]
