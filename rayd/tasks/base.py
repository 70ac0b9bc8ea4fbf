"""The task interface every reasoning task (built-in or user data) follows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str
    rationale: str  # gold step-by-step reasoning, may be empty
    answer: str

    @property
    def completion(self) -> str:
        """What a model trained on gold rationales writes after the prompt."""
        return self.rationale + "A=" + self.answer if self.rationale else "A=" + self.answer


class Task(ABC):
    @abstractmethod
    def examples(self, split: str, count: int) -> list[Example]:
        """`count` examples of `split` ("train" | "eval"); deterministic, splits disjoint."""

    def extract_answer(self, completion: str) -> str | None:
        """The final answer written after the last "A=", or None when there is none."""
        _, sep, tail = completion.rpartition("A=")
        if not sep:
            return None
        answer = tail.strip().split()[0] if tail.strip() else ""
        return answer or None

    def is_correct(self, completion: str, answer: str) -> bool:
        return self.extract_answer(completion) == answer
