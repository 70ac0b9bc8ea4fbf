"""A teacher signal stored by `rayd score`, read back for a logit_kd run.

`rayd score` writes a copy of a dataset with the teacher's top-k as ragged columns (SIGNAL_COLUMNS)
and `teacher_signal.json` (SIGNAL_FILE) beside them. A logit_kd run whose `data.train_dataset` is
such a folder reads the columns and starts no teacher actor (`stored_signal_folder`):
`load_stored_signal` first refuses a signal with another k than `teacher.top_k`, another
tokenizer, or another teacher than `models.teacher.path` (by the hash of its weights), naming
the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from rayd.config import ConfigError
from rayd.data.prompts import PromptSet
from rayd.teacher.scorer import Pair, TeacherSignalError, check_scores
from rayd.types import TeacherScore

SIGNAL_FILE = "teacher_signal.json"
SIGNAL_COLUMNS = (
    "prompt_ids",
    "completion_ids",
    "teacher_token_logprobs",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
)
READ_BLOCK = 512  # rows read and checked at a time when a run loads the signal


def tokenizer_sha256(tokenizer: Any) -> str:
    """One hash over the vocabulary and the eos id (which training appends to completions)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.eos_token_id]).encode()).hexdigest()


def weights_sha256(model_dir: str) -> str:
    """One hash over the model's weight files (names and bytes), to tie a dataset to a teacher."""
    digest = hashlib.sha256()
    files = sorted(
        f for f in Path(model_dir).iterdir() if f.suffix in (".safetensors", ".bin", ".pt")
    )
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class StoredSignal:
    """The stored teacher signal of the training prompts, read from disk per step."""

    def __init__(self, folder: Path, ds: Any, rows: list[int], pairs: list[Pair], k: int) -> None:
        self.folder, self.ds, self.k = folder, ds, k
        self.rows = rows  # training prompt index -> dataset row
        self.pairs = pairs  # training prompt index -> the tokens that row scored

    def scores(self, prompt_indices: list[int]) -> list[TeacherScore]:
        """The teacher's signal for these training prompts, checked like a live teacher's."""
        got = self.ds[[self.rows[i] for i in prompt_indices]]
        scores = []
        for tok, ids, lps in zip(
            got["teacher_token_logprobs"],
            got["teacher_topk_ids"],
            got["teacher_topk_logprobs"],
            strict=True,
        ):
            scores.append(
                TeacherScore(
                    token_logprobs=torch.tensor(tok, dtype=torch.float32),
                    topk_ids=torch.tensor(ids, dtype=torch.long).reshape(len(tok), -1),
                    topk_logprobs=torch.tensor(lps, dtype=torch.float32).reshape(len(tok), -1),
                )
            )
        try:
            check_scores([self.pairs[i] for i in prompt_indices], scores, self.k)
        except TeacherSignalError as exc:
            raise TeacherSignalError(
                f"{self.folder}: the stored signal is damaged: {exc}"
            ) from None
        return scores


def stored_signal_folder(algorithm: str, train_dataset: str | None) -> Path | None:
    """The `rayd score` folder a run reads its teacher signal from: a logit_kd run's
    `data.train_dataset` when it holds SIGNAL_FILE; None means the teacher scores online."""
    if algorithm != "logit_kd" or train_dataset is None:
        return None
    folder = Path(train_dataset)
    return folder if (folder / SIGNAL_FILE).is_file() else None


def load_stored_signal(
    folder: Path,
    prompts: PromptSet,
    *,
    top_k: int,
    tokenizer: Any,
    teacher_path: str,
    teacher_setting: str,
) -> StoredSignal:
    """The signal `rayd score` stored in `folder` for the training prompts, checked against
    this run's k (`top_k`: teacher.top_k), tokenizer and teacher (the resolved `teacher_path`,
    named in errors as `teacher_setting`: models.teacher.path's value) and every row's tokens."""
    marker = folder / SIGNAL_FILE
    from datasets import load_from_disk

    try:
        info = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"data error: {marker}: not valid JSON; run rayd score again") from None
    for key in ("top_k", "tokenizer_sha256", "teacher_weights_sha256"):
        if not isinstance(info, dict) or key not in info:
            raise ConfigError(f"data error: {marker}: no {key!r} field; run rayd score again")
    k = info["top_k"]
    if k != top_k:
        raise ConfigError(
            f"data error: {marker}: top_k: the stored teacher signal has k={k} but "
            f"teacher.top_k={top_k}; set teacher.top_k={k} or score again (rayd score)"
        )
    if info["tokenizer_sha256"] != tokenizer_sha256(tokenizer):
        raise ConfigError(
            f"data error: {marker}: tokenizer_sha256: the signal was scored with another "
            "tokenizer than models.student.path's; score again with this run's models"
        )
    sha = weights_sha256(teacher_path)
    if info["teacher_weights_sha256"] != sha:
        scored_by = info.get("teacher", {}).get("path", "?")
        raise ConfigError(
            f"data error: {marker}: teacher_weights_sha256: the signal was scored by teacher "
            f"{scored_by!r} (weights {info['teacher_weights_sha256'][:12]}), but "
            f"models.teacher.path={teacher_setting!r} has weights {sha[:12]}; score "
            "again with this teacher"
        )
    ds = load_from_disk(str(folder))
    missing = [c for c in SIGNAL_COLUMNS if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"data error: {folder}: {SIGNAL_FILE} is there but columns {missing} are not"
        )
    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    for row, (p, c) in enumerate(zip(ds["prompt_ids"], ds["completion_ids"], strict=True)):
        if c:
            index.setdefault((tuple(p), tuple(c)), row)
    rows, pairs = [], []
    for prompt in prompts.train:
        assert prompt.completion_ids is not None  # check_offline_data ran first
        row = index.get((tuple(prompt.ids), tuple(prompt.completion_ids)))
        if row is None:
            raise ConfigError(
                f"data error: {folder}: training row {prompt.index} has no stored teacher "
                "signal for its tokens (the data settings changed since rayd score: "
                "data.long_prompts, rollout.max_model_len, the fields?); score again"
            )
        rows.append(row)
        pairs.append((prompt.ids, prompt.completion_ids))
    stored = StoredSignal(folder, ds.select_columns(list(SIGNAL_COLUMNS[2:])), rows, pairs, k)
    # Every row training will read is checked now, so a damaged file fails before any actor
    # starts rather than at some step.
    everything = list(range(len(rows)))
    for lo in range(0, len(everything), READ_BLOCK):
        try:
            stored.scores(everything[lo : lo + READ_BLOCK])
        except (TeacherSignalError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"data error: {exc}") from None
    print(
        f"rayd: logit_kd reads the teacher signal stored in {folder} (k={k}, teacher "
        f"{info.get('teacher', {}).get('path', '?')}); no teacher actor starts",
        file=sys.stderr,
    )
    return stored
