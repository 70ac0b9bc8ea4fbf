"""The typed config tree: the only place defaults live.

A run is configured by one YAML file plus dotted `key=value` overrides (`learner.zero_stage=3`).
Validation happens before any actor starts and raises `ConfigError` with one line per problem,
naming the key and what is allowed. Nothing here silently changes a value the user gave.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rayd.sampling import Sampling

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """Bad configuration or input; the message is meant for the user as it is."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must never fall back silently to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    # A local Hugging Face checkpoint folder, or "tiny:<preset>" for a model rayd builds itself
    # (see rayd/zoo.py); hub names work only where the machine can reach the hub.
    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # A preset's build (initialisation, pretraining) follows trainer.seed unless pinned here; a
    # seed sweep pins its teacher (seed: 0) so that the seeds vary the student's training, not
    # the teacher it learns from.
    seed: int | None = Field(
        None, ge=0, description="tiny:<preset> only: the seed of its build; default trainer.seed"
    )

    @field_validator("seed")
    @classmethod
    def _seed_only_for_presets(cls, seed: int | None, info: ValidationInfo) -> int | None:
        path = info.data.get("path", "")
        if seed is not None and not path.startswith("tiny:"):
            raise ValueError(
                f"only a tiny:<preset> is built from a seed; {path!r} is a checkpoint whose "
                "weights are already fixed (drop the seed)"
            )
        return seed

    def build_seed(self, run_seed: int) -> int:
        """The seed a tiny:<preset> is built with: its own if pinned, else the run's."""
        return run_seed if self.seed is None else self.seed


class TeacherSpec(ModelSpec):
    # One of several teachers. The name keys the routing field's values and the per-teacher
    # metrics (teacher/<name>/reverse_kl), so it is kept to characters safe in both.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    weight: float = Field(
        1.0,
        gt=0,
        description="ensemble: mixture weight; route: share of the prompts routed by hash "
        "(normalised over the teachers)",
    )


SELF = "self"  # models.teacher: the student's own weights teach


class ModelsConfig(_Strict):
    student: ModelSpec
    # Needed by every mode that asks a teacher for scores; sft and step_by_step train on a
    # dataset's completions (often teacher-written by `rayd generate`) and start no teacher.
    # "self": the student's own weights teach (self-distillation: SDFT, SDPO), frozen at the
    # start, live or an EMA (teacher.weights), usually shown privileged context the student
    # does not see (teacher.privileged_context).
    teacher: ModelSpec | None = None
    # Several teachers instead of one (each its own actor pool, sharing the `teacher:` section's
    # settings), combined as `teacher.combine` says. Give `teacher` or `teachers`, not both.
    teachers: list[TeacherSpec] | None = None

    @property
    def teacher_list(self) -> list[TeacherSpec]:
        """Every teacher, one or several, as (name, path, dtype, seed, weight); [] for none."""
        if self.teachers is not None:
            return list(self.teachers)
        if self.teacher is None:
            return []
        t = self.student if self.self_taught else self.teacher
        name = "self" if self.self_taught else "teacher"
        return [TeacherSpec(name=name, path=t.path, dtype=t.dtype, seed=t.seed)]

    @field_validator("teacher", mode="before")
    @classmethod
    def _self_is_a_path(cls, value: Any) -> Any:
        """`models.teacher: self` is short for `models.teacher: {path: self}`."""
        return {"path": SELF} if value == SELF else value

    @property
    def self_taught(self) -> bool:
        """Whether the student's own weights teach (models.teacher: self)."""
        return self.teacher is not None and self.teacher.path == SELF

    def teacher_key(self, index: int) -> str:
        """The config key of a teacher's path, for error messages."""
        if self.self_taught:
            return "models.teacher"
        if self.teachers is None:
            return "models.teacher.path"
        return f"models.teachers[{index}].path"


