"""`rayd generate CONFIG [key=value ...]`: teacher-written rationales, verified and filtered.

Teacher engines (vLLM actors, several in parallel) write `n` rationale+answer samples per prompt.
Prompts are cut into shards; each finished shard is written atomically to `shards/`, so an
interrupted run redoes only unfinished shards and never duplicates a sample. `job.json` records
the job (teacher, sampling, filters, prompts, seed, shard_size): a rerun that changes any of
them is refused, since its shards would not line up with the ones there (another shard_size
would write some prompts twice). SIGTERM stops the job with exit code 143 and one line, the
finished shards kept and no temporary file left. When every shard is
there, each sample gets one verdict, in this order:
    empty         nothing but whitespace
    over_long     hit max_new_tokens before the end-of-sequence
    malformed     no final answer the task can extract
    wrong_answer  the task's verifier disagrees with the reference answer
    contaminated  shares an n-gram with an eval-split question (filters.ngram)
    duplicate     the same text as an earlier kept sample of the same prompt, up to case,
                  whitespace and punctuation
    kept
Kept samples become a `datasets` dataset (`dataset/`: prompt, completion, rationale, answer,
prompt_index, sample_id) that the offline modes read through `data.train_dataset`; the others
go to `rejected.jsonl` with their verdict. `provenance.json` records the teacher (path and a
hash of its weights), sampling, seed, rayd version and time; `summary.json` the counts.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

import rayd
from rayd.cli import config_parser
from rayd.config import ConfigError, EngineSection, ModelSpec, _Strict, load_tree, validate
from rayd.data.files import DataFileError, read_text_lines
from rayd.data.prompts import encode_prompt
from rayd.sampling import Sampling
from rayd.staging import (
    EXIT_TERMINATED,
    Terminated,
    output_parent_problem,
    rearm_terminate,
    sigterm_held,
    terminate_as_exception,
    write_atomic,
)
from rayd.tasks import make_task
from rayd.tasks.base import Task

VERDICTS = (
    "empty",
    "over_long",
    "malformed",
    "wrong_answer",
    "contaminated",
    "duplicate",
    "kept",
)


class SamplingConfig(_Strict):
    n: int = Field(2, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, ge=0, description="0 = greedy (then n must be 1)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)

    @property
    def params(self) -> Sampling:
        return Sampling(self.n, self.temperature, self.top_p, self.max_new_tokens)


class EnginesConfig(EngineSection):
    backend: Literal["vllm", "hf"] = "vllm"


class PromptsConfig(_Strict):
    # "task:<name>" (its train split is written, its eval split is the contamination reference)
    # or a JSONL file of prompts with reference answers.
    source: str = "task:addition"
    task_options: dict[str, Any] = Field(default_factory=dict)
    count: int = Field(2000, ge=1, description="prompts to write samples for")
    eval_size: int = Field(
        200, ge=0, description="eval-split questions the contamination check compares against"
    )
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    eval_file: str | None = Field(
        None, description="JSONL source only: the eval questions to check contamination against"
    )
    chat_template: Literal["auto", "never"] = Field(
        "auto", description="auto: prompts in the teacher tokenizer's chat template if it has one"
    )


class FiltersConfig(_Strict):
    verify: bool = Field(True, description="drop samples whose answer the task's verifier rejects")
    ngram: int = Field(8, ge=0, description="contamination n-gram length in words; 0 = off")
    dedupe: bool = True


class GenerateConfig(_Strict):
    name: str = "traces"
    output_dir: str = Field("runs/{name}", description="{name} is replaced by `name`")
    teacher: ModelSpec
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    shard_size: int = Field(256, ge=1, description="prompts per resumable shard")
    seed: int = 0
    call_timeout_s: float = Field(1800.0, gt=0)

    @property
    def out(self) -> Path:
        return Path(self.output_dir.format(name=self.name))


def load_generate_config(path: str | None, overrides: list[str] | None = None) -> GenerateConfig:
    cfg = validate(GenerateConfig, load_tree(path, overrides))
    if cfg.sampling.temperature == 0 and cfg.sampling.n > 1:
        raise ConfigError("config error: sampling.n > 1 needs sampling.temperature > 0")
    problem = cfg.engines.parallel_problem("engines", cfg.engines.backend)
    if problem:
        raise ConfigError(f"config error: {problem}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Filters: pure functions, tested without engines.

_WORDS = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: '47+38=' -> ['47', '+', '38', '=']."""
    return _WORDS.findall(text.lower())


