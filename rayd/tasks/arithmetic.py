"""Multi-digit addition with a digit-by-digit carry rationale.

A prompt is "47+38=" and the gold completion walks the columns right to left, writing each
column's digits, the incoming carry and the column sum, then the answer:
    "7+8+0=15;4+3+1=8;A=85"
A few-hundred-thousand-parameter model learns this in minutes on a CPU; without the rationale
(answer only) it must do the carries in its head, which small models find much harder.
"""

from __future__ import annotations

import random

from rayd.tasks.base import Example, Task


class AdditionTask(Task):
    def __init__(self, digits: int = 2, seed: int = 0, eval_fraction: float = 0.1) -> None:
        if digits < 1:
            raise ValueError("task_options.digits must be >= 1")
        self.digits = digits
        self.seed = seed
        self.eval_fraction = eval_fraction

    def _split_of(self, a: int, b: int) -> str:
        # A pair's split depends only on the pair, so train and eval stay disjoint at any size.
        h = random.Random(f"{self.seed}:{a}:{b}").random()
        return "eval" if h < self.eval_fraction else "train"

    def examples(self, split: str, count: int) -> list[Example]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        rng = random.Random(f"{self.seed}:{split}")
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        space = (hi - lo + 1) ** 2
        out: list[Example] = []
        seen: set[tuple[int, int]] = set()
        # Sample without replacement while the pool is large; allow repeats once exhausted.
        while len(out) < count:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if self._split_of(a, b) != split:
                continue
            if (a, b) in seen and len(seen) < space * 0.5:
                continue
            seen.add((a, b))
            out.append(self.make(a, b))
        return out

    @staticmethod
    def make(a: int, b: int) -> Example:
        da, db = str(a)[::-1], str(b)[::-1]
        carry, steps = 0, []
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            total = x + y + carry
            steps.append(f"{x}+{y}+{carry}={total};")
            carry = total // 10
        return Example(prompt=f"{a}+{b}=", rationale="".join(steps), answer=str(a + b))
