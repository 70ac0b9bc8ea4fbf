"""Everything that can be wrong with a run, checked before any actor starts; `preflight`
returns the one record (`Preflight`) the run is built from.

The order matters for the user's time: the data files are read and checked before any model is
resolved (`check_models` builds a tiny:<preset> that is not cached yet, which can take minutes),
and everything here runs before Ray starts, except `check_cluster`, which needs the cluster.
This is the one place outside rayd/config.py that reads the whole `RunConfig`: the rooms the
run is built from get their own section or spec.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from rayd.config import ConfigError, RunConfig
from rayd.data.prompts import PromptSet, TeacherPrompts, load_prompts, read_rows
from rayd.teacher.signal import TeacherSource, teacher_source
from rayd.teacher.stored import StoredSignal, load_stored_signal, stored_signal_folder
from rayd.zoo import names as tiny_names
from rayd.zoo import resolve_model_path


@dataclass(frozen=True)
class Preflight:
    """A run's checked inputs: what its actors are started from and its loop reads."""

    student_path: str  # the resolved student checkpoint folder
    # The resolved teachers whose models will be loaded (config order): by their actors, or
    # the first by the learners (teacher.support=full); [] without a teacher model to load.
    teacher_paths: list[str]
    tokenizer: Any  # the student's (the teachers', checked equal)
    features: list[tuple[int, int]]  # feature_kd's (student, teacher) layer pairs, else []
    prompts: PromptSet
    stored: StoredSignal | None  # a `rayd score` dataset's teacher signal, else None
    teacher: TeacherSource  # where the teacher signal comes from, chosen here once
    served: list[Any]  # a served teacher's servers, what each serves (ServedTeacher); else []

    @property
    def teacher_actors(self) -> bool:
        """Whether teacher actors start (a stored signal or a teacher in the learners: none)."""
        return self.teacher == "actors"


def preflight(cfg: RunConfig) -> Preflight:
    """Every check that needs no cluster, in the order that fails a bad input soonest."""
    check_model_paths(cfg)
    rows = read_rows(cfg.data, cfg.trainer.seed, route_field=cfg.teacher.route_field)
    check_offline_data(cfg, rows.unencoded())
    check_routes(cfg, rows.unencoded())
    student, teachers, tokenizer, served = check_models(cfg)
    check_engine_parallel(cfg, student, teachers)
    # feature_kd and stored signal take one teacher (the config refuses several for them)
    first_teacher = teachers[0] if teachers else None
    features = feature_pairs(cfg, student, first_teacher)
    prompts = load_prompts(
        cfg.data,
        tokenizer,
        cfg.rollout.max_model_len - cfg.rollout.max_new_tokens,
        cfg.trainer.seed,
        route_field=cfg.teacher.route_field,
        rows=rows,
        teacher_prompts=teacher_prompts(cfg),
    )
    check_offline_data(cfg, prompts)  # again: long prompts may have been dropped
    check_routes(cfg, prompts)
    stored = stored_signal(cfg, prompts, first_teacher, tokenizer)
    source = teacher_source(cfg.algorithm.needs_teacher, cfg.teacher.support, stored is not None)
    return Preflight(
        student_path=student,
        teacher_paths=teachers if source in ("actors", "learners") else [],
        tokenizer=tokenizer,
        features=features,
        prompts=prompts,
        stored=stored,
        teacher=source,
        served=served,
    )


def teacher_prompts(cfg: RunConfig) -> TeacherPrompts | None:
    """How each row's teacher prompt is written, when the teacher is shown a field of the row
    (teacher.privileged_context completion, rationale or answer); None otherwise (feedback is
    written per sample, from the step's own samples: rayd/teacher/privileged.py)."""
    t = cfg.teacher
    if t.privileged_context in ("none", "feedback"):
        return None
    room = t.max_model_len - cfg.rollout.max_new_tokens
    return TeacherPrompts(t.privileged_context, t.prompt_template, room)


def check_cluster(
    cfg: RunConfig, pre: Preflight, resources: dict[str, float], nodes: Sequence[dict[str, float]]
) -> None:
    """The run fits the Ray cluster it joined (`resources`: the cluster's totals; `nodes`:
    each alive node's resources)."""
    check_resources(cfg, resources, with_teacher=pre.teacher_actors)
    check_engine_room(cfg, nodes, with_teacher=pre.teacher_actors)