class EngineSection(_Strict):
    """The settings every pool of engine actors shares (rollout:, teacher:, `rayd generate`'s
    engines:): how many actors, what each one's engine accepts and uses, and how many devices
    one engine spans. Each section adds its own `backend` choices."""

    num_workers: int = Field(1, ge=1, description="engine actors in the pool")
    max_model_len: int = Field(
        512, ge=8, description="prompt + completion tokens one engine accepts"
    )
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM's KV-cache budget per engine")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    threads: int = Field(1, ge=1, description="torch / OpenMP threads of each engine process")
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="devices per engine that split every layer (vLLM tensor parallel; must "
        "divide the model's attention heads); cpus_per_worker / gpus_per_worker are per device",
    )
    pipeline_parallel_size: int = Field(
        1,
        ge=1,
        description="stages per engine that split the layers (vLLM pipeline parallel; at most "
        "the model's layers); with a GPU an engine's stages may sit on different nodes",
    )

    @property
    def devices(self) -> int:
        """Devices (GPUs, or CPU ranks) one engine spans."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def parallel_problem(self, name: str, backend: str) -> str | None:
        """Why this section's multi-device engine cannot start (`name`: the section's key), or
        None. Checked by the config that holds the section: a section's own validator error
        would print the whole section."""
        if self.devices == 1:
            return None
        if backend != "vllm":
            return (
                f"{name}.tensor_parallel_size / pipeline_parallel_size > 1 need "
                f"{name}.backend=vllm (got {backend}): only vLLM engines split a model over "
                "devices"
            )
        if self.gpus_per_worker not in (0, 1):
            return (
                f"{name}.gpus_per_worker={self.gpus_per_worker:g}: a multi-device engine takes "
                "whole GPUs (1 per device; 0 on a CPU machine)"
            )
        return None


class RolloutConfig(EngineSection):
    backend: Literal["vllm", "hf", "learner"] = Field(
        "vllm",
        description="vllm / hf: rollout actors (vLLM, or transformers generate) that get new "
        "weights every step; learner: each learner rank samples its share of the prompts "
        "with its own live weights (transformers, sampled as generate samples), with no "
        "rollout actor and no weight sync: for small students, where an engine's calls and "
        "syncs cost more than its speed saves (docs/experiments/performance.md)",
    )
    n: int = Field(1, ge=1, description="completions sampled per prompt")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)
    truncated: Literal["keep", "drop"] = Field(
        "keep",
        description="completions cut at max_new_tokens: keep = train on them; drop = leave "
        "them out of the loss (the row stays in the batch; truncated_fraction counts them)",
    )

    def sampling(self, return_topk: int = 0) -> Sampling:
        """The training rollouts' sampling settings (`return_topk`: the student's top-k ids
        that teacher.support needs, `RunConfig.student_topk`)."""
        return Sampling(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            return_topk=return_topk,
        )


class TeacherConfig(EngineSection):
    # vllm / hf: the teacher runs inside rayd's teacher actors. server: it is served elsewhere by
    # an OpenAI-compatible `vllm serve` (teacher.urls); the actors only send requests, and
    # models.teacher.path still names a local copy of its tokenizer and config.json (the
    # vocabulary checks read it; training loads no weights from it).
    backend: Literal["vllm", "hf", "server"] = "vllm"
    urls: list[str] | None = Field(
        None,
        min_length=1,
        description="server: base URLs of the teacher's servers (http://host:8000), requests "
        "spread over them",
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="server: deadline of one scoring request, in seconds"
    )
    request_retries: int = Field(
        2,
        ge=0,
        le=20,
        description="server: retries of a request that failed to connect, timed out or got a "
        "5xx (each on the next URL); then the run stops with the URL named",
    )
    max_concurrency: int = Field(
        8, ge=1, le=256, description="server: requests in flight at once per teacher actor"
    )
    served_model: str | None = Field(
        None,
        min_length=1,
        description="server: the model name every server must list at /v1/models (vllm serve "
        "--served-model-name); None: the name(s) recorded in the run folder at the first start "
        "(served_teacher.json) are checked on resume",
    )
    api_key_env: str | None = Field(
        None,
        description="server: the NAME of an environment variable holding the servers' API key "
        "(vllm serve --api-key), sent as 'Authorization: Bearer'; read on the driver, never "
        "printed or saved",
    )
    ca_bundle: str | None = Field(
        None,
        description="server: a PEM file of the CA(s) that sign the https:// servers' "
        "certificates (a private CA); None: the system's CAs",
    )
    max_response_mb: float | None = Field(
        None,
        gt=0,
        description="server: the largest answer body accepted, in MiB (a larger one fails the "
        "step); None: 1 MiB + 256 bytes per (top_k + 1) entry of teacher.max_model_len positions",
    )
    top_k: int = Field(
        8,
        ge=1,
        le=1024,
        description="how many token ids per position the top-k losses compare (1 to 1024; "
        "whose ids: support); on_policy_pg and support=full read none",
    )
    # Which token ids the top-k losses compare the two models at, at every sampled position:
    # teacher_topk: the teacher's top_k (any backend);
    # student_topk: the student's top_k, taken from its rollout, with the teacher's exact
    #      log-probs at them (hf backend: vLLM cannot score chosen ids), so reverse KL covers
    #      the tokens the student puts mass on, which the teacher's top-k may miss;
    # union: the student's top_k plus the teacher's top_k most likely among the other ids
    #      (2 * top_k distinct ids holding both lists; hf backend).
    # full: the whole vocabulary, exact at any temperature: each learner holds a frozen copy of
    #      the teacher (transformers, models.teacher.dtype) and runs its forward beside the
    #      student's, so no [tokens, vocab] tensor crosses the wire and no teacher actor starts
    #      (the held-out eval asks learner rank 0). Costs a teacher forward and a teacher's
    #      memory per learner: for a teacher that fits beside the student.
    support: Literal["teacher_topk", "student_topk", "union", "full"] = "teacher_topk"
    # Several teachers (models.teachers), see README "Several teachers":
    # ensemble: every sample gets the mixture sum_i w_i p_i, over the union of the teachers'
    #      supports (exact with the hf backend; vLLM: a teacher's mass outside its own top-k is
    #      spread evenly over the rest of the vocabulary);
    # route: every sample gets one teacher's signal, chosen by its prompt's `route_field`, or
    #      for rows without that field by a hash of the prompt index (weights as proportions).
    combine: Literal["ensemble", "route"] = "ensemble"
    route_field: str | None = Field(
        None,
        min_length=1,
        description="route: the JSONL / dataset column naming each row's teacher "
        "(rows without it are routed by hash)",
    )
    # Privileged context: the teacher scores the student's completion after a prompt that also
    # shows it what the student does not see, written by prompt_template from the row:
    # completion: the row's reference completion (a demonstration: SDFT); rationale / answer:
    #      a task's gold rationale or answer;
    # feedback: a correct sample of the same prompt from this step (another of its rollout.n;
    #      the task's verifier decides: SDPO); a sample without one gets no teacher signal.
    privileged_context: Literal["none", "completion", "rationale", "answer", "feedback"] = Field(
        "none",
        description="what the teacher is shown besides the prompt (prompt_template); none: the "
        "student's own prompt",
    )
    prompt_template: str = Field(
        "{prompt}\n\n{privileged_context}",
        min_length=1,
        description="the teacher's prompt text, from {prompt} (the row's prompt text) and "
        "{privileged_context}; encoded as the student's prompts are (data.chat_template)",
    )
    # models.teacher: self. frozen: the initial student; live: the weights being trained;
    # ema: theta_T <- (1 - ema_rate) theta_T + ema_rate theta_S after every optimizer step,
    # kept by the learners (a full copy per rank; a LoRA student's merged weights).
    weights: Literal["frozen", "live", "ema"] = Field(
        "frozen", description="models.teacher: self: which of the student's weights teach"
    )
    ema_rate: float = Field(
        0.05, gt=0, le=1, description="weights=ema: the EMA's rate, in (0, 1] (1 = live)"
    )
    sync_every: int = Field(
        1,
        ge=1,
        description="weights=live/ema with teacher actors: optimizer steps between the "
        "teacher engines' weight loads (the learners' teacher needs none)",
    )


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear"] = Field(
        "constant", description="after warmup: constant, or linear decay to 0 at max_steps"
    )


class LoraConfig(_Strict):
    # A LoRA student (peft): the base weights stay frozen and only the low-rank adapters train,
    # so the optimizer holds state for the adapters alone. The rollout engines, the final
    # student/ and `rayd export` get the merged weights W + (alpha / r) * B @ A; the adapter
    # itself is kept beside them (student/adapter/, `rayd export --adapter`).
    r: int = Field(8, ge=1, description="the adapters' rank")
    alpha: float = Field(16.0, gt=0, description="scaling: the update is (alpha / r) * B @ A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="the linear layers that get adapters: peft's 'all-linear' (every linear "
        "layer but the output layer) or a list of module-name suffixes (q_proj, v_proj, ...)",
    )


class LearnerConfig(_Strict):
    num_learners: int = Field(2, ge=1)
    zero_stage: int = Field(2, ge=0, le=3)
    # Memory levers (each one measured by `rayd bench --only memory`):
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each layer's activations in the backward pass instead of "
        "keeping them: less activation memory for about one more forward's compute",
    )
    offload_optimizer: bool = Field(
        False,
        description="ZeRO 1-3: keep the optimizer's state and step in host memory "
        "(DeepSpeed offload_optimizer device=cpu)",
    )
    offload_params: bool = Field(
        False,
        description="ZeRO-3: keep the parameters' shards in host memory between uses "
        "(DeepSpeed offload_param device=cpu)",
    )
    lora: LoraConfig | None = Field(
        None, description="set to train LoRA adapters instead of every weight (see LoraConfig)"
    )
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    cpus_per_learner: float = Field(0.5, gt=0)
    gpus_per_learner: float = Field(0.0, ge=0)
    threads: int = Field(1, ge=1)
    length_bucketing: bool = Field(
        True,
        description="order each step's rows by length so micro-batches carry little padding",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)


AlgorithmName = Literal["on_policy", "gkd", "sft", "step_by_step", "logit_kd", "feature_kd"]
OFFLINE_ALGORITHMS = ("sft", "step_by_step", "logit_kd", "feature_kd")
# algorithm.loss's divergences over the teacher's top-k bins (rayd/losses.py LOSSES); any
# teacher.support may choose the bins' ids. FULL_VOCAB_LOSSES also run over the whole vocabulary.
TOPK_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")
FULL_VOCAB_LOSSES = ("forward_kl", "reverse_kl", "jsd")


def _either(names: tuple[str, ...]) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


class AlgorithmConfig(_Strict):
    # on_policy: student samples only. Default loss is the per-token reverse-KL policy gradient
    #      on the sampled token (Thinking Machines); the others (TOPK_LOSSES) instead take a
    #      divergence densely over the teacher's top-k at every completion position.
    # gkd: the same divergences on a lambda-mix of student samples and dataset completions
    #      (Agarwal et al., GKD).
    # Offline (no student sampling; the dataset's completions are the targets):
    # sft: cross-entropy on the completions (response distillation when they are teacher-written).
    # step_by_step: Distilling Step-by-Step (Hsieh et al. 2023): the plain prompt -> answer, and
    #      rationale_prefix + prompt -> rationale;
    #      loss = CE(answer) + rationale_weight * CE(rationale).
    # logit_kd: Hinton soft targets: alpha * T^2 * KL(teacher_T || student_T) over the teacher's
    #      top-k (scored online by the teacher actor) + (1 - alpha) * CE on the completion.
    # feature_kd: CE on the completion + feature_weight * the mean over feature_layers pairs of
    #      MSE or cosine distance between a learned linear projection of the student's hidden
    #      state and the teacher's (FitNets, Romero et al. 2015; TinyBERT-style layer maps).
    name: AlgorithmName = "on_policy"
    loss: (
        Literal[
            "on_policy_pg", "forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"
        ]
        | None
    ) = Field(
        None,
        description="on_policy/gkd only: on_policy_pg = policy gradient on the sampled token "
        "(on_policy); forward_kl = KL(teacher || student), reverse_kl = KL(student || teacher), "
        "jsd (beta), tvd = total variation, skew_kl / skew_reverse_kl (skew): over the "
        "teacher's top-k bins; defaults: on_policy -> on_policy_pg, gkd -> jsd",
    )
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="jsd: the teacher's weight in the mixture m = beta * p_T + (1 - beta) * p_S, "
        "in [0, 1]; 0 = forward KL, 1 = reverse KL (TRL's convention)",
    )
    skew: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="skew_kl / skew_reverse_kl: DistiLLM's alpha a in [0, 1): "
        "KL(p_T || a p_T + (1 - a) p_S) / KL(p_S || a p_S + (1 - a) p_T); 0 = plain KL",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="> 0: the loss compares both models' distributions softened by it "
        "(logit_kd scales its soft term by its square); != 1 needs tail=false and "
        "teacher.backend=hf, or teacher.support=full; sft, step_by_step, feature_kd: 1",
    )
    tail: bool = Field(
        True,
        description="top-k losses: one more bin for each side's mass outside the k ids "
        "(needs temperature 1); false = both renormalised within the k ids",
    )
    is_clip: float | None = Field(
        None,
        gt=0,
        description="> 0: on_policy_pg truncates its importance ratio here (unset: no cap); the "
        "top-k losses cap the weight of stale rows (trainer.max_staleness) here (unset: 2)",
    )
    lmbda: float = Field(
        1.0, ge=0, le=1, description="gkd: fraction of on-policy samples, in [0, 1]"
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="logit_kd: weight of the soft-target term, in [0, 1] (1 - alpha: CE)",
    )
    rationale_weight: float = Field(1.0, ge=0, description="step_by_step: weight of CE(rationale)")
    rationale_prefix: str = Field(
        "why: ", min_length=1, description="step_by_step: the rationale task's input prefix"
    )
    feature_layers: list[tuple[int, int]] | None = Field(
        None,
        description="feature_kd: [student, teacher] hidden-state index pairs (0 = embeddings, "
        "i = output of layer i); default: every student layer i to teacher layer "
        "round(i * teacher_layers / student_layers)",
    )
    feature_loss: Literal["mse", "cosine"] = Field(
        "mse",
        description="feature_kd: the distance between projected student and teacher hidden "
        "states: mse, or cosine (1 - cosine similarity)",
    )
    feature_weight: float = Field(1.0, ge=0, description="feature_kd: weight of the feature term")
    # On-policy rationale distillation (on_policy, gkd): how each completion's loss is shared
    # among its reasoning steps. Steps end at `step_delimiter`; the answer after the task's
    # marker ("A=") is a step of its own. Every completion keeps mean token weight 1.
    # none: every token weighs 1 (plain per-token distillation);
    # uniform: every step the same total weight, whatever its length;
    # divergence: step s gets softmax_s(mean reverse KL of s / step_temperature) of the weight,
    #      the sampled-token estimate behaviour_lp - teacher_lp (gkd's dataset rows: uniform).
    step_weighting: Literal["none", "uniform", "divergence"] = "none"
    step_delimiter: str = Field(
        ";", min_length=1, description="ends a reasoning step (addition: ';'; GSM8K-style: '\\n')"
    )
    step_temperature: float = Field(
        1.0, gt=0, description="divergence weighting: lower puts more weight on the worst steps"
    )
    # Distilling Step-by-Step's label task beside on-policy rationale distillation: per prompt,
    # label_prefix + prompt -> the gold answer ("A=85"), cross-entropy weighted label_weight.
    # The prefix keeps it apart from the plain prompt, on which the student writes a rationale.
    label_weight: float = Field(
        0.0, ge=0, description="on_policy/gkd: weight of CE(gold answer); 0 = no label task"
    )
    label_prefix: str = Field(
        "answer: ", min_length=1, description="on_policy/gkd: the label task's input prefix"
    )
    # Distillation plus a task reward (verl, tinker, NeMo-RL): the task's verifier gives each
    # on-policy sample 1 (right final answer) or 0; its advantage, the reward minus the mean
    # over the prompt's rollout.n samples (over the step's on-policy samples when n = 1), is a
    # sequence-level policy gradient on every token of the completion, added to
    # distill_weight times the distillation loss.
    reward_weight: float = Field(
        0.0,
        ge=0,
        description="on_policy/gkd: weight of the verifier's sequence reward (may exceed 1); "
        "0 = distillation only",
    )
    distill_weight: float = Field(
        1.0,
        ge=0,
        description="on_policy/gkd: weight of the distillation loss; 0 with reward_weight > 0 "
        "trains on the reward alone (the teacher still scores, for the reverse_kl metric)",
    )
    # Position-weighted on-policy distillation (IW-OPD, "On the Position Bias of On-Policy
    # Distillation", arXiv 2606.22600; TRL's trl.experimental.iw_opd): a student's later tokens
    # sit on prefixes the teacher supervises worse, so each token's loss is multiplied by
    #     w_t = 1 + gamma * (1 - P_t / max(Z, epsilon)),
    # P_t the discrepancy of the completion's tokens before t, Z the whole completion's: the
    # first token gets 1 + gamma, the weights fall towards 1 as the discrepancy accumulates.
    # The discrepancy of a token is |teacher_lp - behaviour_lp| of its sampled token for
    # on_policy_pg (TRL's definition); for the dense losses, its own per-token divergence
    # (rayd's extension). docs/algorithms.md says more.
    position_weighting: Literal["none", "iw_opd"] = Field(
        "none",
        description="on_policy/gkd: iw_opd weighs each token by the discrepancy still ahead of "
        "it in its completion (IW-OPD); none: every token weighs 1",
    )
    iw_opd_gamma: float = Field(
        0.5, ge=0, description="iw_opd: the amplification gamma (first token's weight 1 + gamma)"
    )
    iw_opd_epsilon: float = Field(
        1e-8, gt=0, description="iw_opd: the floor of the completion's total discrepancy Z"
    )

    @property
    def offline(self) -> bool:
        """Trains on dataset completions only: no student sampling during training."""
        return self.name in OFFLINE_ALGORITHMS

    @property
    def resolved_loss(self) -> str:
        if self.name in ("sft", "step_by_step"):
            return "sft"
        if self.name in ("logit_kd", "feature_kd"):
            return self.name
        return self.loss or {"on_policy": "on_policy_pg", "gkd": "jsd"}[self.name]

    @property
    def needs_teacher(self) -> bool:
        """Whether training asks the teacher actor for scores (sft and step_by_step do not)."""
        return self.resolved_loss != "sft"


class DataConfig(_Strict):
    # "task:<name>" for a built-in task (rayd/tasks), a JSONL file with prompt/completion, or
    # "hub:<dataset>" (a Hugging Face datasets name, with hub_config and hub_split).
    source: str = "task:addition"
    hub_config: str | None = Field(None, description="hub: sources: the dataset's config name")
    hub_split: str = Field("train", description="hub: sources: the split read")
    task_options: dict[str, Any] = Field(default_factory=dict)
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    train_size: int = Field(2000, ge=1)
    train_fraction: float = Field(
        1.0, gt=0, le=1, description="share of the training rows used (first rows, seeded order)"
    )
    train_dataset: str | None = Field(
        None,
        description="a `rayd generate` output folder (or any datasets folder with prompt, "
        "completion, answer[, rationale] columns): training completions for the offline modes; "
        "eval prompts still come from `source`",
    )
    rationales: bool = Field(
        True, description="task data: completions with the gold rationale, or the answer alone"
    )
    eval_size: int = Field(32, ge=1)
    eval_split: Literal["eval", "validation", "test"] = Field(
        "eval",
        description="task sources: the held-out split the eval prompts come from; validation "
        "and test halve eval (choose settings on validation, report test)",
    )
    split_seed: int | None = Field(
        None,
        ge=0,
        description="the seed of the train/held-out split and of the rows' seeded order (a "
        "task's pairs and its variants' rationales, a file's shuffle); unset: trainer.seed. "
        "Pin it in a seed sweep, so that every seed is scored on the same held-out prompts",
    )
    chat_template: Literal["auto", "never"] = Field(
        "auto",
        description="auto: prompts go in the student tokenizer's chat template when it has one "
        "(a user turn, then the assistant's opening); never: plain text",
    )
    long_prompts: Literal["error", "drop", "truncate"] = "error"
    bad_lines: Literal["error", "skip"] = Field(
        "error", description="a malformed JSONL line: stop with its file:line, or skip (counted)"
    )

    def split_seed_for(self, run_seed: int) -> int:
        """The seed the rows are split and ordered with: `split_seed` if pinned, else the run's."""
        return run_seed if self.split_seed is None else self.split_seed


