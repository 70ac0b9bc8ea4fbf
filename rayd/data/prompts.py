"""Prompt sources for a run: a built-in task or a JSONL file, tokenised once, plus the sampler.

The sampler walks seeded per-epoch permutations of the training prompts, so every prompt is seen
once per epoch and the position (epoch, offset) is all a resume needs.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from rayd.config import ConfigError, DataConfig
from rayd.data.files import DataFileError, read_text_lines
from rayd.tasks import make_task
from rayd.tasks.base import Task


@dataclass(frozen=True)
class Prompt:
    index: int
    ids: list[int]
    completion_ids: list[int] | None  # a reference completion (for off-policy mixing), eos included
    answer: str | None  # for tasks with a verifier
    rationale: str | None = None  # the reasoning part of the completion (step_by_step)
    # The teacher this row names in teacher.route_field (several teachers, combine=route);
    # None: routed by hash
    route: str | None = None
    # The teacher's prompt when it is shown privileged context (teacher.privileged_context:
    # the row's completion, rationale or answer through teacher.prompt_template); None: the
    # teacher scores after `ids`, as the student sampled.
    teacher_ids: list[int] | None = None
    text: str = ""  # the prompt as the data has it, before any chat template


@dataclass(frozen=True)
class TeacherPrompts:
    """How a row's teacher prompt is written (teacher.privileged_context, prompt_template):
    `context` is the row's field shown (completion, rationale or answer), `max_len` the tokens
    a teacher prompt may have (the teacher's window less the completion's room)."""

    context: str
    template: str
    max_len: int

    def text(self, prompt: str, row: Row, task: Task | None) -> str:
        _, completion, answer, rationale, _ = row
        shown = {
            "completion": completion,
            "rationale": rationale,
            "answer": None if answer is None else (task or Task.default()).answer_text(answer),
        }[self.context]
        if shown is None:
            raise ConfigError(
                f"data error: teacher.privileged_context={self.context}: a row has no "
                f"{self.context} to show the teacher (prompt {prompt[:60]!r})"
            )
        return self.template.format(prompt=prompt, privileged_context=shown)


@dataclass
class PromptSet:
    train: list[Prompt]
    eval: list[Prompt]
    task: Task | None
    dropped_long: int = 0


@dataclass
class RowSet:
    """The rows of a run's data, read and checked but not yet tokenised (no tokenizer needed):
    what a run reads before it resolves or builds any model."""

    train: list[Row]
    eval: list[Row]
    task: Task | None

    def unencoded(self) -> PromptSet:
        """The rows as prompts without token ids (`ids` empty, `completion_ids` empty or None):
        for the checks that look only at completions, answers, rationales and routes."""
        return PromptSet(
            *(
                [
                    Prompt(i, [], None if c is None else [], answer, rationale, route)
                    for i, (_, c, answer, rationale, route) in enumerate(rows)
                ]
                for rows in (self.train, self.eval)
            ),
            self.task,
        )


def load_prompts(
    cfg: DataConfig,
    tokenizer,
    max_prompt_len: int,
    seed: int,
    route_field: str | None = None,
    rows: RowSet | None = None,
    teacher_prompts: TeacherPrompts | None = None,
) -> PromptSet:
    """Train and eval prompts (with reference completions) from the configured sources:
    `read_rows` (or the `rows` it returned before), each row tokenised; with `teacher_prompts`
    each also gets the teacher's prompt with its privileged context (`Prompt.teacher_ids`)."""
    rows = rows if rows is not None else read_rows(cfg, seed, route_field)
    dropped = 0
    out: dict[str, list[Prompt]] = {}
    for split, split_rows in (("train", rows.train), ("eval", rows.eval)):
        prompts = []
        for row in split_rows:
            prompt, completion, answer, rationale, route = row
            encoded = encode_row(tokenizer, prompt, completion, max_prompt_len, cfg, split)
            if encoded is None:
                dropped += 1
                continue
            ids, completion_ids = encoded
            teacher_ids = None
            if teacher_prompts is not None:
                teacher_ids = encode_teacher_prompt(
                    tokenizer, teacher_prompts, teacher_prompts.text(prompt, row, rows.task), cfg
                )
            prompts.append(
                Prompt(
                    len(prompts), ids, completion_ids, answer, rationale, route, teacher_ids, prompt
                )
            )
        out[split] = prompts
    if not out["train"]:
        raise ConfigError(f"data error: {cfg.source}: no training prompts left")
    return PromptSet(out["train"], out["eval"], rows.task, dropped)