def stored_signal(
    cfg: RunConfig, prompts: PromptSet, teacher_path: str | None, tokenizer: Any
) -> StoredSignal | None:
    """A logit_kd run's teacher signal read from its `rayd score` dataset (checked against the
    run's teacher, tokenizer, k and tokens); None means the teacher scores online."""
    folder = stored_signal_folder(cfg.algorithm.name, cfg.data.train_dataset)
    if folder is None:
        return None
    if cfg.models.teachers is not None:
        raise ConfigError(
            f"data error: {folder}: the stored signal is one teacher's (rayd score), but the "
            "run has several (models.teachers), which score online: train on the unscored dataset"
        )
    if cfg.teacher.support == "full":
        raise ConfigError(
            "config error: teacher.support=full runs the teacher inside the learners, but "
            "the dataset carries a stored top-k signal (rayd score): drop one of the two"
        )
    assert teacher_path is not None and cfg.models.teacher is not None  # logit_kd needs one
    return load_stored_signal(
        folder,
        prompts,
        top_k=cfg.teacher.top_k,
        tokenizer=tokenizer,
        teacher_path=teacher_path,
        teacher_setting=cfg.models.teacher.path,
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _resolve(key: str, path: str, seed: int) -> str:
    """A local checkpoint folder, `tiny:<preset>` (built and cached), or a hub id
    (`Qwen/Qwen2.5-0.5B-Instruct`) fetched into the Hugging Face cache where the hub is
    reachable. Actors get the local folder, so on several nodes the HF cache (HF_HOME) must be
    shared storage, like the run folder."""
    try:
        resolved = resolve_model_path(path, seed=seed)
    except ValueError as exc:
        raise ConfigError(f"config error: {key}: {exc}") from None
    if not Path(resolved).exists() and _HUB_ID.match(path):
        resolved = _from_hub(key, path)
    if not (Path(resolved) / "config.json").is_file():
        raise ConfigError(
            f"config error: {key}: {path!r} is not a model folder (no config.json there); "
            "give a local Hugging Face checkpoint, tiny:<preset> or a hub id"
        )
    return resolved


def _from_hub(key: str, repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        # Weights in safetensors only: the .bin/.pth copies many repos also carry are not read.
        return snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as exc:  # offline, unknown repo, gated, network: all end the run here
        reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        where = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else "the hub"
        raise ConfigError(
            f"config error: {key}: {repo_id!r} is not a local folder, and no copy came from "
            f"the Hugging Face cache or {where} ({exc.__class__.__name__}: {reason[:200]})"
        ) from None


def _tokenizer(key: str, path: str):
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(
            f"config error: {key}: no tokenizer in {path} (expected tokenizer.json or "
            "tokenizer_config.json beside config.json)"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError, ValueError, TypeError, ... here
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ConfigError(
            f"config error: {key}: cannot load a tokenizer from {path}: {first}"
        ) from None


def check_model_paths(cfg: RunConfig) -> None:
    """The model paths' form, before any model is resolved (check_models builds a tiny:<preset>
    that is not cached yet, which can take minutes): a preset that exists, a local folder with
    config.json. A hub id is left to check_models (only the hub can say)."""
    paths = [("models.student.path", cfg.models.student.path)]
    if cfg.algorithm.needs_teacher:
        paths += [
            (cfg.models.teacher_key(i), t.path) for i, t in enumerate(cfg.models.teacher_list)
        ]
    for key, path in paths:
        if path.startswith("tiny:"):
            if path.removeprefix("tiny:") not in tiny_names():
                raise ConfigError(
                    f"config error: {key}: unknown tiny model {path!r}; presets: "
                    + ", ".join(tiny_names())
                )
        elif (Path(path).exists() or not _HUB_ID.match(path)) and not (
            Path(path) / "config.json"
        ).is_file():
            raise ConfigError(
                f"config error: {key}: {path!r} is not a model folder (no config.json there); "
                "give a local Hugging Face checkpoint, tiny:<preset> or a hub id"
            )


def check_models(cfg: RunConfig) -> tuple[str, list[str], Any, list[Any]]:
    """Resolve the student's and every teacher's path and refuse token-level distillation
    across different tokenizers; returns (student path, teacher paths, student tokenizer).
    The teacher paths are empty when no teacher actor will start.

    Equal `vocab_size` does not mean the same tokenizer, and the same tokenizer can come with
    different padded `vocab_size` (Qwen2.5-0.5B 151936 vs 7B 152064): compare the vocabularies.
    """
    student_spec = cfg.models.student
    student = _resolve(
        "models.student.path", student_spec.path, student_spec.build_seed(cfg.trainer.seed)
    )
    s_tok = _tokenizer("models.student.path", student)
    if s_tok.pad_token_id is None:
        raise ConfigError("config error: models.student.path: the tokenizer has no pad token")
    if not cfg.algorithm.needs_teacher:
        return student, [], s_tok, []  # no teacher actor starts, so none is loaded or checked
    if AutoConfig.from_pretrained(student).vocab_size < len(s_tok):
        raise ConfigError(
            "config error: models.student.path: model vocab_size is smaller than its tokenizer"
        )
    if cfg.models.self_taught:  # the student's own weights: the same model and tokenizer
        return student, [student], s_tok, []
    teachers = []
    for i, spec in enumerate(cfg.models.teacher_list):
        seed = spec.build_seed(cfg.trainer.seed)
        teachers.append(
            check_teacher(cfg, cfg.models.teacher_key(i), spec.path, student, s_tok, seed)
        )
    if cfg.teacher.backend == "server":  # a served teacher answers, and tokenizes as the student
        from rayd.teacher.server_scorer import check_servers, record_or_check_served_model

        t = cfg.teacher
        served = check_servers(
            t.urls or [],
            s_tok,
            top_k=t.top_k,
            max_model_len=t.max_model_len,
            timeout_s=t.request_timeout_s,
            served_model=t.served_model,
            api_key_env=t.api_key_env,
            ca_bundle=t.ca_bundle,
            vocab_size=AutoConfig.from_pretrained(teachers[0]).vocab_size,
        )
        # The served name(s): checked against what the first start recorded (the driver
        # records them once every check has passed: `record_or_check_served_model`).
        record_or_check_served_model(cfg.run_dir, served, t.served_model, write=False)
        return student, teachers, s_tok, served
    return student, teachers, s_tok, []


def check_teacher(cfg: RunConfig, key: str, path: str, student: str, s_tok: Any, seed: int) -> str:
    """One teacher against the student: same tokenizer, same stop tokens and chat template;
    errors name the teacher's config key (models.teacher.path, models.teachers[1].path)."""
    teacher = _resolve(key, path, seed)
    t_tok = _tokenizer(key, teacher)
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    if s_vocab != t_vocab:
        differ = len(set(s_vocab.items()) ^ set(t_vocab.items()))
        raise ConfigError(
            f"config error: {key}: the teacher's tokenizer differs from the "
            f"student's ({len(t_vocab)} vs {len(s_vocab)} tokens, {differ} entries differ); "
            "token-level distillation needs the same tokenizer"
        )
    check_same_turn_format(cfg, student, s_tok, teacher, t_tok, key)
    if AutoConfig.from_pretrained(teacher).vocab_size < len(s_tok):
        raise ConfigError(f"config error: {key}: model vocab_size is smaller than its tokenizer")
    return teacher


def feature_pairs(cfg: RunConfig, student: str, teacher: str | None) -> list[tuple[int, int]]:
    """feature_kd's (student, teacher) hidden-state index pairs, checked against both models;
    empty for every other mode. Index 0 is the embeddings, i the output of layer i."""
    algo = cfg.algorithm
    if algo.name != "feature_kd" or teacher is None:
        return []
    s_layers = int(AutoConfig.from_pretrained(student).num_hidden_layers)
    t_layers = int(AutoConfig.from_pretrained(teacher).num_hidden_layers)
    if algo.feature_layers is None:  # spread the student's layers over the teacher's depth
        return [(i, round(i * t_layers / s_layers)) for i in range(1, s_layers + 1)]
    for s, t in algo.feature_layers:
        if not (0 <= s <= s_layers and 0 <= t <= t_layers):
            raise ConfigError(
                f"config error: algorithm.feature_layers: pair [{s}, {t}] is out of range; the "
                f"student has hidden states 0..{s_layers}, the teacher 0..{t_layers}"
            )
    if not algo.feature_layers:
        raise ConfigError("config error: algorithm.feature_layers: give at least one pair")
    return [tuple(pair) for pair in algo.feature_layers]  # type: ignore[misc]


def stop_token_ids(path: str, tokenizer) -> set[int]:
    """Every id that ends a generation: the tokenizer's eos and the generation config's list.

    Chat models often stop on more than one id (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>),
    and vLLM stops on the generation config's ids, not only on the tokenizer's.
    """
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = Path(path) / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(path).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


def check_same_turn_format(
    cfg: RunConfig, student: str, s_tok, teacher: str, t_tok, key: str = "models.teacher.path"
) -> None:
    """The teacher must score the student's text in the format it was tuned on, and agree on
    where a completion ends.

    A teacher that never ends a turn where the student does puts low probability on the
    student's stop token, so distillation teaches the student not to stop: runaway lengths. And
    a chat model scoring prompts in another model's template sees text it was never tuned on.
    """
    s_stop, t_stop = stop_token_ids(student, s_tok), stop_token_ids(teacher, t_tok)
    if s_stop != t_stop:
        student_names = s_tok.convert_ids_to_tokens(sorted(s_stop))
        teacher_names = t_tok.convert_ids_to_tokens(sorted(t_stop))
        raise ConfigError(
            f"config error: {key}: teacher and student end completions on different tokens "
            f"(student {student_names}, teacher {teacher_names}; tokenizer eos and "
            "generation_config.json eos_token_id); a teacher that does not stop where the "
            "student stops teaches it never to stop"
        )
    s_tpl, t_tpl = getattr(s_tok, "chat_template", None), getattr(t_tok, "chat_template", None)
    if cfg.data.chat_template == "auto" and s_tpl != t_tpl:
        which = "only the student has" if not t_tpl else "only the teacher has" if not s_tpl else ""
        raise ConfigError(
            f"config error: {key}: teacher and student chat templates differ"
            + (f" ({which} one)" if which else "")
            + "; the teacher would score prompts in the student's template. Use models with "
            "the same template, or data.chat_template=never for plain-text prompts"
        )


def check_engine_parallel(cfg: RunConfig, student: str, teachers: Sequence[str]) -> None:
    """Tensor / pipeline parallel sizes that fit the models: tensor parallel splits the
    attention heads (and the key/value heads, or replicates them), pipeline parallel the layers.
    `teachers`: the resolved paths of the teachers whose engines start (none: no check)."""
    engines = (
        [("rollout", cfg.rollout, "models.student.path", student)]
        if not cfg.algorithm.offline
        else []
    )
    engines += [
        ("teacher", cfg.teacher, cfg.models.teacher_key(i), path) for i, path in enumerate(teachers)
    ]
    for name, section, key, path in engines:
        tp, pp = section.tensor_parallel_size, section.pipeline_parallel_size
        if tp * pp == 1:
            continue
        model = AutoConfig.from_pretrained(path)
        text = getattr(model, "text_config", None) or model
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        layers = int(text.num_hidden_layers)
        if heads % tp:
            raise ConfigError(
                f"config error: {name}.tensor_parallel_size={tp} does not divide the "
                f"{heads} attention heads of {key}"
            )
        if kv_heads % tp and tp % kv_heads:
            raise ConfigError(
                f"config error: {name}.tensor_parallel_size={tp} neither divides nor is a "
                f"multiple of the {kv_heads} key/value heads of {key}"
            )
        if pp > layers:
            raise ConfigError(
                f"config error: {name}.pipeline_parallel_size={pp} is more than the {layers} "
                f"layers of {key}"
            )


def check_engine_room(
    cfg: RunConfig, nodes: Sequence[dict[str, float]], with_teacher: bool | None = None
) -> None:
    """Every multi-device engine fits the Ray cluster's nodes (`nodes`: each alive node's
    resources): a tensor-parallel group on one node (GPU), all ranks on one node (CPU: they are
    the actor's child processes)."""
    if with_teacher is None:
        with_teacher = cfg.algorithm.needs_teacher
    sections = [("rollout", cfg.rollout)] if not cfg.algorithm.offline else []
    if with_teacher and cfg.teacher.backend != "server":
        sections.append(("teacher", cfg.teacher))
    for name, section in sections:
        tp, pp = section.tensor_parallel_size, section.pipeline_parallel_size
        if tp * pp == 1:
            continue
        if section.gpus_per_worker:
            most = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
            if tp > most:
                raise ConfigError(
                    f"config error: {name}.tensor_parallel_size={tp} needs {tp} GPUs on one node; "
                    f"the largest node of the Ray cluster has {most:g}"
                )
        else:
            want = tp * pp * section.cpus_per_worker
            most = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
            if want > most + 1e-9:
                raise ConfigError(
                    f"config error: a {name} engine of {tp * pp} ranks "
                    f"({name}.tensor_parallel_size x pipeline_parallel_size) x "
                    f"{name}.cpus_per_worker={section.cpus_per_worker:g} needs {want:g} CPUs on "
                    f"one node; the largest node of the Ray cluster has {most:g}"
                )


def check_resources(
    cfg: RunConfig, available: dict[str, float], with_teacher: bool | None = None
) -> None:
    """`with_teacher`: whether teacher actors start (default: whenever the algorithm needs a
    teacher; False when its signal is read from a `rayd score` dataset)."""
    r, t, ln = cfg.rollout, cfg.teacher, cfg.learner
    if with_teacher is None:
        with_teacher = cfg.algorithm.needs_teacher
    # Every teacher is a pool of its own with the `teacher:` section's settings.
    teachers = t.num_workers * len(cfg.models.teacher_list) if with_teacher else 0
    # rollout.backend=learner: the learner ranks sample; no rollout actor asks for room
    rollouts = 0 if r.backend == "learner" else r.num_workers
    for res, want, how in (
        (
            "GPU",
            rollouts * r.devices * r.gpus_per_worker
            + teachers * t.devices * t.gpus_per_worker
            + ln.num_learners * ln.gpus_per_learner,
            "rollout.num_workers*devices*gpus_per_worker + "
            "teachers*teacher.num_workers*devices*gpus_per_worker + "
            "learner.num_learners*gpus_per_learner",
        ),
        (
            "CPU",
            rollouts * r.devices * r.cpus_per_worker
            + teachers * t.devices * t.cpus_per_worker
            + ln.num_learners * ln.cpus_per_learner,
            "rollout/teacher cpus_per_worker x devices per engine, and learner.cpus_per_learner",
        ),
    ):
        have = available.get(res, 0.0)
        if want > have + 1e-9:
            raise ConfigError(
                f"config error: the run asks for {want:g} {res}s ({how}) but the Ray cluster "
                f"has {have:g}"
            )


def check_offline_data(cfg: RunConfig, prompts: PromptSet) -> None:
    """The offline modes and gkd need a completion per training prompt; step_by_step needs the
    answer and the rationale apart; the label task and the task reward need the answer."""
    algo = cfg.algorithm
    where = cfg.data.train_dataset or cfg.data.source
    for key, use, needed in (
        ("algorithm.label_weight > 0", "trains on gold answers", algo.label_weight > 0),
        ("algorithm.reward_weight > 0", "rewards right answers", algo.reward_weight > 0),
        (
            "teacher.privileged_context=feedback",
            "shows the teacher a correct sample",
            cfg.teacher.privileged_context == "feedback",
        ),
    ):
        if needed and any(p.answer is None for p in prompts.train):
            raise ConfigError(
                f"data error: {where}: {key} {use}, but some training rows "
                "have no 'answer' (a task, or a dataset with an answer column)"
            )
    if not (algo.offline or algo.lmbda < 1.0):
        return
    if any(p.completion_ids is None for p in prompts.train):
        raise ConfigError(
            f"data error: {where}: algorithm.name={algo.name} trains on completions, but some "
            f"training rows have no {cfg.data.completion_field!r} field (data.completion_field)"
        )
    if algo.name == "step_by_step" and any(
        p.answer is None or p.rationale is None for p in prompts.train
    ):
        raise ConfigError(
            f"data error: {where}: algorithm.name=step_by_step needs 'answer' and 'rationale' "
            "for every training row (rayd generate and the built-in tasks write both)"
        )


def check_routes(cfg: RunConfig, prompts: PromptSet) -> None:
    """teacher.route_field's values name teachers, and the field exists in the training rows
    (a misspelt field would otherwise route every row by hash without a word)."""
    field = cfg.teacher.route_field
    if field is None or cfg.models.teachers is None:
        return
    names = [t.name for t in cfg.models.teachers]
    where = cfg.data.train_dataset or cfg.data.source
    for split, rows in (("train", prompts.train), ("eval", prompts.eval)):
        for p in rows:
            where = cfg.data.source if split == "eval" else where
            if p.route is not None and p.route not in names:
                raise ConfigError(
                    f"data error: {where}: a {split} row has {field}={p.route!r}, which names no "
                    f"teacher (models.teachers: {', '.join(names)})"
                )
    if all(p.route is None for p in prompts.train):
        raise ConfigError(
            f"data error: {where}: no training row has the field {field!r} "
            "(teacher.route_field); remove it to route every row by hash"
        )