class TrainerConfig(_Strict):
    max_steps: int = Field(20, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    eval_every: int = Field(5, ge=0, description="0 = only before and after training")
    eval_sample_temperature: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="also eval/sampled_accuracy: one draw per eval prompt at this temperature, "
        "seeded by trainer.seed and the step (one more generation pass per eval); "
        "None = greedy accuracy only",
    )
    save_every: int = Field(
        0, ge=0, description="0 = no resumable checkpoints; the final student is always exported"
    )
    keep_checkpoints: int = Field(2, ge=1, description="resumable checkpoints kept (newest)")
    resume: Literal["auto", "must", "never"] = Field(
        "auto",
        description="auto: resume from the newest valid checkpoint in the run folder if any; "
        "must: fail without one; never: fail if the run folder holds checkpoints",
    )
    max_nonfinite_in_row: int = Field(
        3, ge=1, description="skipped (non-finite) updates in a row before the run stops"
    )
    actor_restarts: int = Field(
        3, ge=0, description="restarts of a dead rollout or teacher actor before the run stops"
    )
    learner_restarts: int = Field(
        2, ge=0, description="rebuilds of the learner group from the last checkpoint"
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="0 = synchronous; k >= 1: the next step's rollouts are generated while "
        "the learners train, from weights at most k versions behind the ones they train",
    )
    seed: int = 0
    call_timeout_s: float = Field(600.0, gt=0)
    allow_changes: list[str] = Field(
        default_factory=list,
        description="resume a checkpoint although these keys (or sections, or 'data') differ "
        "from what it was trained with; docs/reliability.md lists the keys that may always change",
    )


