"""The driver's state that a checkpoint restores (`DriverState`): with the learners' own
checkpoint, a resumed run goes on exactly as the unbroken one would."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from rayd.config import ConfigError, LearnerConfig
from rayd.data.prompts import PromptSampler
from rayd.pipeline import Pending, Prepared


@dataclass
class DriverState:
    """All of the driver that a checkpoint restores: with the learners' own checkpoint, a
    resumed run goes on exactly as the unbroken one would."""

    sampler: PromptSampler  # the training-prompt cursor
    rng: random.Random  # GKD's on/off-policy draws
    step: int = 0  # the last step trained
    version: int = 0  # the learners' weights: one version per step
    nonfinite_in_row: int = 0
    first_eval: dict[str, float] | None = None
    last_eval: dict[str, float] | None = None
    # The next step, made ahead (pipelined). The sampler and RNG have already drawn it, so a
    # checkpoint holds its samples: they came from weights the checkpoint does not hold.
    ahead: Pending | Prepared | None = None

    def to_json(self, learner: LearnerConfig) -> dict[str, Any]:
        """The checkpoint's driver state; `ahead` must be scored (`Prepared`) or None. The
        step number is added by the checkpoint store."""
        assert not isinstance(self.ahead, Pending), "score the step made ahead before saving"
        return {
            "version": self.version,
            "sampler": self.sampler.state(),
            "rng": self.rng.getstate(),
            "prefetched": self.ahead.to_state() if self.ahead is not None else None,
            "nonfinite_in_row": self.nonfinite_in_row,
            "first_eval": self.first_eval,
            "last_eval": self.last_eval,
            # DeepSpeed cannot re-shard ZeRO state on load, nor load a LoRA student's state
            # into another set of adapters: `check_resumable` compares these.
            "num_learners": learner.num_learners,
            "zero_stage": learner.zero_stage,
            "lora": lora_settings(learner),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """The state `to_json` saved; `ahead` comes back unscored (its signal is recomputed)."""
        self.sampler.restore(saved["sampler"])
        version, internal, gauss = saved["rng"]  # JSON turned its tuples into lists
        self.rng.setstate((version, tuple(internal), gauss))
        self.step = saved["step"]
        self.version = saved["version"]
        self.nonfinite_in_row = saved["nonfinite_in_row"]
        self.first_eval, self.last_eval = saved["first_eval"], saved["last_eval"]
        prefetched = saved.get("prefetched")
        self.ahead = Prepared.from_state(prefetched) if prefetched else None

    @staticmethod
    def check_resumable(learner: LearnerConfig, saved: dict[str, Any]) -> None:
        """DeepSpeed cannot re-shard ZeRO state to another learner count or stage on load, and
        a LoRA student's checkpoint holds its adapters (none for full weights)."""
        for key, now in (
            ("num_learners", learner.num_learners),
            ("zero_stage", learner.zero_stage),
            ("lora", lora_settings(learner)),
        ):
            if saved and saved.get(key) != now:
                raise ConfigError(
                    f"config error: learner.{key}={now} but the checkpoint to resume was saved "
                    f"with {saved.get(key)}; keep {saved.get(key)} or start a new run under a "
                    "new name"
                )


def lora_settings(learner: LearnerConfig) -> dict[str, Any] | None:
    """learner.lora as a checkpoint keeps it (checkpoints without the key are full-weight)."""
    return learner.lora.model_dump() if learner.lora is not None else None
