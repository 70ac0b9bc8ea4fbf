"""A task made from a user's JSONL file: question, rationale and answer columns (GSM8K-style).

    {"question": "...", "answer": "step 1 ... #### 72"}                  (GSM8K's own layout)
    {"question": "...", "rationale": "step 1 ...", "answer": "72"}       (columns apart)
Answers compare as numbers when both sides are numbers ("1,000" == "1000.0"), else as text.
Train and eval are split by a hash of the question, so the split does not depend on file order.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from rayd.data.files import read_text_lines
from rayd.tasks.base import Example, Task

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


class JsonlTask(Task):
    def __init__(
        self,
        path: str,
        question_field: str = "question",
        rationale_field: str = "rationale",
        answer_field: str = "answer",
        marker: str = "####",
        eval_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        file = Path(path)
        if not file.exists():
            raise ValueError(f"task_options.path: {path!r} does not exist")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError("task_options.eval_fraction must lie in (0, 1)")
        self.marker = f"{marker} "
        self.splits: dict[str, list[Example]] = {"train": [], "eval": []}
        # One line for a folder, a file too large, not UTF-8, control characters, long lines
        lines = read_text_lines(file, "task_options.path")  # DataFileError is a ValueError
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{line_no}: not valid JSON") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            for name in (question_field, answer_field):
                if not isinstance(row.get(name), str | int | float):
                    raise ValueError(f"{path}:{line_no}: missing field {name!r}")
            question, answer = str(row[question_field]), str(row[answer_field])
            rationale = str(row.get(rationale_field) or "")
            if marker in answer:  # GSM8K: the rationale and "#### 72" share the answer field
                rationale, _, answer = answer.rpartition(marker)
            rationale = rationale.strip()
            example = Example(
                prompt=question.strip() + "\n",
                rationale=rationale + "\n" if rationale else "",
                answer=answer.strip(),
                marker=self.marker,
            )
            draw = random.Random(f"{seed}:{question}").random()
            self.splits["eval" if draw < eval_fraction else "train"].append(example)
        if not self.splits["train"] or not self.splits["eval"]:
            raise ValueError(f"{path}: too few rows to make both a train and an eval split")

    def examples(self, split: str, count: int) -> list[Example]:
        if split not in self.splits:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self.splits[split][:count]

    def extract_answer(self, completion: str) -> str | None:
        """The first number after the last marker; without a marker, the last number."""
        head, sep, tail = completion.rpartition(self.marker.strip())
        found = _NUMBER.findall(tail if sep else head + tail)
        if not found:
            return None
        return found[0] if sep else found[-1]

    def is_correct(self, completion: str, answer: str) -> bool:
        got = self.extract_answer(completion)
        if got is None:
            return False
        a, b = _as_number(got), _as_number(answer)
        return a == b if a is not None and b is not None else got.strip() == answer.strip()