class SyncConfig(_Strict):
    """How the student's weights reach the rollout engines after each update."""

    method: Literal["auto", "stream", "blob"] = Field(
        "auto",
        description="stream: in buckets over a process group, through vLLM's weight-transfer "
        "API (vLLM engines only); blob: one safetensors blob through the Ray object store "
        "(any engine); auto: stream where it can (vLLM engines; two or more of them when "
        "trainer.max_staleness > 0), else blob",
    )
    bucket_mib: float = Field(
        512,
        ge=0.001,
        le=4096,
        allow_inf_nan=False,
        description="stream: bytes per broadcast, in MiB (larger tensors travel in pieces); "
        "the sender holds about two buckets beyond the model",
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="stream: a sync (or the group's start-up) that takes longer "
        "ends the run, naming the engine that did not finish",
    )

    @property
    def bucket_bytes(self) -> int:
        return max(16, int(self.bucket_mib * 2**20))

    def streams(self, rollout_backend: str, max_staleness: int, engines: int) -> bool:
        """Whether this run's rollout engines get their weights streamed: vLLM engines, and,
        when rollouts run ahead, another engine to take a lost one's calls."""
        possible = rollout_backend == "vllm" and (max_staleness == 0 or engines >= 2)
        return possible and self.method in ("stream", "auto")


