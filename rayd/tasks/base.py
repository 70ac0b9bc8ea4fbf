"""The task interface every reasoning task (built-in or user data) follows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

ANSWER_MARKER = "A="  # the built-in tasks' completions end "...A=<answer>"


@dataclass(frozen=True)
class Example:
    prompt: str
    rationale: str  # gold step-by-step reasoning, may be empty
    answer: str
    marker: str = ANSWER_MARKER  # the task's answer marker
    # Character spans of `completion` that carry no training loss: errors written on purpose so
    # that a model learns to repair them (addition's `slip`), never to make them.
    unlearned: tuple[tuple[int, int], ...] = ()

    @property
    def completion(self) -> str:
        """What a model trained on gold rationales writes after the prompt."""
        return self.rationale + self.marker + self.answer


class Task(ABC):
    # A completion states its final answer after the last marker; user data sets their own.
    marker: str = ANSWER_MARKER

    @abstractmethod
    def examples(self, split: str, count: int) -> list[Example]:
        """`count` examples of `split` ("train" | "eval"); deterministic, splits disjoint."""

    @staticmethod
    def default() -> Task:
        """The answer conventions alone, for data that comes without a task."""
        return _MarkerOnly()

    def answer_text(self, answer: str) -> str:
        """How a completion states its final answer (the step_by_step answer task's target)."""
        return self.marker + answer

    def rationale_of(self, completion: str) -> str:
        """The reasoning part of a completion: everything before the final answer."""
        head, sep, _ = completion.rpartition(self.marker)
        return head if sep else completion

    def extract_answer(self, completion: str) -> str | None:
        """The final answer written after the last marker, or None when there is none."""
        _, sep, tail = completion.rpartition(self.marker)
        if not sep:
            return None
        answer = tail.strip().split()[0] if tail.strip() else ""
        return answer or None

    def is_correct(self, completion: str, answer: str) -> bool:
        return self.extract_answer(completion) == answer


class _MarkerOnly(Task):
    def examples(self, split: str, count: int) -> list[Example]:
        raise ValueError("this data has no task: it cannot make examples")
