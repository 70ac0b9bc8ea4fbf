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

- `slip` (the portable world of issue 37, docs/experiments/world.md): each column step, with
  this probability, writes one of its digits wrong (an operand, the carry or a digit of the total,
  one kind drawn uniformly), then the repair marker and the right digit, and goes on from there
  ("7+9!8+0=15;", "7+8+1!0=15;", "7+8+0=16!5;"). The wrong digit is listed in the example's
  `unlearned` spans: a model trained with those spans masked (rayd.pretrain does) learns to flag
  and rewrite every kind of slip a student makes, and never learns to make one, so its greedy and
  its sampled traces stay clean.

The extra choices are drawn from a random stream of their own, seeded by the pair, so every
variant has the same prompts and splits as the plain task and a pair always gets one rationale.
"""

from __future__ import annotations

import random
import re

from rayd.tasks.base import Example, Task

# "validation" and "test" split the held-out pairs in two (for a sweep's learning-rate choice and
# its reported figures); "eval" is both of them.
SPLITS = ("train", "eval", "validation", "test")
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
        slip: float = 0.0,
    ) -> None:
        if digits < 1:
            raise ValueError("task_options.digits must be >= 1")
        for name, value in (("swap", swap), ("repair", repair), ("slip", slip)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"task_options.{name} must lie in [0, 1], got {value}")
        if repair >= 0.5:
            # At >= 0.5 a wrong total would be as likely as the right one: a greedy teacher
            # would write errors and the "greedy traces have no repairs" property would fail.
            raise ValueError(f"task_options.repair must be below 0.5, got {repair}")
        if repair and slip:
            # Two encodings of a repaired total ("16!15" and "16!5") would make one text mean two
            # things; each world uses one of them.
            raise ValueError("task_options.repair and task_options.slip cannot both be set")
        self.digits = digits
        self.seed = seed
        self.eval_fraction = eval_fraction
        self.swap = swap
        self.repair = repair
        self.slip = slip

    def _split_of(self, a: int, b: int) -> str:
        # A pair's split depends only on the pair, so train and eval stay disjoint at any size.
        h = random.Random(f"{self.seed}:{a}:{b}").random()
        return "eval" if h < self.eval_fraction else "train"

    def _in_split(self, a: int, b: int, split: str) -> bool:
        held_out = self._split_of(a, b) == "eval"
        if split in ("train", "eval"):
            return held_out == (split == "eval")
        # validation and test halve the held-out pairs by a draw of their own, so "eval" and
        # everything measured on it stay as they were.
        half = random.Random(f"{self.seed}:{a}:{b}:test").random() < 0.5
        return held_out and half == (split == "test")

    def examples(self, split: str, count: int) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        rng = random.Random(f"{self.seed}:{split}")
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        space = (hi - lo + 1) ** 2
        out: list[Example] = []
        seen: set[tuple[int, int]] = set()
        # Sample without replacement while the pool is large; allow repeats once exhausted.
        while len(out) < count:
            a, b = self._pair(rng.randint(lo, hi), rng.randint(lo, hi))
            if not self._in_split(a, b, split):
                continue
            if (a, b) in seen and len(seen) < space * 0.5:
                continue
            seen.add((a, b))
            out.append(self.example(a, b))
        return out

    def _pair(self, a: int, b: int) -> tuple[int, int]:
        """The operands of a prompt drawn as (a, b)."""
        return a, b

    def example(self, a: int, b: int) -> Example:
        """The gold example of `a + b` under this task's options (`make` for the defaults)."""
        if not self.swap and not self.repair and not self.slip:
            return self.make(a, b)
        # Not the split stream: drawing from it would change which pairs the variant samples.
        rng = random.Random(f"{self.seed}:{a}:{b}:rationale")
        return self.make(a, b, swap=self.swap, repair=self.repair, slip=self.slip, rng=rng)

    @staticmethod
    def make(
        a: int,
        b: int,
        *,
        swap: float = 0.0,
        repair: float = 0.0,
        slip: float = 0.0,
        rng: random.Random | None = None,
    ) -> Example:
        rng = rng or random.Random(f"{a}:{b}")
        da, db = str(a)[::-1], str(b)[::-1]
        carry, steps = 0, []
        unlearned: list[tuple[int, int]] = []
        written = 0  # characters of the rationale so far
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
            step = f"{x}+{y}+{carry}={stated};"
            if slip and rng.random() < slip:
                step, at = _slip(step, rng)
                unlearned.append((written + at, written + at + 1))
            steps.append(step)
            written += len(step)
            carry = total // 10
        return Example(
            prompt=f"{a}+{b}=",
            rationale="".join(steps),
            answer=str(a + b),
            unlearned=tuple(unlearned),
        )

    @staticmethod
    def check_rationale(a: int, b: int, rationale: str) -> bool:
        """Whether `rationale` is a valid rationale for `a + b` under any options: one step per
        column, right to left, each with the column's two digits in either order, the right
        incoming carry and the right final total (a wrong total is allowed only when followed
        by the repair marker and the right one, and a wrong digit only when followed by the
        marker and the right digit: `repair`'s and `slip`'s repairs)."""
        return _valid(a, b, rationale) or _valid(a, b, _SLIP.sub(r"\2", rationale))