class WandbConfig(_Strict):
    project: str = Field(min_length=1)
    entity: str | None = None
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: write the run under <run>/wandb, `wandb sync` it later"
    )
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(_Strict):
    tensorboard: bool = True
    progress: bool = True
    samples: Literal["off", "tokens", "signal"] = Field(
        "off",
        description="samples.jsonl in the run folder, a line per training sample of every "
        "step: tokens = its ids, text and log-probs; signal = also its teacher signal (top-k "
        "ids and log-probs; large: docs/usage.md gives the size)",
    )
    # Weights & Biases (`pip install 'rayd[tracking]'`): the run's config once, every step's
    # metrics; a resumed run continues the same W&B run. (No MLflow: mlflow-skinny pins
    # cachetools<8, vllm 0.32 needs cachetools>=8, so they cannot share an environment.)
    wandb: WandbConfig | None = None


class RunConfig(_Strict):
    name: str = "run"
    output_dir: str = Field("runs/{name}", description="{name} is replaced by `name`")
    models: ModelsConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        algo = self.algorithm
        self._check_teacher_list()
        # Before the sample count, which these options change: name the option, not the count.
        if algo.offline and algo.step_weighting != "none":
            raise ValueError(
                f"algorithm.step_weighting applies to on_policy and gkd, not {algo.name} "
                "(set algorithm.step_weighting=none)"
            )
        if algo.offline and algo.position_weighting != "none":
            raise ValueError(
                f"algorithm.position_weighting weighs the tokens of the student's own samples: it "
                f"applies to on_policy and gkd, not {algo.name} (set "
                "algorithm.position_weighting=none)"
            )
        if algo.offline and algo.label_weight > 0:
            raise ValueError(
                f"algorithm.label_weight applies to on_policy and gkd, not {algo.name} "
                "(step_by_step weighs its tasks with algorithm.rationale_weight)"
            )
        samples = self.trainer.prompts_per_step * self.samples_per_prompt
        per_step = self.learner.num_learners * self.learner.micro_batch_size
        per_step *= self.learner.grad_accum
        if samples != per_step:
            raise ValueError(
                f"trainer.prompts_per_step * {self._per_prompt_text} = {samples} samples per step "
                "must equal "
                f"learner.num_learners * learner.micro_batch_size * learner.grad_accum = {per_step}"
            )
        if algo.loss is not None and algo.offline:
            raise ValueError(
                f"algorithm.loss applies to on_policy and gkd; {algo.name} has its own loss "
                "(remove algorithm.loss)"
            )
        if algo.name == "feature_kd" and self.teacher.backend != "hf":
            raise ValueError(
                "algorithm.name=feature_kd needs teacher.backend=hf: only the transformers "
                "teacher returns hidden states"
            )
        if algo.name == "step_by_step" and not self.data.rationales:
            raise ValueError("algorithm.name=step_by_step needs data.rationales=true")
        if not self.models.teacher_list and algo.needs_teacher:
            raise ValueError(f"models.teacher: algorithm.name={algo.name} needs a teacher model")
        self._check_teachers()
        if self.data.train_dataset is not None and not (algo.offline or algo.name == "gkd"):
            raise ValueError(
                "data.train_dataset holds completions for the offline modes and gkd; "
                f"{algo.name} samples its own (use data.source for its prompts)"
            )
        full = self.teacher.support == "full"
        if self.teacher.backend != "hf" and self.algorithm.temperature != 1.0 and not full:
            raise ValueError(
                "algorithm.temperature != 1 needs teacher.backend=hf: vLLM scores prompts at "
                "temperature 1 and its top-k cannot be re-tempered exactly"
            )
        if self.algorithm.name == "gkd" and self.algorithm.resolved_loss == "on_policy_pg":
            raise ValueError(
                f"algorithm.loss: gkd takes {_either(TOPK_LOSSES)} (on_policy_pg needs "
                "student samples; use algorithm.name=on_policy)"
            )
        if self.algorithm.lmbda < 1.0 and self.algorithm.name != "gkd":
            raise ValueError("algorithm.lmbda < 1 (off-policy mixing) needs algorithm.name=gkd")
        self._check_reward()
        self._check_sync()
        if full:
            self._check_full_support()
        elif self.teacher.support != "teacher_topk":
            self._check_student_support()
        if self.algorithm.tail and self.algorithm.temperature != 1.0 and not full:
            raise ValueError("algorithm.tail=true needs algorithm.temperature=1")
        self._check_memory_levers()
        self._check_engine_parallel()
        self._check_rollout_in_learners()
        if (
            self.learner.optim.schedule == "linear"
            and self.trainer.max_steps <= self.learner.optim.warmup_steps
        ):
            raise ValueError(
                "learner.optim.schedule=linear needs trainer.max_steps > learner.optim.warmup_steps"
            )
        if self.rollout.max_new_tokens >= self.rollout.max_model_len:
            raise ValueError("rollout.max_new_tokens must be smaller than rollout.max_model_len")
        if self.trainer.max_staleness > 0 and algo.offline:
            raise ValueError(
                f"trainer.max_staleness > 0 overlaps rollouts with learner steps; {algo.name} "
                "trains on dataset completions and has none (set trainer.max_staleness=0)"
            )
        sampled = self.trainer.eval_sample_temperature
        if sampled is not None and not self.data.source.startswith("task:"):
            # Greedy accuracy is silently absent without a verifier; an asked-for one is not.
            raise ValueError(
                "trainer.eval_sample_temperature: sampled accuracy needs a task's answer "
                f"verifier (data.source: task:<name>), not {self.data.source!r}"
            )
        return self

    def _check_sync(self) -> None:
        if self.sync.method != "stream":
            return
        if self.rollout.backend != "vllm":
            raise ValueError(
                f"sync.method=stream needs rollout.backend=vllm (a {self.rollout.backend} engine "
                "cannot join a weight stream; use sync.method=blob or auto)"
            )
        if self.trainer.max_staleness > 0 and self.rollout.num_workers < 2:
            # An engine lost while the rollouts made ahead run cannot be given the weights it
            # served (the learners train past them); its calls go to another engine instead.
            raise ValueError(
                "sync.method=stream with trainer.max_staleness > 0 needs rollout.num_workers "
                ">= 2 (a lost engine's rollouts go to another until the next sync); use "
                "sync.method=blob or auto"
            )

    def _check_reward(self) -> None:
        algo = self.algorithm
        mixed = algo.reward_weight > 0 or algo.distill_weight != 1.0
        if mixed and algo.name not in ("on_policy", "gkd"):
            raise ValueError(
                "algorithm.reward_weight and algorithm.distill_weight weigh the student's own "
                f"samples: they need algorithm.name=on_policy or gkd, not {algo.name}"
            )
        if algo.reward_weight == 0 and algo.distill_weight == 0:
            raise ValueError(
                "algorithm.distill_weight=0 with algorithm.reward_weight=0 trains on nothing: "
                "set reward_weight > 0 (the reward alone) or distill_weight > 0"
            )

    def _check_teacher_list(self) -> None:
        # Here rather than on ModelsConfig: its errors would print the whole models section.
        listed = self.models.teachers
        if listed is None:
            return
        if self.models.teacher is not None:
            raise ValueError(
                "give models.teacher (one teacher) or models.teachers (several), not both"
            )
        if len(listed) < 2:
            raise ValueError(
                "models.teachers lists two or more teachers; for one, use models.teacher"
            )
        names = [t.name for t in listed]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"models.teachers: names must differ ({', '.join(twice)} repeated)")

    def _check_teachers(self) -> None:
        t = self.teacher
        # Here, not on TeacherConfig: a section's validator error would print the whole section.
        if t.backend == "server" and not t.urls:
            raise ValueError("teacher.backend=server needs teacher.urls (the servers' base URLs)")
        if t.backend != "server" and t.urls is not None:
            raise ValueError(
                f"teacher.urls applies to teacher.backend=server (got backend={t.backend})"
            )
        _check_served_teacher(t)
        if t.backend == "server" and self.models.teachers is not None:
            # teacher.urls serve one model; several served teachers would need URLs per teacher.
            raise ValueError(
                "teacher.backend=server serves one teacher: use models.teacher, not models.teachers"
            )
        self._check_self_teacher()
        if t.backend == "server" and t.support == "full":
            raise ValueError(
                "teacher.support=full runs the teacher inside the learners: it cannot be "
                "teacher.backend=server (use teacher_topk)"
            )
        if self.models.teachers is None:
            if t.combine == "route":
                raise ValueError("teacher.combine=route needs several teachers (models.teachers)")
            if t.route_field is not None:
                raise ValueError("teacher.route_field needs several teachers (models.teachers)")
            return
        if t.route_field is not None and t.combine != "route":
            raise ValueError("teacher.route_field applies to teacher.combine=route")
        if self.algorithm.name == "feature_kd":
            raise ValueError(
                "algorithm.name=feature_kd matches one teacher's hidden states: use "
                "models.teacher, not models.teachers"
            )

    def _check_self_teacher(self) -> None:
        t, algo = self.teacher, self.algorithm
        try:
            t.prompt_template.format(prompt="", privileged_context="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"teacher.prompt_template: {exc.__class__.__name__} {exc}: it may name only "
                "{prompt} and {privileged_context} (double other braces: {{ }})"
            ) from None
        if t.privileged_context != "none":
            for field in ("{prompt}", "{privileged_context}"):
                if field not in t.prompt_template:
                    raise ValueError(
                        f"teacher.prompt_template must contain {field} (teacher."
                        f"privileged_context={t.privileged_context}); got {t.prompt_template!r}"
                    )
            if algo.name not in ("on_policy", "gkd"):
                raise ValueError(
                    "teacher.privileged_context shows the teacher more than the student while it "
                    f"scores the student's samples: it needs algorithm.name=on_policy or gkd, "
                    f"not {algo.name}"
                )
            if self.models.teachers is not None:
                raise ValueError(
                    "teacher.privileged_context applies to one teacher (models.teacher), not "
                    "models.teachers"
                )
            if t.backend == "server":
                raise ValueError(
                    "teacher.privileged_context: a served teacher scores the student's own "
                    "prompts; use teacher.backend vllm or hf"
                )
        if t.privileged_context == "feedback" and algo.lmbda < 1.0:
            raise ValueError(
                "teacher.privileged_context=feedback shows the teacher a correct sample of the "
                "student's own: the dataset's completions (algorithm.lmbda < 1) have none; set "
                "lmbda=1 or another privileged_context"
            )
        if t.privileged_context == "feedback" and self.rollout.n < 2:
            raise ValueError(
                "teacher.privileged_context=feedback shows the teacher a correct sample of the "
                "same prompt: it needs rollout.n >= 2"
            )
        if not self.models.self_taught:
            if t.weights != "frozen":
                raise ValueError(
                    f"teacher.weights={t.weights} chooses which of the student's own weights "
                    "teach: it needs models.teacher: self"
                )
            return
        if algo.name not in ("on_policy", "gkd"):
            raise ValueError(
                "models.teacher: self scores the student's samples with its own weights: it "
                f"needs algorithm.name=on_policy or gkd, not {algo.name}"
            )
        if t.backend == "server":
            raise ValueError(
                "models.teacher: self is the student's own weights, in rayd's teacher actors or "
                "the learners: not teacher.backend=server"
            )

    def _check_student_support(self) -> None:
        support, algo = self.teacher.support, self.algorithm
        if self.teacher.backend != "hf":
            raise ValueError(
                f"teacher.support={support} needs teacher.backend=hf: vLLM's prompt log-probs "
                "cover only the teacher's own top-k, not the student's token ids"
            )
        if algo.name not in ("on_policy", "gkd") or algo.lmbda < 1.0:
            raise ValueError(
                f"teacher.support={support} takes the student's top-k from its rollouts: it "
                "needs algorithm.name=on_policy (or gkd with lmbda=1), where every completion "
                "is sampled by the student"
            )
        if algo.resolved_loss not in TOPK_LOSSES:
            raise ValueError(
                f"teacher.support={support} shapes the top-k losses only: set algorithm.loss "
                f"to {_either(TOPK_LOSSES)} (got {algo.resolved_loss})"
            )

    def _check_rollout_in_learners(self) -> None:
        if self.rollout.backend != "learner":
            return
        if self.trainer.max_staleness > 0:
            raise ValueError(
                "rollout.backend=learner samples inside the learners, between their steps: "
                "nothing overlaps, so set trainer.max_staleness=0 (or use rollout.backend=vllm)"
            )
        if self.learner.zero_stage == 3:
            raise ValueError(
                "rollout.backend=learner samples with each rank's whole weights, which "
                "learner.zero_stage=3 shards: use zero_stage 0-2 (or rollout.backend=vllm)"
            )
        if self.rollout.num_workers != 1:
            raise ValueError(
                "rollout.num_workers: with rollout.backend=learner the learner ranks sample "
                "(learner.num_learners of them); leave rollout.num_workers at 1"
            )

    def _check_engine_parallel(self) -> None:
        for name, section in (("rollout", self.rollout), ("teacher", self.teacher)):
            problem = section.parallel_problem(name, section.backend)
            if problem:
                raise ValueError(problem)

    def _check_memory_levers(self) -> None:
        ln = self.learner
        if ln.offload_optimizer and ln.zero_stage == 0:
            raise ValueError(
                "learner.offload_optimizer needs learner.zero_stage 1, 2 or 3 (DeepSpeed offloads "
                "the optimizer state that ZeRO partitions)"
            )
        if ln.offload_params and ln.zero_stage != 3:
            raise ValueError(
                f"learner.offload_params needs learner.zero_stage=3 (got {ln.zero_stage}): only "
                "ZeRO-3 partitions the parameters it would offload"
            )
        if ln.lora is not None and self.algorithm.name == "feature_kd":
            raise ValueError(
                "learner.lora: feature_kd trains projection layers beside the student, which "
                "LoRA would freeze; use full weights (remove learner.lora) or another mode"
            )

    def _check_full_support(self) -> None:
        algo = self.algorithm
        if algo.resolved_loss in TOPK_LOSSES and algo.resolved_loss not in FULL_VOCAB_LOSSES:
            raise ValueError(
                f"algorithm.loss={algo.resolved_loss} runs over the teacher's top-k bins only: "
                f"teacher.support=full takes {_either(FULL_VOCAB_LOSSES)} (or use another "
                "teacher.support)"
            )
        if algo.resolved_loss not in (*FULL_VOCAB_LOSSES, "logit_kd"):
            raise ValueError(
                "teacher.support=full takes the divergence over the whole vocabulary: it needs "
                "algorithm.loss forward_kl, reverse_kl or jsd (on_policy, gkd) or "
                f"algorithm.name=logit_kd (got {algo.name} with {algo.resolved_loss})"
            )
        if self.models.teachers is not None:
            raise ValueError(
                "teacher.support=full runs one teacher inside the learners: use models.teacher, "
                "not models.teachers"
            )
        if algo.step_weighting == "divergence":
            raise ValueError(
                "algorithm.step_weighting=divergence weighs steps by the teacher's log-probs "
                "before the learner step; with teacher.support=full those exist only inside "
                "the learners (use step_weighting uniform, or another teacher.support)"
            )

    @property
    def student_topk(self) -> int:
        """How many top ids the rollouts return per token: 0 unless the support needs them."""
        if self.teacher.support in ("teacher_topk", "full"):
            return 0
        return self.teacher.top_k

    @property
    def samples_per_prompt(self) -> int:
        if self.algorithm.name == "step_by_step":
            return 2  # the answer task and the rationale task
        if self.algorithm.offline:
            return 1
        return self.rollout.n + (1 if self.algorithm.label_weight > 0 else 0)

    @property
    def _per_prompt_text(self) -> str:
        if self.algorithm.name == "step_by_step":
            return "2 (step_by_step: answer + rationale task)"
        if self.algorithm.offline:
            return "1 (offline: one dataset completion)"
        if self.algorithm.label_weight > 0:
            return "(rollout.n + 1 label-task sample)"
        return "rollout.n"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))