def read_rows(cfg: DataConfig, seed: int, route_field: str | None = None) -> RowSet:
    """Train and eval rows from the configured sources, every file read and every row checked,
    without a tokenizer.

    Rows are (prompt, completion, answer, rationale, route). `data.train_dataset` replaces the
    training rows (e.g. teacher-written rationales from `rayd generate`); eval rows always come
    from `data.source`, so runs trained on different data are scored on the same held-out
    prompts. `route_field` (teacher.route_field): the column naming each row's teacher; task
    rows have none. `seed` is the run's (trainer.seed): `data.split_seed` overrides it.
    """
    seed = cfg.split_seed_for(seed)
    if cfg.source.startswith("task:"):
        name = cfg.source.removeprefix("task:")
        try:
            task = make_task(name, seed=seed, **cfg.task_options)
        except (KeyError, TypeError, ValueError) as exc:
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ConfigError(f"config error: data.source / data.task_options: {reason}") from None

        def rows_of(split: str, count: int) -> list[Row]:
            out = []
            for e in task.examples(split, count):
                completion = e.completion if cfg.rationales else task.answer_text(e.answer)
                out.append((e.prompt, completion, e.answer, e.rationale, None))
            return out

        try:
            eval_rows = rows_of(cfg.eval_split, cfg.eval_size)
        except ValueError as exc:
            raise ConfigError(f"config error: data.eval_split: {exc}") from None
        train_rows = rows_of("train", cfg.train_size)
    else:
        if cfg.eval_split != "eval":
            raise ConfigError(
                f"config error: data.eval_split: {cfg.eval_split!r} needs a task source "
                f"(task:<name>); {cfg.source} has one held-out split, 'eval'"
            )
        task = None
        rows = (
            _read_hub(cfg, route_field)
            if cfg.source.startswith("hub:")
            else _read_jsonl(
                Path(cfg.source),
                cfg.prompt_field,
                cfg.completion_field,
                cfg.bad_lines == "skip",
                route_field,
            )
        )
        if len(rows) < cfg.eval_size + 1:
            raise ConfigError(
                f"data error: {cfg.source}: {len(rows)} rows, need more than data.eval_size="
                f"{cfg.eval_size} so training has prompts"
            )
        random.Random(seed).shuffle(rows)
        eval_rows, train_rows = rows[: cfg.eval_size], rows[cfg.eval_size :][: cfg.train_size]
    if cfg.train_dataset is not None:
        train_rows = read_dataset_dir(Path(cfg.train_dataset), cfg, route_field)[: cfg.train_size]
    if cfg.train_fraction < 1.0:
        train_rows = train_rows[: max(1, math.ceil(cfg.train_fraction * len(train_rows)))]
    return RowSet(train_rows, eval_rows, task)


# prompt, completion, answer, rationale, route (the teacher's name from teacher.route_field)
Row = tuple[str, str | None, str | None, str | None, str | None]


