"""Multi-digit addition with a digit-by-digit carry rationale.

A prompt is "47+38=" and the gold completion walks the columns right to left, writing each
column's digits, the incoming carry and the column sum, then the answer:
    "7+8+0=15;4+3+1=8;A=85"
A few-hundred-thousand-parameter model learns this in minutes on a CPU; without the rationale
(answer only) it must do the carries in its head, which small models find much harder.

Two options turn it into the regimes where on-policy distillation is expected to help (issue 22;
measured in docs/experiments/regimes.md). Both default to 0, which is the task above, byte for
byte (same prompts, splits, rationales and answers):

- `swap` (several valid rationales): each column step writes its two operands in the other
  order with this probability, drawn per column ("8+7+0=15;" for "7+8+0=15;"). At 0.5 a prompt
  with k columns of unequal digits has 2**k gold rationales, all equally likely, so a teacher
  trained on them spreads its mass evenly (1 bit per such step) and its greedy trace is just one
  of them: SFT on greedy traces sees a single path where the teacher knows many.
- `repair` (noticing and fixing an error): each column step first states a wrong total, then the
  repair marker "!" and the right total, with this probability ("7+8+0=16!15;"). The carry that
  follows comes from the right total and the answer is unchanged, so a repaired rationale is
  still valid. A teacher trained on it makes-and-repairs at about this rate when sampled at
  temperature 1 and never at temperature 0 (a wrong total is never the most likely one for
  repair < 0.5), so greedy traces hold no repair to imitate; a student that writes a wrong total
  on-policy gets the teacher's "!" and the right total as the target for its next tokens.

The extra choices are drawn from a random stream of their own, seeded by the pair, so every
variant has the same prompts and splits as the plain task and a pair always gets one rationale.
"""

from __future__ import annotations

import random
import re

from rayd.tasks.base import Example, Task

REPAIR_MARKER = "!"  # a character of the tiny models' tokenizer (rayd/models.py DEFAULT_CHARS)
# One column step: two operand digits, the incoming carry, optionally a wrong total and the
# repair marker, then the right total (checked against the column, not trusted).
_STEP = re.compile(r"(\d)\+(\d)\+(\d)=(?:(\d+)" + re.escape(REPAIR_MARKER) + r")?(\d+);")


class AdditionTask(Task):
    def __init__(
        self,
        digits: int = 2,
        seed: int = 0,
        eval_fraction: float = 0.1,
        swap: float = 0.0,
        repair: float = 0.0,
    ) -> None:
        if digits < 1:
            raise ValueError("task_options.digits must be >= 1")
        for name, value in (("swap", swap), ("repair", repair)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"task_options.{name} must lie in [0, 1], got {value}")
        if repair >= 0.5:
            # At >= 0.5 a wrong total would be as likely as the right one: a greedy teacher
            # would write errors and the "greedy traces have no repairs" property would fail.
            raise ValueError(f"task_options.repair must be below 0.5, got {repair}")
        self.digits = digits
        self.seed = seed
        self.eval_fraction = eval_fraction
        self.swap = swap
        self.repair = repair

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
            out.append(self.example(a, b))
        return out

    def example(self, a: int, b: int) -> Example:
        """The gold example of `a + b` under this task's options (`make` for the defaults)."""
        if not self.swap and not self.repair:
            return self.make(a, b)
        # Not the split stream: drawing from it would change which pairs the variant samples.
        rng = random.Random(f"{self.seed}:{a}:{b}:rationale")
        return self.make(a, b, swap=self.swap, repair=self.repair, rng=rng)

    @staticmethod
    def make(
        a: int,
        b: int,
        *,
        swap: float = 0.0,
        repair: float = 0.0,
        rng: random.Random | None = None,
    ) -> Example:
        rng = rng or random.Random(f"{a}:{b}")
        da, db = str(a)[::-1], str(b)[::-1]
        carry, steps = 0, []
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            total = x + y + carry
            # Draw only for a non-zero option, so the defaults never touch the stream.
            if swap and rng.random() < swap:
                x, y = y, x
            stated = f"{total}"
            if repair and rng.random() < repair:
                # Any other column total (0..19): the teacher learns to flag every wrong value,
                # not one kind of slip, since a student's own errors can be any of them.
                wrong = rng.choice([v for v in range(20) if v != total])
                stated = f"{wrong}{REPAIR_MARKER}{total}"
            steps.append(f"{x}+{y}+{carry}={stated};")
            carry = total // 10
        return Example(prompt=f"{a}+{b}=", rationale="".join(steps), answer=str(a + b))

    @staticmethod
    def check_rationale(a: int, b: int, rationale: str) -> bool:
        """Whether `rationale` is a valid rationale for `a + b` under any options: one step per
        column, right to left, each with the column's two digits in either order, the right
        incoming carry and the right final total (a wrong total is allowed only when followed
        by the repair marker)."""
        steps = _STEP.findall(rationale)
        if "".join(m.group(0) for m in _STEP.finditer(rationale)) != rationale:
            return False  # text outside the steps
        da, db = str(a)[::-1], str(b)[::-1]
        if len(steps) != max(len(da), len(db)):
            return False
        carry = 0
        for i, (p, q, c, wrong, total) in enumerate(steps):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            right = x + y + carry
            if sorted((int(p), int(q))) != sorted((x, y)) or int(c) != carry:
                return False
            if total != str(right) or wrong == str(right):
                return False  # a "repair" of a right total is not a repair
            carry = right // 10
        return True
