"""Experiment tracking: W&B (offline by default, so it never waits on a network) or nothing."""
from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class NullTracker:
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_image(self, key: str, path: str) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, project: str, mode: str, config: dict, run_dir: str, group: str | None = None, name: str | None = None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            mode=mode,
            config=config,
            dir=run_dir,
            group=group,
            name=name,
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
        log.info("W&B run %s (mode=%s) in %s", self.run.id, mode, self.run.dir)

    def log(self, metrics, step=None):
        self.run.log(metrics, step=step)

    def log_image(self, key, path):
        self.run.log({key: self._wandb.Image(path)})

    def summary(self, metrics):
        for k, v in metrics.items():
            self.run.summary[k] = v

    def finish(self):
        self.run.finish()


def make_tracker(logger_cfg: dict, config: dict, run_dir: str, group: str | None = None, name: str | None = None):
    kind = logger_cfg.get("kind", "none")
    if kind == "none":
        return NullTracker()
    if kind == "wandb":
        return WandbTracker(logger_cfg.get("project", "qllm-pipeline"), logger_cfg.get("mode", "offline"), config, run_dir, group, name)
    raise ValueError(f"unknown logger kind '{kind}'")