def encode_prompt(tokenizer, text: str, chat_template: bool = True) -> list[int]:
    """A prompt's token ids, as a user turn in the tokenizer's chat template when it has one.

    Training, evaluation and `rayd generate` all encode prompts here, so an instruct model sees
    the format it was tuned on everywhere, and a tokenizer without a template (the tiny character
    models) gets the plain text. The completion that follows ends with `eos_token_id`, which for
    chat models is the end-of-turn token.
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    # The template already holds the model's special tokens: adding a BOS again would double it.
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_teacher_prompt(tokenizer, how: TeacherPrompts, text: str, cfg: DataConfig) -> list[int]:
    """A teacher prompt's ids, encoded as the student's prompts are; refused when it does not
    fit the teacher's window or holds characters the tokenizer does not know (the template's
    own text on a small vocabulary)."""
    ids = encode_prompt(tokenizer, text, cfg.chat_template == "auto")
    if len(ids) > how.max_len:
        raise ConfigError(
            f"data error: a teacher prompt (teacher.prompt_template with its "
            f"{how.context}) has {len(ids)} tokens, more than {how.max_len} "
            "(teacher.max_model_len - rollout.max_new_tokens); raise teacher.max_model_len or "
            "shorten the template"
        )
    unknown = tokenizer.unk_token_id
    if unknown is not None and unknown in ids:
        raise ConfigError(
            f"data error: teacher.prompt_template: the teacher prompt {text[:80]!r} has "
            "characters the tokenizer does not know"
        )
    return ids


def encode_row(
    tokenizer, prompt: str, completion: str | None, max_prompt_len: int, cfg: DataConfig, split: str
) -> tuple[list[int], list[int] | None] | None:
    """(prompt ids, completion ids + eos) as training sees them; None when data.long_prompts
    drops the row. `rayd score` encodes through here too, so stored teacher signal lines up
    with the training tokens."""
    ids = encode_prompt(tokenizer, prompt, cfg.chat_template == "auto")
    if len(ids) > max_prompt_len:
        if cfg.long_prompts == "error":
            raise ConfigError(
                f"data error: a {split} prompt has {len(ids)} tokens, more than "
                f"{max_prompt_len} (rollout.max_model_len - rollout.max_new_tokens); set "
                "data.long_prompts=drop or truncate"
            )
        if cfg.long_prompts == "drop":
            return None
        ids = ids[-max_prompt_len:]  # keep the end, where the question usually is
    completion_ids = None
    if completion is not None:
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
        completion_ids.append(tokenizer.eos_token_id)
    return ids, completion_ids


def read_dataset_dir(path: Path, cfg: DataConfig, route_field: str | None = None) -> list[Row]:
    """Rows of a `datasets` folder saved with save_to_disk (what `rayd generate` writes)."""
    if not path.is_dir():
        why = "does not exist" if not path.exists() else "is a file"
        raise ConfigError(
            f"data error: data.train_dataset {str(path)!r} {why}; expected a datasets folder "
            "(save_to_disk, e.g. rayd generate's dataset/)"
        )
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ... here
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ConfigError(
            f"data error: data.train_dataset {str(path)!r}: not a datasets folder ({first})"
        ) from None
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):
        raise ConfigError(
            f"data error: data.train_dataset {str(path)!r} holds several splits; give the folder "
            "of one split"
        )
    missing = {cfg.prompt_field, cfg.completion_field} - set(ds.column_names)
    if missing:
        raise ConfigError(
            f"data error: data.train_dataset {str(path)!r} lacks columns {sorted(missing)} "
            f"(has {ds.column_names}; see data.prompt_field / data.completion_field)"
        )
    if len(ds) == 0:
        raise ConfigError(f"data error: data.train_dataset {str(path)!r} has no rows")
    columns = ds.column_names
    rows: list[Row] = []
    for i, row in enumerate(ds):
        answer = row.get("answer") if "answer" in columns else None
        rationale = row.get("rationale") if "rationale" in columns else None
        route = row.get(route_field) if route_field in columns else None
        if route is not None and not isinstance(route, str):
            raise ConfigError(
                f"data error: data.train_dataset {str(path)!r} row {i}: {route_field!r} "
                f"(teacher.route_field) must name a teacher, got {type(route).__name__}"
            )
        rows.append(
            (
                row[cfg.prompt_field],
                row[cfg.completion_field],
                None if answer is None else str(answer),
                rationale,
                route,
            )
        )
    return rows


def _read_hub(cfg: DataConfig, route_field: str | None) -> list[Row]:
    """Rows of a hub dataset (`data.source: hub:NAME`, `data.hub_config`, `data.hub_split`),
    fetched into the Hugging Face cache where the hub is reachable, checked like JSONL rows."""
    import os

    from datasets import load_dataset

    name = cfg.source.removeprefix("hub:")
    try:
        ds = load_dataset(name, cfg.hub_config, split=cfg.hub_split)
    except Exception as exc:  # offline, unknown name, bad config or split: all stop here
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else "the hub"
        raise ConfigError(
            f"data error: data.source {cfg.source!r}: not in the Hugging Face cache, and {where} "
            f"did not provide it ({type(exc).__name__}: {reason[:200]})"
        ) from None
    rows: list[Row] = []
    for i, row in enumerate(ds):
        problem = _row_problem(row, cfg.prompt_field, cfg.completion_field, route_field)
        if problem is not None:
            if cfg.bad_lines == "skip":
                continue
            raise ConfigError(
                f"data error: {cfg.source} row {i}: {problem} (or set data.bad_lines=skip)"
            )
        answer, rationale = row.get("answer"), row.get("rationale")
        rows.append(
            (
                row[cfg.prompt_field],
                row.get(cfg.completion_field),
                None if answer is None else str(answer),
                rationale if isinstance(rationale, str) else None,
                row.get(route_field) if route_field else None,
            )
        )
    if not rows:
        raise ConfigError(f"data error: {cfg.source}: no rows")
    return rows


def _read_jsonl(
    path: Path,
    prompt_field: str,
    completion_field: str,
    skip_bad: bool = False,
    route_field: str | None = None,
) -> list[Row]:
    if not path.exists():
        raise ConfigError(f"data error: data.source {str(path)!r} does not exist")
    rows, skipped = [], []
    try:
        lines = read_text_lines(path, "data.source")
    except DataFileError as exc:
        raise ConfigError(f"data error: {exc}") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        problem = None
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            problem, row = "not valid JSON", None
        if problem is None:
            problem = _row_problem(row, prompt_field, completion_field, route_field)
        if problem is not None:
            if not skip_bad:
                raise ConfigError(
                    f"data error: {path}:{line_no}: {problem} (or set data.bad_lines=skip)"
                )
            skipped.append(line_no)
            continue
        completion = row.get(completion_field)
        answer = row.get("answer")
        rationale = row.get("rationale")
        rows.append(
            (
                row[prompt_field],
                completion,
                None if answer is None else str(answer),
                rationale if isinstance(rationale, str) else None,
                row.get(route_field) if route_field else None,
            )
        )
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (" ..." if len(skipped) > 5 else "")
        print(f"rayd: {path}: skipped {len(skipped)} bad lines ({shown})", file=sys.stderr)
    if not rows:
        raise ConfigError(f"data error: {path}: no rows")
    return rows


def _row_problem(
    row: object, prompt_field: str, completion_field: str, route_field: str | None = None
) -> str | None:
    if not isinstance(row, dict) or prompt_field not in row:
        return f"missing field {prompt_field!r} (data.prompt_field)"
    if not isinstance(row[prompt_field], str):
        return f"field {prompt_field!r} must be a string, got {type(row[prompt_field]).__name__}"
    if not row[prompt_field].strip():
        return f"field {prompt_field!r} is empty"
    completion = row.get(completion_field)
    if completion is not None and not isinstance(completion, str):
        return f"field {completion_field!r} must be a string, got {type(completion).__name__}"
    route = row.get(route_field) if route_field else None
    if route is not None and not isinstance(route, str):
        return (
            f"field {route_field!r} (teacher.route_field) must name a teacher, got "
            f"{type(route).__name__}"
        )
    return None


class PromptSampler:
    """Seeded epoch permutations of range(size); `state()` / `restore()` give exact resume."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.size - self.offset)
            out.extend(self._order[self.offset : self.offset + take])
            self.offset += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._permutation(self.epoch)
