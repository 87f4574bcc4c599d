"""Logger ``wandb``: the metrics of every logged step to a Weights & Biases run (``pip install vlmask[wandb]``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import vlmask
from vlmask_plugins.loggers.csv_file import check_run_file
from vlmask_plugins.loggers.tensorboard_events import MissingDependencyError

#: The values of ``mode`` (wandb's own: ``offline`` writes only under the run directory; ``disabled`` does nothing).
MODES: tuple[str, ...] = ("online", "offline", "disabled")


def wandb_module() -> Any:
    """``wandb``, or :class:`MissingDependencyError` naming the extra that installs it."""
    try:
        import wandb
    except ImportError as exc:
        raise MissingDependencyError(
            f"logger 'wandb' needs the `wandb` package, which is not importable here ({exc}); "
            "install it with `pip install vlmask[wandb]`, or use logger 'csv' or 'tensorboard'",
            name="wandb",
        ) from exc
    return wandb


class WandbLogger:
    """Sends every logged metric (``loss``, each loss term, ``lr``, ``clips_per_s``, target and
    head statistics) to a W&B run at its step, the resolved recipe as the run's config and the
    summary as the run's summary. Experiment tracking that survives the machine, for runs spread
    over a cluster; W&B's own client does the work (Biewald, 2020).

    ``project``, ``entity``, ``name``, ``group``, ``tags`` and ``mode`` go to ``wandb.init``
    (``mode`` None: wandb's default, i.e. ``WANDB_MODE`` or online). Files go under
    ``RUN_DIR/<subdir>`` (``offline`` runs stay there: ``wandb sync`` uploads them later). The W&B
    run's id is kept in ``RUN_DIR/<subdir>/run_id``, so a resumed vlmask run continues the same
    W&B run (``resume="allow"``) instead of starting a second one. Only rank 0 logs.
    """

    def __init__(self, project: str = "vlmask", entity: str | None = None, name: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, mode: str | None = None,
                 subdir: str = "wandb", log_config: bool = True) -> None:
        check_run_file("subdir", subdir)
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (or unset), got {mode!r}")
        self.wandb = wandb_module()
        self.project, self.entity, self.name, self.group = project, entity, name, group
        self.tags = list(tags) if tags else None
        self.mode, self.subdir, self.log_config = mode, subdir, log_config
        self.run: Any = None
        self.last_step = 0

    @vlmask.hookimpl
    def vlmask_train_start(self, run: Any) -> None:
        if run.is_main:
            self._open(run)

    @vlmask.hookimpl
    def vlmask_step_end(self, step: int, metrics: dict[str, Any], run: Any) -> None:
        if not run.is_main:
            return
        if self.run is None:
            self._open(run)
        values = {k: v for k, v in metrics.items() if k != "step" and _loggable(v)}
        self.run.log(values, step=int(step))
        self.last_step = int(step)

    @vlmask.hookimpl
    def vlmask_train_end(self, summary: dict[str, Any], run: Any) -> None:
        if not run.is_main or self.run is None:
            return
        for key, value in summary.items():
            if _loggable(value) or isinstance(value, str):
                self.run.summary[key] = value
        self.run.finish()
        self.run = None

    def _open(self, run: Any) -> None:
        folder = Path(run.dir) / self.subdir
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() and int(getattr(run, "start_step", 0)) > 0 else None
        config = None
        if self.log_config and getattr(run, "recipe", None) is not None:
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(run.recipe.config, resolve=True)
        self.run = self.wandb.init(
            project=self.project, entity=self.entity, name=self.name or Path(run.dir).name, group=self.group,
            tags=self.tags, mode=self.mode, dir=str(folder), config=config, id=run_id, resume="allow" if run_id else None,
        )
        id_file.write_text(self.run.id + "\n")


def _loggable(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