class ContaminationIndex:
    """Which texts contain an n-gram of an eval question.

    A question shorter than n words contributes itself whole, so short questions (arithmetic
    prompts are four words) are still caught when a sample repeats them.
    """

    def __init__(self, eval_questions: Iterable[str], n: int) -> None:
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.lengths: set[int] = set()
        for question in eval_questions:
            ws = words(question)
            size = min(n, len(ws))
            if size == 0:
                continue
            self.lengths.add(size)
            self.grams.update(tuple(ws[i : i + size]) for i in range(len(ws) - size + 1))

    def leaks(self, text: str) -> bool:
        if not self.n or not self.grams:
            return False
        ws = words(text)
        return any(
            tuple(ws[i : i + size]) in self.grams
            for size in self.lengths
            for i in range(len(ws) - size + 1)
        )


def normalized(text: str) -> str:
    """The text a duplicate check compares: case, whitespace and punctuation do not count."""
    return " ".join(w for w in words(text) if w.isalnum())


def judge(
    samples: list[dict[str, Any]], task: Task, index: ContaminationIndex, filters: FiltersConfig
) -> list[str]:
    """One verdict per sample (see the module doc), in the samples' order."""
    kept_texts: dict[int, set[str]] = {}
    verdicts = []
    for s in samples:
        text = s["completion"]
        if not text.strip():
            verdict = "empty"
        elif s["finish_reason"] == "length":
            verdict = "over_long"
        elif task.extract_answer(text) is None:
            verdict = "malformed"
        elif filters.verify and s["answer"] is not None and not task.is_correct(text, s["answer"]):
            verdict = "wrong_answer"
        elif index.leaks(s["prompt"] + " " + text):
            verdict = "contaminated"
        elif filters.dedupe and normalized(text) in kept_texts.get(s["prompt_index"], set()):
            verdict = "duplicate"
        else:
            verdict = "kept"
            kept_texts.setdefault(s["prompt_index"], set()).add(normalized(text))
        verdicts.append(verdict)
    return verdicts


# ---------------------------------------------------------------------------------------------
# Inputs and provenance


def load_questions(cfg: GenerateConfig) -> tuple[Task, list[tuple[str, str | None]], list[str]]:
    """(task, train (prompt, answer) pairs, eval questions for the contamination check)."""
    p = cfg.prompts
    if p.source.startswith("task:"):
        try:
            task = make_task(p.source.removeprefix("task:"), seed=cfg.seed, **p.task_options)
        except (KeyError, TypeError, ValueError) as exc:
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ConfigError(
                f"config error: prompts.source / prompts.task_options: {reason}"
            ) from None
        train = [(e.prompt, e.answer) for e in task.examples("train", p.count)]
        evals = [e.prompt for e in task.examples("eval", p.eval_size)] if p.eval_size else []
        return task, train, evals
    task = Task.default()
    train = _jsonl_questions(Path(p.source), p.prompt_field, p.answer_field, "prompts.source")
    evals = []
    if p.eval_file:
        evals = [
            q
            for q, _ in _jsonl_questions(
                Path(p.eval_file), p.prompt_field, p.answer_field, "prompts.eval_file"
            )
        ]
    return task, train[: p.count], evals


def _jsonl_questions(path: Path, field: str, answer_field: str, key: str):
    if not path.exists():
        raise ConfigError(f"config error: {key}: {str(path)!r} does not exist")
    try:
        lines = read_text_lines(path, key)
    except DataFileError as exc:
        raise ConfigError(f"data error: {exc}") from None
    out = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"data error: {path}:{line_no}: not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ConfigError(f"data error: {path}:{line_no}: no string field {field!r}")
        answer = row.get(answer_field)
        out.append((row[field], None if answer is None else str(answer)))
    if not out:
        raise ConfigError(f"data error: {path}: no rows")
    return out