# A slip: a digit, the repair marker and a different digit that replaces it.
_SLIP = re.compile(r"(\d)" + re.escape(REPAIR_MARKER) + r"(?!\1)(\d)")
SLIP_KINDS = ("operand", "carry", "total")


def _slip(step: str, rng: random.Random) -> tuple[str, int]:
    """`step` ("x+y+c=t;") with one digit written wrong, the marker and the right digit; and
    the wrong digit's index in the result. The kind (an operand, the carry, a digit of the
    total) is drawn uniformly, then the place within it, then the wrong digit."""
    kind = rng.choice(SLIP_KINDS)
    total_at = step.index("=") + 1
    if kind == "operand":
        at = rng.choice((0, 2))
    elif kind == "carry":
        at = 4
    else:
        at = rng.randrange(total_at, len(step) - 1)
    right = step[at]
    wrong = rng.choice([d for d in "0123456789" if d != right])
    return step[:at] + wrong + REPAIR_MARKER + step[at:], at


def _valid(a: int, b: int, rationale: str) -> bool:
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


class SubtractionTask(AdditionTask):
    """Subtraction `a-b=` with a >= b, both of `digits` digits, by a borrow rationale: the new
    task of the world's forgetting experiment (docs/experiments/world.md), written in addition's
    shape so that the world's tokenizer and format carry over. Each column step right to left
    states its two digits, the incoming borrow and the column's value: the new borrow times 10
    plus the digit written ("7-3-0=4;", "2-8-0=14;": 12-8 is 4, borrowing 1), then the answer,
    zero-padded to `digits` ("A=045"). It has the plain task only (no swap, repair or slip);
    pairs and splits are drawn as addition's are."""

    def __init__(self, digits: int = 3, seed: int = 0, eval_fraction: float = 0.1) -> None:
        super().__init__(digits=digits, seed=seed, eval_fraction=eval_fraction)

    def _pair(self, a: int, b: int) -> tuple[int, int]:
        return (a, b) if a >= b else (b, a)

    def example(self, a: int, b: int) -> Example:
        return self.make_subtraction(a, b, self.digits)

    @staticmethod
    def make_subtraction(a: int, b: int, digits: int) -> Example:
        if a < b:
            raise ValueError(f"subtraction needs a >= b, got {a}-{b}")
        da, db = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
        borrow, steps = 0, []
        for x, y in zip(da, db, strict=True):
            value = int(x) - int(y) - borrow
            out = 1 if value < 0 else 0  # the borrow from the next column
            digit = value + 10 * out
            steps.append(f"{x}-{y}-{borrow}={10 * out + digit};")
            borrow = out
        return Example(
            prompt=f"{a}-{b}=", rationale="".join(steps), answer=str(a - b).zfill(digits)
        )

    @staticmethod
    def check_rationale(a: int, b: int, rationale: str) -> bool:
        digits = max(len(str(a)), len(str(b)))
        return rationale == SubtractionTask.make_subtraction(a, b, digits).rationale
