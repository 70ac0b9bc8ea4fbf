"""`rayd score CONFIG [key=value ...] [--out DIR]`: the teacher's sparse top-k, computed once.

logit_kd compares the student with the teacher's top-k log-probs at every completion token of a
dataset. Those never change during training, so rather than keeping teacher actors beside the
learners for a whole run (the teacher's memory, a teacher forward pass per step, every epoch),
this command has the teacher actors of a logit_kd run config score every row of its
`data.train_dataset` once and writes a copy of the dataset with the signal as ragged columns:
    prompt_ids, completion_ids  [P], [T]  the tokens scored, encoded exactly as training does
    teacher_token_logprobs      [T]       log p_teacher(completion token | prefix)
    teacher_topk_ids            [T][k]    the teacher's top-k at each completion position
    teacher_topk_logprobs       [T][k]    their log-probs, descending, temperature 1
(rows that training would drop, or without a completion, get empty lists) and
`teacher_signal.json` in the same folder: teacher path and weight hash, tokenizer hash, k,
backend (for a served teacher, what each server said it serves: model name and max_model_len),
rayd version, date. The copy is written to a temporary folder and renamed into
place, so an interrupted job leaves no half-written dataset.

Resuming: rows are scored in blocks of BLOCK, and each finished block is saved atomically to
`.<out>.parts/` beside the output, with the job's description (`job.json`: everything in
`teacher_signal.json` but the date). A rerun of the same job scores only the blocks not there;
parts of a different job (another teacher, k, dataset or encoding) are discarded, with a line
saying so. The parts are deleted once the dataset is written. SIGTERM stops the job with exit
code 143 and one line: the finished blocks are kept for the rerun, no half-written copy is left,
and a scored dataset already at the output is as it was.

A logit_kd run whose `data.train_dataset` is such a folder reads the columns and starts no
teacher actor (rayd/teacher/stored.py reads them, and first checks the signal's k, tokenizer
and teacher against the run's).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rayd
from rayd.cli import config_parser, output_folder
from rayd.config import ConfigError, RunConfig, load_config
from rayd.data.prompts import encode_row, read_dataset_dir
from rayd.staging import (
    EXIT_TERMINATED,
    Terminated,
    output_parent_problem,
    rearm_terminate,
    staged_folder,
    terminate_as_exception,
    write_atomic,
)

# torch, the teacher's scorer and the stored-signal format load with the job, not with --help.
if TYPE_CHECKING:
    from rayd.teacher.scorer import Pair
    from rayd.types import TeacherScore

BLOCK = 512  # rows per round of teacher calls: bounds the scores held in flight


# ---------------------------------------------------------------------------------------------
# Writing: `rayd score`


def score_dataset(cfg: RunConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Score every row of `cfg.data.train_dataset` with the teacher actors; returns a summary."""
    from rayd.preflight import check_model_paths, check_models
    from rayd.staging import refuse_to_replace
    from rayd.teacher.stored import SIGNAL_FILE, tokenizer_sha256, weights_sha256

    if cfg.algorithm.name != "logit_kd":
        raise ConfigError(
            "config error: algorithm.name: rayd score stores the teacher signal that logit_kd "
            f"reads; the config has algorithm.name={cfg.algorithm.name}"
        )
    if cfg.data.train_dataset is None:
        raise ConfigError(
            "config error: data.train_dataset: rayd score scores the completions of a datasets "
            "folder (e.g. rayd generate's dataset/); set it"
        )
    if cfg.models.teachers is not None:
        raise ConfigError(
            "config error: models.teachers: rayd score stores one teacher's top-k; a run with "
            "several teachers scores online (give models.teacher to store one)"
        )
    source = Path(cfg.data.train_dataset)
    target = Path(out) if out is not None else source.with_name(source.name + "-scored")
    if target.resolve() == source.resolve():
        raise ConfigError(f"config error: --out {target}: must differ from data.train_dataset")
    # Refused: a file, a folder holding the data, and any folder but an earlier scored dataset.
    refused = refuse_to_replace(
        target, SIGNAL_FILE, "a dataset scored by rayd score", {"data.train_dataset": source}
    )
    if refused:
        raise ConfigError(f"config error: --out {refused}")
    problem = output_parent_problem(target)
    if problem:
        raise ConfigError(f"config error: --out {problem}")
    check_model_paths(cfg)
    rows = read_dataset_dir(source, cfg.data)  # the data before the models: it is cheap
    _, (teacher_path,), tokenizer, _ = check_models(cfg)  # logit_kd needs its one teacher
    assert cfg.models.teacher is not None
    max_prompt_len = cfg.rollout.max_model_len - cfg.rollout.max_new_tokens
    encoded = [
        encode_row(tokenizer, prompt, completion, max_prompt_len, cfg.data, "train")
        for prompt, completion, *_ in rows
    ]
    pairs: dict[int, Pair] = {
        i: (e[0], e[1]) for i, e in enumerate(encoded) if e is not None and e[1] is not None
    }
    if not pairs:
        raise ConfigError(f"data error: {source}: no row has a completion to score")
    limit = cfg.teacher.max_model_len - 1  # the teacher needs one slot after the sequence
    for i, (prompt, completion) in pairs.items():
        if len(prompt) + len(completion) > limit:
            raise ConfigError(
                f"data error: {source}: row {i} has {len(prompt) + len(completion)} tokens; at "
                f"most {limit} fit in teacher.max_model_len={cfg.teacher.max_model_len}"
            )
    info = {
        "format": 1,
        "source_dataset": str(source),
        "rows": len(rows),
        "scored_rows": len(pairs),
        "top_k": cfg.teacher.top_k,
        "teacher": {
            "path": cfg.models.teacher.path,
            "resolved": teacher_path,
            "backend": cfg.teacher.backend,
            "dtype": cfg.models.teacher.dtype,
            **_served_provenance(cfg),
        },
        "teacher_weights_sha256": weights_sha256(teacher_path),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "encoding": {
            "prompt_field": cfg.data.prompt_field,
            "completion_field": cfg.data.completion_field,
            "max_prompt_len": max_prompt_len,
            "long_prompts": cfg.data.long_prompts,
        },
        "rayd_version": rayd.__version__,
    }
    # The parts' job also pins the tokens scored: a dataset rewritten under the same path and
    # row count must not reuse blocks of its old completions.
    tokens = hashlib.sha256(json.dumps(sorted(pairs.items())).encode()).hexdigest()
    parts = _Parts(target.with_name(f".{target.name}.parts"), {**info, "pairs_sha256": tokens})
    scores = _score_pairs(cfg, teacher_path, pairs, parts)
    info["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    _write(source, target, len(rows), pairs, scores, info)
    parts.remove()
    return {
        "dataset": str(target),
        "rows": len(rows),
        "scored_rows": len(pairs),
        "top_k": info["top_k"],
    }


def _served_provenance(cfg: RunConfig) -> dict[str, Any]:
    """teacher.backend=server: what each server said it serves (/v1/models: its model name and
    max_model_len), as {"served": [...]}. The local models.teacher.path of a served teacher may
    hold only its tokenizer and config, so its weight hash says nothing of the weights that
    scored; the served name does. {} for a teacher in rayd's own actors."""
    t = cfg.teacher
    if t.backend != "server":
        return {}
    from rayd.teacher.server_scorer import describe_servers

    served = describe_servers(
        t.urls or [],
        timeout_s=t.request_timeout_s,
        api_key_env=t.api_key_env,
        ca_bundle=t.ca_bundle,
    )
    return {"served": served, "served_model": t.served_model}


class _Parts:
    """The finished blocks of an interrupted `rayd score` job, one file per block."""

    def __init__(self, folder: Path, info: dict[str, Any]) -> None:
        self.folder = folder
        job, text = folder / "job.json", json.dumps(info, indent=2)
        same = job.is_file() and json.loads(job.read_text()) == json.loads(text)
        if folder.exists() and not same:
            stale = len(list(folder.glob("block-*.pt")))
            if stale:
                print(
                    f"rayd score: discarding {stale} scored blocks in {folder}: they belong to "
                    "another job (teacher, top_k, dataset or encoding changed)",
                    file=sys.stderr,
                )
            shutil.rmtree(folder)
        if not same:
            folder.mkdir(parents=True)
            write_atomic(job, text)

    def path(self, block: int) -> Path:
        return self.folder / f"block-{block:05d}.pt"

    def load(self, block: int) -> dict[int, TeacherScore] | None:
        import torch

        from rayd.types import TeacherScore

        path = self.path(block)
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as exc:  # unreadable: score the block again rather than stop
            print(
                f"rayd score: {path} unreadable ({exc.__class__.__name__}); rescoring it",
                file=sys.stderr,
            )
            return None
        return {
            int(row): TeacherScore(token_logprobs=token, topk_ids=ids, topk_logprobs=logprobs)
            for row, token, ids, logprobs in zip(
                saved["rows"], saved["token"], saved["ids"], saved["logprobs"], strict=True
            )
        }

    def save(self, block: int, scores: dict[int, TeacherScore]) -> None:
        import torch

        saved = {
            "rows": list(scores),
            "token": [s.token_logprobs for s in scores.values()],
            "ids": [s.topk_ids for s in scores.values()],
            "logprobs": [s.topk_logprobs for s in scores.values()],
        }
        write_atomic(self.path(block), lambda fh: torch.save(saved, fh))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _score_pairs(
    cfg: RunConfig, teacher_path: str, pairs: dict[int, Pair], parts: _Parts
) -> dict[int, TeacherScore]:
    import ray

    from rayd import cluster
    from rayd.progress import Progress, stage
    from rayd.rollout.group import start_pool
    from rayd.rollout.spec import EngineSpec
    from rayd.teacher.worker import TeacherWorker

    order = list(pairs)
    blocks = [order[lo : lo + BLOCK] for lo in range(0, len(order), BLOCK)]
    out: dict[int, TeacherScore] = {}
    todo = []
    for b, block in enumerate(blocks):
        done = parts.load(b)
        if done is not None and sorted(done) == sorted(block):
            out.update(done)
        else:
            todo.append(b)
    if len(todo) < len(blocks):
        print(
            f"rayd score: {len(blocks) - len(todo)} of {len(blocks)} blocks already scored in "
            f"{parts.folder}; scoring the other {len(todo)}",
            file=sys.stderr,
        )
    if not todo:
        return out
    cluster.connect()
    rearm_terminate()  # ray.init replaced the SIGTERM handler
    t, have = cfg.teacher, ray.cluster_resources()
    for res, want in (("CPU", t.cpus_per_worker), ("GPU", t.gpus_per_worker)):
        if t.num_workers * want > have.get(res, 0.0) + 1e-9:
            raise ConfigError(
                f"config error: teacher.num_workers * teacher.{res.lower()}s_per_worker = "
                f"{t.num_workers * want:g} {res}s but the Ray cluster has {have.get(res, 0.0):g}"
            )
    spec = EngineSpec.teacher(cfg, teacher_path)
    pool = start_pool(TeacherWorker, [spec] * t.num_workers, t, cfg.trainer, "teacher")
    bar = None
    try:
        with stage(f"starting {t.num_workers} teacher engine(s)"):
            pool.call_all("ready")
        bar = Progress("scoring", len(order), initial=len(out), unit="row")
        for b in todo:
            block = blocks[b]
            got = pool.map_chunks("score", [pairs[i] for i in block], top_k=cfg.teacher.top_k)
            scored = dict(zip(block, got, strict=True))
            parts.save(b, scored)
            out.update(scored)
            bar.update(len(block))
        return out
    finally:
        if bar is not None:
            bar.close()
        pool.shutdown()


def _write(
    source: Path,
    target: Path,
    num_rows: int,
    pairs: dict[int, Pair],
    scores: dict[int, TeacherScore],
    info: dict[str, Any],
) -> None:
    from datasets import List, Value, disable_progress_bars, load_from_disk

    from rayd.teacher.stored import SIGNAL_COLUMNS, SIGNAL_FILE

    disable_progress_bars()
    ids, floats = List(Value("int64")), List(Value("float32"))
    features = {
        "prompt_ids": ids,
        "completion_ids": ids,
        "teacher_token_logprobs": floats,
        "teacher_topk_ids": List(ids),
        "teacher_topk_logprobs": List(floats),
    }
    columns: dict[str, list[Any]] = {name: [] for name in SIGNAL_COLUMNS}
    for i in range(num_rows):
        score = scores.get(i)
        prompt, completion = pairs[i] if score is not None else ([], [])
        columns["prompt_ids"].append(list(prompt))
        columns["completion_ids"].append(list(completion))
        columns["teacher_token_logprobs"].append(
            score.token_logprobs.tolist() if score is not None else []
        )
        columns["teacher_topk_ids"].append(score.topk_ids.tolist() if score is not None else [])
        columns["teacher_topk_logprobs"].append(
            score.topk_logprobs.tolist() if score is not None else []
        )
    ds = load_from_disk(str(source))
    # Scoring a scored dataset again (another teacher, another k) replaces its signal.
    ds = ds.remove_columns([c for c in SIGNAL_COLUMNS if c in ds.column_names])
    for name in SIGNAL_COLUMNS:
        ds = ds.add_column(name, columns[name], feature=features[name])
    with staged_folder(target) as staging:
        ds.save_to_disk(str(staging))
        (staging / SIGNAL_FILE).write_text(json.dumps(info, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("rayd score", __doc__.split("\n")[0], "YAML config of the logit_kd run")
    parser.add_argument(
        "--out",
        default=None,
        type=output_folder,
        help="output folder (default: data.train_dataset + '-scored')",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from rayd import cluster
    from rayd.teacher.scorer import TeacherSignalError

    with terminate_as_exception():
        try:
            summary = score_dataset(cfg, args.out)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        except (cluster.WorkerLost, cluster.RemoteCallTimeout, TeacherSignalError) as exc:
            print(f"rayd score: stopped: {exc}", file=sys.stderr)
            return 1
        except Terminated:
            print(
                "rayd score: stopped by SIGTERM; the scored blocks are kept: run the same "
                "command again to finish",
                file=sys.stderr,
            )
            return EXIT_TERMINATED
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
