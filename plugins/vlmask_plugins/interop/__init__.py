"""Interop plugins: a run's encoder to and from other frameworks' formats.

- ``hf_videomae``: export to a Hugging Face ``VideoMAEModel`` folder (``vlmask export RUN_DIR
  --to hf-videomae``, a command the built-in plugin adds), import from one, and load original
  VideoMAE checkpoints strictly.
"""

from vlmask_plugins.interop.hf_videomae import (
    EncoderShape,
    InteropError,
    LoadReport,
    Preprocessing,
    StateDictMismatchError,
    compare_with_hf,
    dataset_preprocessing,
    encoder_shape,
    encoder_to_hf_videomae,
    export_hf_videomae,
    export_timm_state_dict,
    hf_image_processor,
    hf_videomae_config,
    hf_videomae_model,
    import_hf_videomae,
    infer_source_grid,
    interpolate_positions,
    load_videomae_state_dict,
    read_state_dict,
    save_hf_videomae,
    timm_metadata,
)

__all__ = [
    "EncoderShape",
    "InteropError",
    "LoadReport",
    "Preprocessing",
    "StateDictMismatchError",
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
    "read_state_dict",
    "save_hf_videomae",
    "timm_metadata",
]