# ---------------------------------------------------------------------------------------------
# The job


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Write (or finish) the dataset of teacher samples; returns the summary."""
    from rayd.teacher.stored import weights_sha256
    from rayd.zoo import resolve_model_path

    out = cfg.out
    problem = output_parent_problem(out)  # a file there, or under a file, or not writable
    if problem:
        raise ConfigError(f"config error: output_dir: {problem}")
    task, questions, eval_questions = load_questions(cfg)  # the prompts before the teacher
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    try:
        teacher_path = resolve_model_path(cfg.teacher.path, seed=cfg.teacher.build_seed(cfg.seed))
    except ValueError as exc:
        raise ConfigError(f"config error: teacher.path: {exc}") from None
    if not (Path(teacher_path) / "config.json").is_file():
        raise ConfigError(f"config error: teacher.path: {teacher_path!r} has no config.json")
    provenance = {
        "teacher": {"path": cfg.teacher.path, "resolved": teacher_path},
        "teacher_weights_sha256": weights_sha256(teacher_path),
        "sampling": cfg.sampling.model_dump(),
        "filters": cfg.filters.model_dump(),
        "prompts": cfg.prompts.model_dump(),
        "seed": cfg.seed,
        "rayd_version": rayd.__version__,
    }
    _check_same_job(out, provenance, cfg.shard_size, len(questions))

    shards = [
        list(range(lo, min(lo + cfg.shard_size, len(questions))))
        for lo in range(0, len(questions), cfg.shard_size)
    ]
    todo = [i for i in range(len(shards)) if not _shard_path(shards_dir, i).is_file()]
    if len(todo) < len(shards):
        print(
            f"rayd generate: {len(shards) - len(todo)} of {len(shards)} shards already done "
            f"in {shards_dir}; writing the other {len(todo)}",
            file=sys.stderr,
        )
    if todo:
        _write_shards(cfg, teacher_path, questions, shards, todo, shards_dir)

    samples = [
        json.loads(line)
        for i in range(len(shards))
        for line in _shard_path(shards_dir, i).read_text().splitlines()
    ]
    index = ContaminationIndex(eval_questions, cfg.filters.ngram)
    verdicts = judge(samples, task, index, cfg.filters)
    kept = [s for s, v in zip(samples, verdicts, strict=True) if v == "kept"]
    rejected = [{**s, "verdict": v} for s, v in zip(samples, verdicts, strict=True) if v != "kept"]
    _save_dataset(out / "dataset", kept, task)
    write_atomic(out / "rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected))
    counts = Counter(verdicts)
    summary = {
        "prompts": len(questions),
        "samples": len(samples),
        "kept": counts.get("kept", 0),
        "dropped": {v: counts.get(v, 0) for v in VERDICTS if v != "kept"},
        "prompts_with_a_kept_sample": len({s["prompt_index"] for s in kept}),
        "dataset": str(out / "dataset"),
    }
    provenance["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_atomic(out / "provenance.json", json.dumps(provenance, indent=2))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _shard_path(shards_dir: Path, i: int) -> Path:
    return shards_dir / f"shard-{i:05d}.jsonl"


def _check_same_job(out: Path, provenance: dict[str, Any], shard_size: int, prompts: int) -> None:
    """Shards from another teacher or other sampling must not be mixed into this dataset, nor
    shards cut at another size (shard i would hold other prompts: some would be written twice
    and others never)."""
    job = out / "job.json"
    now = {k: v for k, v in provenance.items() if k != "teacher"}
    if job.is_file():
        before = json.loads(job.read_text())
        old_size = before.pop("shard_size", None)
        if before != now:
            changed = sorted(k for k in now if before.get(k) != now.get(k))
            raise ConfigError(
                f"config error: {out} holds shards of a different generate job "
                f"({', '.join(changed)} changed); use another name or delete the folder"
            )
        recorded = old_size is not None
        if not recorded:  # a job.json written before shard_size was recorded
            old_size = _shard_size_of(out / "shards", prompts)
        # Sizes at or above the prompt count cut the same one shard.
        if old_size is not None and min(old_size, prompts) != min(shard_size, prompts):
            raise ConfigError(
                f"config error: shard_size: {out} holds shards of {old_size} prompts and this "
                f"run asks for shard_size={shard_size}; resuming would write some prompts twice: "
                f"set shard_size={old_size} to finish it, or use another name"
            )
        if not recorded:
            write_atomic(job, json.dumps({**now, "shard_size": shard_size}, indent=2))
    else:
        write_atomic(job, json.dumps({**now, "shard_size": shard_size}, indent=2))


def _shard_size_of(shards_dir: Path, prompts: int) -> int | None:
    """The shard size the shards in `shards_dir` were cut at, from the first one (None: no
    shard yet). A first shard that holds every prompt stands for any size at or above it."""
    first = _shard_path(shards_dir, 0)
    if not first.is_file():
        return None
    held = {json.loads(line)["prompt_index"] for line in first.read_text().splitlines() if line}
    return len(held) if len(held) < prompts else prompts


def _write_shards(cfg, teacher_path, questions, shards, todo, shards_dir) -> None:
    from transformers import AutoTokenizer

    from rayd import cluster
    from rayd.progress import Progress, stage
    from rayd.rollout.group import engine_runtime_env, spawn_engines
    from rayd.rollout.spec import EngineSpec
    from rayd.rollout.worker import RolloutWorker

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    e, s = cfg.engines, cfg.sampling
    spec = EngineSpec.from_section(
        teacher_path, e, dtype=cfg.teacher.dtype, seed=cfg.seed, max_logprobs=20
    )
    cluster.connect()
    rearm_terminate()  # ray.init replaced the SIGTERM handler
    options = {
        "num_cpus": e.cpus_per_worker,
        "num_gpus": e.gpus_per_worker,
        "runtime_env": engine_runtime_env(),
        "max_restarts": 2,
        "max_task_retries": 0,
    }
    actors, groups = spawn_engines(
        RolloutWorker,
        [spec.for_worker(i) for i in range(e.num_workers)],
        options,
        cfg.call_timeout_s,
    )
    pool = cluster.WorkerPool(
        actors,
        "teacher",
        cfg.call_timeout_s,
        max_reissues=2,
        placement_groups=groups,
    )
    bar = None
    try:
        with stage(f"starting {e.num_workers} teacher engine(s)"):
            pool.call_all("ready")
        limit = e.max_model_len - s.max_new_tokens
        before = sum(len(shard) for i, shard in enumerate(shards) if i not in todo)
        bar = Progress("generating", len(questions), initial=before, unit="prompt")
        for i in todo:
            indices = shards[i]
            ids = [
                encode_prompt(tokenizer, questions[j][0], cfg.prompts.chat_template == "auto")
                for j in indices
            ]
            too_long = [j for j, x in zip(indices, ids, strict=True) if len(x) > limit]
            if too_long:
                raise ConfigError(
                    f"data error: prompt {too_long[0]} has more than {limit} tokens "
                    "(engines.max_model_len - sampling.max_new_tokens)"
                )
            outs = pool.map_chunks(
                "generate",
                ids,
                indices,
                sampling=s.params,
                seed=cfg.seed * 100_003 + i,  # per shard: a redone shard draws the same samples
            )
            rows = []
            for k, sample in enumerate(outs):
                prompt, answer = questions[sample.prompt_index]
                rows.append(
                    {
                        "sample_id": f"{sample.prompt_index}-{k % s.n}",
                        "prompt_index": sample.prompt_index,
                        "prompt": prompt,
                        "answer": answer,
                        "completion": sample.text,
                        "finish_reason": sample.finish_reason,
                        "tokens": len(sample.completion_ids),
                    }
                )
            write_atomic(_shard_path(shards_dir, i), "".join(json.dumps(r) + "\n" for r in rows))
            bar.update(len(indices))  # a shard written is kept if the job stops
    finally:
        if bar is not None:
            bar.close()
        pool.shutdown()


def _save_dataset(path: Path, kept: list[dict[str, Any]], task: Task) -> None:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # a bar per save would land between the summary lines
    rows = {
        "sample_id": [s["sample_id"] for s in kept],
        "prompt_index": [s["prompt_index"] for s in kept],
        "prompt": [s["prompt"] for s in kept],
        "completion": [s["completion"] for s in kept],
        "rationale": [task.rationale_of(s["completion"]) for s in kept],
        "answer": [task.extract_answer(s["completion"]) for s in kept],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        Dataset.from_dict(rows).save_to_disk(str(tmp))
        with sigterm_held():  # the old dataset gone and the new one in place, or neither
            shutil.rmtree(path, ignore_errors=True)  # the dataset is rebuilt whole from the shards
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = config_parser("rayd generate", __doc__.split("\n")[0]).parse_args(argv)
    with terminate_as_exception():
        try:
            cfg = load_generate_config(args.config, args.overrides)
            summary = generate(cfg)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        except Terminated:
            print(
                "rayd generate: stopped by SIGTERM; the finished shards are kept: run the same "
                "command again to finish",
                file=sys.stderr,
            )
            return EXIT_TERMINATED
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