def redact_url(url: str) -> str:
    """`url` with the password of its userinfo replaced by *** (http://user:***@host): for
    every line that names a URL someone may have written a password into."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    netloc, slash, path = rest.partition("/")
    if "@" not in netloc:
        return url
    user, _, host = netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return f"{scheme}{sep}{name}:***@{host}{slash}{path}"


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_served_teacher(t: TeacherConfig) -> None:
    """teacher.urls, api_key_env and ca_bundle. No line echoes a credential: a URL is shown
    redacted, an api_key_env that is not a variable name (the key itself?) not at all."""
    for url in t.urls or []:
        shown = redact_url(url)
        if not url.startswith(("http://", "https://")) or not url.split("://")[1].strip("/"):
            raise ValueError(f"teacher.urls: {shown!r} is not an http:// or https:// base URL")
        netloc = url.split("://", 1)[1].split("/", 1)[0]
        if "@" in netloc:
            raise ValueError(
                f"teacher.urls: {shown!r} has credentials in the URL, which would be printed "
                "and saved in config.yaml; give the key with teacher.api_key_env (the name of "
                "an environment variable) instead"
            )
        if any(c in url for c in "?#") or any(c.isspace() or ord(c) < 32 for c in url):
            raise ValueError(
                f"teacher.urls: {shown!r} is not a base URL (no query, fragment, spaces or "
                "control characters)"
            )
    served = {
        "served_model": t.served_model,
        "api_key_env": t.api_key_env,
        "ca_bundle": t.ca_bundle,
        "max_response_mb": t.max_response_mb,
    }
    for key, value in served.items():
        if value is not None and t.backend != "server":
            raise ValueError(f"teacher.{key} applies to teacher.backend=server")
    if t.api_key_env is not None and not _ENV_NAME.fullmatch(t.api_key_env):
        raise ValueError(
            "teacher.api_key_env names the environment variable that holds the API key "
            "(letters, digits and _, e.g. TEACHER_API_KEY), not the key itself"
        )
    if t.ca_bundle is not None and not Path(t.ca_bundle).is_file():
        why = "is a folder" if Path(t.ca_bundle).is_dir() else "does not exist"
        raise ValueError(f"teacher.ca_bundle: {t.ca_bundle!r} {why}; give a PEM file of CAs")


def format_validation_error(err: ValidationError, prefix: str = "config error: ") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = (
            ""
            if e["type"] in ("missing", "extra_forbidden") or not key
            else (f" (got {e.get('input')!r})")
        )
        lines.append(f"{prefix}{key + ': ' if key else ''}{msg}{got}")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config error: {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"config error: override {item!r} is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"config error: {key}: cannot parse value {raw!r}") from exc
        parsed.append((key.strip(), value))
    return parsed


def load_tree(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML file (optional) with dotted `key=value` overrides applied, as a plain tree."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            why = "is a folder, not a YAML file" if p.is_dir() else "does not exist"
            raise ConfigError(f"config error: config file {str(p)!r} {why}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" line {where.line + 1}" if where else ""
            raise ConfigError(f"config error: {p}{line}: not valid YAML") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config error: {p}: expected a mapping of sections at the top")
        tree = loaded or {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return tree


def validate(model: type[M], tree: dict[str, Any]) -> M:
    """`model` validated from `tree`, or one ConfigError line per problem."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + dotted overrides -> validated RunConfig, or one clear ConfigError."""
    return validate(RunConfig, load_tree(path, overrides))


def save_config(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
