"""One learner rank: a DeepSpeed engine (ZeRO stage 0-3) around a Hugging Face causal LM.

The process must already be in a torch.distributed group (`LearnerWorker` does that). Every
method here is collective: all ranks call it together, or the group hangs in a collective.

Loss normalisation. `train_step` makes the update equal the gradient of
    (sum of the per-token loss over the GLOBAL batch) / global_tokens,
whatever the number of ranks and micro-batches. DeepSpeed divides each micro-batch loss by
`gradient_accumulation_steps` in `backward` and averages gradients over the data-parallel ranks,
so each micro-batch passes `sum(per_token_loss) * grad_accum * world_size / global_tokens`.
A token-mean per micro-batch instead would over-weight short completions and change with the split.

Non-finite losses. A NaN/inf loss on any micro-batch of any rank skips the whole step on every
rank: weights, optimizer moments, LR schedule and DeepSpeed's counters stay as they were. Once a
micro-batch has gone through `backward`, ZeRO-2/3 have already reduced its gradient into their
private buffers and there is no public way to take it back. So every micro-batch's loss is known
to be finite on all ranks before the first `backward`: the first micro-batch is forwarded with
its graph kept, the others are forwarded once without grad, and one all-reduce decides. That
costs (grad_accum - 1) no-grad forwards per step, nothing when grad_accum == 1.
A finite loss with non-finite gradients is skipped too: ZeRO 1-3 and the fp16/bf16 optimizers
do it inside `step()`; for fp32 stage 0 (torch's AdamW, no check) the learner does it.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from rayd import device as devices

# DeepSpeed picks its accelerator when first imported; rayd.device decides which one it is.
os.environ.setdefault("DS_ACCELERATOR", devices.detect().ds_accelerator)

import deepspeed
from transformers import AutoModelForCausalLM

from rayd.checkpoint import safe_torch_load
from rayd.learner.lora import adapter_state, lora_model, merge_one, merge_plan, merged_state
from rayd.learner.spec import LearnerSpec
from rayd.losses import LossSpec, batch_loss, token_logprobs
from rayd.types import TrainBatch
from rayd.weight_sync import deserialize_state_dict, load_whole_state_dict, serialize_state_dict

LRSchedule = Literal["constant", "linear"]
_CLIENT_KEY = "rayd_client_state"
EMA_TEACHER = "teacher_ema.safetensors"  # beside the shards: the self-teacher's EMA (rank 0's)
# feature_kd's learned projections live on the model as this submodule, so DeepSpeed trains,
# partitions and checkpoints them with the student; they are never part of the exported student.
FEATURE_PROJ = "rayd_feature_proj"


class WarmupSchedule:
    """LR scheduler: linear warmup over `warmup_steps` optimizer steps, then constant or linear
    decay to 0 at `total_steps`. DeepSpeed steps it after every applied optimizer step.

    Step s (0-based) runs at lr * (s + 1) / warmup_steps during warmup, so the first step
    already moves the weights. DeepSpeed's WarmupLR/WarmupDecayLR were measured unfit (0.19.8):
    they reject warmup_num_steps=0, raise any warmup to at least 2 steps, and run the first two
    optimizer steps at warmup_min_lr. torch's LambdaLR would checkpoint its base_lrs, so a
    resumed run would silently keep the old lr; here only the step count is saved and the
    config in force decides the rest.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        warmup_steps: int,
        total_steps: int,
        schedule: LRSchedule,
    ) -> None:
        if schedule not in ("constant", "linear"):
            raise ValueError(f"lr schedule must be 'constant' or 'linear', got {schedule!r}")
        if schedule == "linear" and total_steps <= warmup_steps:
            raise ValueError(
                f"linear lr decay needs total_steps ({total_steps}) > warmup_steps ({warmup_steps})"
            )
        self.optimizer = optimizer
        self.base_lr = lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.schedule = schedule
        self.steps_done = 0
        self.apply()

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        return max(0.0, (self.total_steps - step) / (self.total_steps - self.warmup_steps))

    def get_lr(self) -> list[float]:
        return [self.base_lr * self.factor(self.steps_done)] * len(self.optimizer.param_groups)

    def get_last_lr(self) -> list[float]:
        return self.get_lr()

    def apply(self) -> None:
        """Write the rate for the next step into the optimizer."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr

    def step(self, *_: Any, **__: Any) -> None:
        self.steps_done += 1
        self.apply()

    def state_dict(self) -> dict[str, int]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps_done = state["steps_done"]
        self.apply()


def deepspeed_config(spec: LearnerSpec, *, world_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config dict of `spec` (learner.optim whole); `spec.ds_overrides` are merged
    in last, key by key (nested dicts too)."""
    optim = spec.optim
    if spec.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {spec.zero_stage}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.micro_batch_size * spec.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,  # 0 disables
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # torch.optim.AdamW: DeepSpeed's own Adam kernels need a C++/CUDA build that a
                # CPU machine (and a GPU image without nvcc) does not have.
                "torch_adam": True,
            },
        },
        "zero_optimization": zero_section(spec),
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**31 - 1,  # rayd logs its own metrics
        "wall_clock_breakdown": False,
    }
    return _merge(config, spec.ds_overrides or {})


def zero_section(spec: LearnerSpec) -> dict[str, Any]:
    """ZeRO's stage and where it keeps what it partitions (learner.offload_*)."""
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    # Pinned host memory speeds the copies to and from a GPU; a CPU run has nothing to pin.
    pin = devices.detect().kind == "cuda"
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if spec.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return zero


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def feature_projections(model: torch.nn.Module, spec: LossSpec) -> torch.nn.ModuleList:
    """One linear map per (student, teacher) layer pair, student width -> teacher width.

    Equal widths start at the identity, so the feature term first measures the raw gap (as
    when a student is cut from the teacher's own layers); otherwise torch's default init.
    """
    width = int(model.config.hidden_size)
    dtype = next(model.parameters()).dtype
    layers = []
    for _ in spec.feature_pairs:
        layer = torch.nn.Linear(width, spec.teacher_hidden_size, dtype=dtype)
        if width == spec.teacher_hidden_size:
            with torch.no_grad():
                layer.weight.copy_(torch.eye(width, dtype=dtype))
                layer.bias.zero_()
        layers.append(layer)
    return torch.nn.ModuleList(layers)


class DeepSpeedLearner:
    """The student model of one rank, its DeepSpeed engine and the distillation loss."""

    def __init__(self, spec: LearnerSpec) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedLearner needs torch.distributed initialised first")
        self.device = devices.detect()
        self.torch_device = self.device.torch_device(0)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.zero_stage = spec.zero_stage
        self.micro_batch_size = spec.micro_batch_size
        self.grad_accum = spec.grad_accum
        self.loss_spec = loss = spec.loss
        self.dtype = devices.resolve_dtype(spec.dtype, self.device)
        torch.manual_seed(spec.seed)  # weights come from the checkpoint; this seeds dropout, if any

        self.config = deepspeed_config(spec, world_size=self.world_size, dtype=self.dtype)
        # Every rank loads the full checkpoint, then deepspeed.initialize partitions it (ZeRO-3).
        # Partitioned loading (zero.Init) would need transformers' HfDeepSpeedConfig, which
        # needs `accelerate`; not worth it for students that fit in host memory per rank.
        model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=self.dtype)
        if spec.gradient_checkpointing:
            # Non-reentrant: recomputes correctly when the inputs need no grad (a LoRA
            # student's embeddings are frozen), which the reentrant kind silently does not.
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.lora = spec.lora
        if spec.lora is not None:
            model = lora_model(model, spec.lora)
        if loss.kind == "feature_kd":
            model.add_module(FEATURE_PROJ, feature_projections(model, loss))
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.config,
            # DeepSpeed calls this with its torch optimizer, whose param_groups ZeRO steps.
            lr_scheduler=lambda opt: WarmupSchedule(
                opt, spec.optim.lr, spec.optim.warmup_steps, spec.total_steps, spec.optim.schedule
            ),
        )
        self.schedule: WarmupSchedule = self.engine.lr_scheduler
        # DeepSpeed 0.19's torch checkpoint engine unpickles (weights_only=False): a run folder
        # from someone else could run code on resume. Its loads go through rayd's instead.
        self.engine.checkpoint_engine.load = safe_torch_load
        self.engine.train()
        # teacher.support=full: a frozen copy of the teacher in this process, so the loss can
        # take the whole vocabulary without [tokens, V] logits crossing the wire. models.teacher:
        # self: the student's own weights teach; frozen (the copy is the initial student), live
        # (the model being trained, no copy) or ema (the copy follows the student,
        # `_update_ema`, after every applied step; teacher actors get it: publish_teacher_blob).
        self.self_teacher, self.ema_rate = spec.self_teacher, spec.ema_rate
        self.teacher: torch.nn.Module | None = None
        if spec.teacher_path is not None:
            teacher = AutoModelForCausalLM.from_pretrained(
                spec.teacher_path, dtype=devices.resolve_dtype(spec.teacher_dtype, self.device)
            )
            self.teacher = teacher.to(self.torch_device).eval().requires_grad_(False)
        elif loss.full_vocab and spec.self_teacher != "live":
            raise ValueError("a full-vocabulary loss needs the teacher in the learner")
        # Full-vocabulary losses need logits only at the loss positions: the output layer on
        # those rows alone skips prompt and padding columns and the [B, L, V] tensors around
        # them. Used where this model's logits are exactly its output layer on its last
        # hidden state (a probe checks: no soft-capping or scaling after it).
        self.rows_only = loss.full_vocab and self.teacher is not None and self._rows_match_logits()
        if loss.full_vocab and self.teacher is not None and not self.rows_only and self.rank == 0:
            print(
                "rayd learner: a model's logits are not its output layer on its last hidden "
                "state (probe); the full-vocabulary loss takes logits at every position",
                file=sys.stderr,
            )

    # ---------------------------------------------------------------------------------------
    # Training

    def train_step(self, shard: TrainBatch, global_tokens: int) -> dict[str, float]:
        """One optimizer step on this rank's shard (micro_batch_size * grad_accum rows)."""
        expected = self.micro_batch_size * self.grad_accum
        if len(shard) != expected:
            raise ValueError(
                f"rank {self.rank} got {len(shard)} rows; micro_batch_size "
                f"{self.micro_batch_size} x grad_accum {self.grad_accum} needs {expected}"
            )
        micro_batches = [self._to_device(mb) for mb in shard.split(self.grad_accum)]
        # See the module doc: undo DeepSpeed's 1/grad_accum and data-parallel mean.
        scale = self.grad_accum * self.world_size / max(global_tokens, 1)
        lr = float(self.engine.get_lr()[0])  # the rate this step will use

        # Phase 1: every micro-batch's loss, finite on all ranks? (before any backward) The
        # step's metric sums are known now too: one all-reduce carries both.
        first_loss, first_sums = self._loss(micro_batches[0])
        sums = [first_sums]
        for mb in micro_batches[1:]:
            with torch.no_grad():
                sums.append(self._loss(mb)[1])
        local_bad = any(not math.isfinite(s["loss"].item()) for s in sums)
        any_bad, totals = self._all_reduce_sums(sums, local_bad)
        if any_bad:
            del first_loss  # frees the graph: no backward, no step, counters untouched
            return self._metrics(totals, global_tokens, lr, grad_norm=float("nan"), skipped=True)

        # Phase 2: backward + step per micro-batch; DeepSpeed steps on the last one.
        plain = self._plain_torch_optimizer
        own_norm = math.nan
        for i, mb in enumerate(micro_batches):
            loss = first_loss if i == 0 else self._loss(mb)[0]
            self.engine.backward(loss * scale)
            if plain and i == len(micro_batches) - 1:
                own_norm = self._plain_grad_norm()
                if not math.isfinite(own_norm):
                    # Finite loss, non-finite gradient: ZeRO and the fp16/bf16 optimizers skip
                    # such a step inside step(); torch's AdamW would apply it. Drop it here and
                    # count the micro-step that step() would have counted, so the next window's
                    # boundary stays in place. (step() with all .grad None is no way out:
                    # DeepSpeed's clip_grad_norm_ then fails with an IndexError.)
                    self.engine.zero_grad()
                    self.engine.micro_steps += 1
                    break
            self.engine.step()
        if plain:
            grad_norm, skipped = own_norm, not math.isfinite(own_norm)
        else:
            norm = self.engine.get_global_grad_norm()
            grad_norm = math.nan if norm is None else float(norm)
            skipped = not self.engine.was_step_applied()  # ZeRO saw non-finite gradients
        if self.self_teacher == "ema" and not skipped:
            self._update_ema()
        return self._metrics(totals, global_tokens, lr, grad_norm=grad_norm, skipped=skipped)

    def _loss(self, mb: TrainBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """(sum of the per-token loss, detached sums of loss and metrics) for one micro-batch."""
        pairs = self.loss_spec.feature_pairs if self.loss_spec.kind == "feature_kd" else ()
        teacher_logits = None
        if self.rows_only:
            # [N, V] each
            student_logits, teacher_logits = self._loss_rows(
                mb.input_ids, mb.attention_mask, mb.loss_mask, _teacher_view(mb)
            )
        else:
            out = self.engine(
                input_ids=mb.input_ids,
                attention_mask=mb.attention_mask,
                use_cache=False,
                output_hidden_states=bool(pairs),
            )
            student_logits = out.logits[:, :-1]
            if self.loss_spec.full_vocab:
                view = _teacher_view(mb)
                if view is None:
                    teacher_logits = self._teacher_logits(mb.input_ids, mb.attention_mask)
                else:  # its own prompts: both sides as [N, V] rows at the loss positions
                    ids, attention, at = view
                    teacher_logits = self._teacher_logits(ids, attention)[at]
                    student_logits = student_logits[mb.loss_mask]
        per_token, metrics = batch_loss(
            student_logits,
            mb,
            self.loss_spec,
            # Position j's state predicts token j + 1: aligned with the logits' target columns.
            student_hidden=[out.hidden_states[s][:, :-1] for s, _ in pairs] if pairs else None,
            projections=getattr(self.engine.module, FEATURE_PROJ, None),
            teacher_logits=teacher_logits,
        )
        total = per_token.sum()
        sums = {"loss": total.detach().float()}
        for name, value in metrics.items():
            sums[name] = value.detach().float().sum()
        return total, sums

    def _all_reduce_sums(
        self, sums: list[dict[str, Tensor]], bad: bool
    ) -> tuple[bool, dict[str, float]]:
        """(whether any rank saw a non-finite loss, each metric summed over micro-batches and
        ranks): the finite-loss vote rides in the metrics' all-reduce, one collective fewer
        a step."""
        names = sorted(sums[0])
        flag = torch.tensor(1.0 if bad else 0.0, device=self.torch_device)
        local = torch.stack([flag] + [torch.stack([s[n] for s in sums]).sum() for n in names])
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        flags, *values = local.tolist()
        return flags > 0, dict(zip(names, values, strict=True))

    @property
    def _plain_torch_optimizer(self) -> bool:
        # Mirrors DeepSpeed's _take_model_step: only fp32 stage 0 steps torch's AdamW directly,
        # and then the engine keeps no gradient norm (get_global_grad_norm() stays None).
        engine = self.engine
        return not (
            engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled()
        )

    def _plain_grad_norm(self) -> float:
        """Global gradient norm from the all-reduced .grad, between the last backward and step."""
        grads = [
            p.grad.float().norm() for p in self.engine.module.parameters() if p.grad is not None
        ]
        return float(torch.stack(grads).norm()) if grads else 0.0

    @staticmethod
    def _metrics(
        totals: dict[str, float],
        global_tokens: int,
        lr: float,
        grad_norm: float,
        skipped: bool,
    ) -> dict[str, float]:
        denom = max(global_tokens, 1)
        out = {name: value / denom for name, value in totals.items()}
        out.update(
            grad_norm=grad_norm,
            lr=lr,
            num_tokens=float(global_tokens),
            skipped=1.0 if skipped else 0.0,
        )
        return out

    # ---------------------------------------------------------------------------------------
    # Evaluation and weights

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch) -> Tensor:
        """Teacher-forced log p(input_ids[:, j+1] | prefix) -> [B, L-1] float32 on CPU.

        0 where the target is padding. Collective under ZeRO-3 (the forward gathers weights).
        """
        batch = self._to_device(batch)
        self.engine.eval()
        try:
            out = self.engine(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            )
        finally:
            self.engine.train()
        logp = out.logits[:, :-1].float().log_softmax(-1)
        picked = logp.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return torch.where(batch.attention_mask[:, 1:].bool(), picked, 0.0).cpu()

    def teacher_logprobs(self, batch: TrainBatch) -> Tensor:
        """The in-learner teacher's log p(input_ids[:, j+1] | prefix) -> [B, L-1] float32 on
        CPU, 0 where the target is padding (teacher.support=full; no collective)."""
        batch = self._to_device(batch)
        logits = self._teacher_logits(batch.input_ids, batch.attention_mask)
        picked = token_logprobs(logits, batch.input_ids[:, 1:])
        return torch.where(batch.attention_mask[:, 1:].bool(), picked, 0.0).float().cpu()

    def _loss_rows(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        loss_mask: Tensor,
        teacher_view: tuple[Tensor, Tensor, tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Student and teacher logits [N, V] at the N positions of loss_mask [B, L-1]
        (row-major, as batch_loss takes them), each output layer run on those rows only.
        `teacher_view`: the teacher's own input ids and mask and where those positions are in
        it (`_teacher_view`); None: it reads the student's."""
        out = self.engine(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,  # the engine's own output layer: one column, not L
        )
        hidden = out.hidden_states[-1][:, :-1][loss_mask]
        student = self.engine.module.get_output_embeddings()(hidden)
        assert self.teacher is not None
        ids, attention, at = teacher_view or (input_ids, attention_mask, loss_mask)
        with torch.no_grad():
            teacher_hidden = self.teacher.base_model(
                input_ids=ids, attention_mask=attention, use_cache=False
            ).last_hidden_state
            teacher = self.teacher.get_output_embeddings()(teacher_hidden[:, :-1][at])
        return student, teacher

    @torch.no_grad()
    def _rows_match_logits(self) -> bool:
        """Whether `_loss_rows` gives the models' own logits, on a short probe sequence.

        Collective under ZeRO-3 (the student's forward gathers weights): every rank calls it.
        """
        assert self.teacher is not None
        vocab = min(self.engine.module.config.vocab_size, self.teacher.config.vocab_size)
        ids = (torch.arange(1, 9, device=self.torch_device) % vocab).unsqueeze(0)
        attention = torch.ones_like(ids)
        mask = torch.ones(1, ids.shape[1] - 1, dtype=torch.bool, device=self.torch_device)
        self.engine.eval()  # dropout would make the two forwards differ
        try:
            rows = self._loss_rows(ids, attention, mask)
            student = self.engine(input_ids=ids, attention_mask=attention).logits
            teacher = self._teacher_logits(ids, attention)
        except TypeError:  # a model whose forward takes no logits_to_keep
            return False
        finally:
            self.engine.train()
        return all(
            _close(got, want[mask])
            for got, want in zip(rows, (student[:, :-1], teacher), strict=True)
        )

    @torch.no_grad()
    def _teacher_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The in-learner teacher's logits [B, L-1, V], aligned with the batch's targets. A live
        self-teacher is the model being trained, in eval mode (no dropout) and without grad;
        under ZeRO-3 its forward gathers weights: every rank must call."""
        if self.self_teacher == "live":
            module = self.engine.module
            training = module.training
            module.eval()
            try:
                out = module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            finally:
                module.train(training)
            return out.logits[:, :-1]
        if self.teacher is None:
            raise RuntimeError("this learner holds no teacher (teacher.support is not full)")
        out = self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits[:, :-1]

    # ---------------------------------------------------------------------------------------
    # A teacher of the student's own weights (models.teacher: self)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """theta_T <- (1 - ema_rate) theta_T + ema_rate theta_S, over every weight (a LoRA
        student's merged ones), on every rank; under ZeRO-3 each rank gathers the student's
        weights for it (the step's one extra gather)."""
        assert self.teacher is not None
        ema_update(self.teacher, self._state_on_every_rank(), self.ema_rate)

    def _state_on_every_rank(self) -> dict[str, Tensor]:
        """The student's weights, whole, on every rank (HF names; a LoRA student's merged)."""
        module = self.engine.module
        out: dict[str, Tensor] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            if name.startswith(FEATURE_PROJ + "."):
                continue
            if self.zero_stage == 3 and hasattr(tensor, "ds_id"):
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    out[name] = tensor.detach().clone()
            else:
                out[name] = tensor.detach()
        return merged_state(out, self.lora) if self.lora is not None else out

    def teacher_blob(self) -> bytes | None:
        """The self-teacher's weights as safetensors bytes on rank 0 (None elsewhere; all ranks
        call): the EMA copy, or the live weights, for teacher actors to load."""
        if self.self_teacher == "live":
            return self.state_dict_blob()
        if self.self_teacher != "ema" or self.teacher is None:
            raise RuntimeError("only a live or EMA self-teacher has weights to publish")
        return serialize_state_dict(self.teacher.state_dict()) if self.rank == 0 else None

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The model's full weights on CPU on rank 0 (None elsewhere); HF state_dict keys
        (a LoRA student's adapters merged into its weights)."""
        state = self._gathered_state(lambda name: not name.startswith(FEATURE_PROJ + "."))
        if state is not None and self.lora is not None:
            return merged_state(state, self.lora)
        return state

    def adapter_state_dict(self) -> dict[str, Tensor] | None:
        """A LoRA student's adapters on rank 0 (None elsewhere), keyed as peft saves them."""
        if self.lora is None:
            raise ValueError("this learner trains full weights (learner.lora is not set)")
        state = self._gathered_state(lambda name: ".lora_" in name)
        return adapter_state(state) if state is not None else None

    def _gathered_state(self, keep: Callable[[str], bool]) -> dict[str, Tensor] | None:
        """The module's state dict entries whose names `keep`, whole, on CPU on rank 0.

        Under ZeRO-3 each rank holds a slice of every parameter, so every rank joins one
        GatheredParameters per parameter; gathering one at a time keeps the peak at one full
        parameter beyond the shards, instead of the whole model on every rank.
        """
        module = self.engine.module
        out: dict[str, Tensor] = {}
        copies: dict[int, Tensor] = {}  # tied weights share one copy, so the blob stores one
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not keep(name):  # e.g. feature_kd's projections: a training aid, not the student
                continue
            if id(tensor) in copies:
                if self.rank == 0:
                    out[name] = copies[id(tensor)]
                continue
            partitioned = self.zero_stage == 3 and hasattr(tensor, "ds_id")
            if partitioned:
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                    copy = tensor.detach().to("cpu", copy=True) if self.rank == 0 else None
            elif self.rank == 0:
                copy = tensor.detach().to("cpu", copy=True)
            else:
                copy = None
            if copy is not None:
                copies[id(tensor)] = out[name] = copy
        return out if self.rank == 0 else None

    def _stream_plan(self) -> list[tuple[str, list[Tensor]]]:
        """What a weight stream sends, in order: (engine name, the module tensors it is made
        of). The student's weights as `full_state_dict` has them (tied weights once, a LoRA
        student's merged, no feature_kd projections), without gathering anything."""
        state = {
            name: tensor
            for name, tensor in self.engine.module.state_dict(keep_vars=True).items()
            if not name.startswith(FEATURE_PROJ + ".")
        }
        seen: set[int] = set()
        plan: list[tuple[str, list[Tensor]]] = []
        entries = merge_plan(list(state)) if self.lora is not None else [(k, [k]) for k in state]
        for name, keys in entries:
            if id(state[keys[0]]) in seen:  # a tied weight: the engine re-ties it on load
                continue
            seen.add(id(state[keys[0]]))
            plan.append((name, [state[k] for k in keys]))
        return plan

    def weight_metadata(self) -> tuple[list[str], list[str], list[list[int]]]:
        """Names, dtypes and shapes of what `streamed_weights` yields (no gather: ZeRO-3's
        partitioned parameters know their full shape)."""
        names, dtypes, shapes = [], [], []
        for name, sources in self._stream_plan():
            first = sources[0]
            shape = first.ds_shape if hasattr(first, "ds_id") else first.shape
            names.append(name)
            dtypes.append(str(first.dtype).removeprefix("torch."))
            shapes.append([int(d) for d in shape])
        return names, dtypes, shapes

    def streamed_weights(self) -> Iterator[Tensor]:
        """The tensors of `weight_metadata`, whole, one at a time, on every rank (all ranks
        must consume it: under ZeRO-3 each tensor is one gather); rank 0 sends them. At most
        one gathered or merged tensor exists at a time beyond the shards."""
        for _, sources in self._stream_plan():
            partitioned = [t for t in sources if self.zero_stage == 3 and hasattr(t, "ds_id")]
            with deepspeed.zero.GatheredParameters(
                partitioned, modifier_rank=None, enabled=bool(partitioned)
            ):
                if len(sources) == 3:
                    assert self.lora is not None
                    yield merge_one(*(t.detach() for t in sources), self.lora)
                else:
                    yield sources[0].detach()

    def state_dict_blob(self) -> bytes | None:
        """Full weights as safetensors bytes on rank 0, None on the others (all must call)."""
        state = self.full_state_dict()
        return serialize_state_dict(state) if state is not None else None

    # ---------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        # Under one key: DeepSpeed hands back its own entries (ds_config, ds_version, ...) mixed
        # into the client state it returns on load.
        self.engine.save_checkpoint(directory, tag=tag, client_state={_CLIENT_KEY: client_state})
        # Each rank's own RNG streams (dropout, sampling in a loss): DeepSpeed keeps rank 0's
        # client state only, so every rank writes its file beside the shards.
        torch.save(rng_state(), self._rng_path(directory, tag))
        if self.self_teacher == "ema" and self.rank == 0:  # the same on every rank
            assert self.teacher is not None
            blob = serialize_state_dict(self.teacher.state_dict())
            with open(os.path.join(directory, tag, EMA_TEACHER), "wb") as fh:
                fh.write(blob)

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        """Weights, optimizer, LR schedule and client_state; raises when nothing loads.

        DeepSpeed's load_checkpoint returns (None, None) with only a warning when nothing is
        found (training on from scratch then looks like a resume), and a missing explicit tag
        fails deep inside (stage 0: a bare AssertionError in state_dict_factory): check first.
        """
        if not os.path.isdir(os.path.join(directory, tag)):
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
            raise FileNotFoundError(
                f"no DeepSpeed checkpoint {tag!r} under {directory} (found: {found or 'nothing'})"
            )
        path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {directory}")
        # ZeRO restores its optimizer's param_groups (old lr included) after the scheduler.
        self.schedule.apply()
        rng_file = self._rng_path(directory, tag)
        if os.path.isfile(rng_file):  # checkpoints written before rayd saved it have none
            set_rng_state(safe_torch_load(rng_file))
        if self.self_teacher == "ema":
            self._load_ema(os.path.join(directory, tag, EMA_TEACHER))
        return (client_state or {}).get(_CLIENT_KEY, {})

    def _load_ema(self, path: str) -> None:
        assert self.teacher is not None
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: the checkpoint holds no EMA teacher (saved by a run whose teacher was "
                "not the student's EMA); resume it with teacher.weights as it was saved"
            )
        with open(path, "rb") as fh:
            misfit = load_whole_state_dict(self.teacher, deserialize_state_dict(fh.read()))
        if misfit:
            raise RuntimeError(f"{path} does not fit the teacher: {misfit}")

    def _rng_path(self, directory: str, tag: str) -> str:
        os.makedirs(os.path.join(directory, tag), exist_ok=True)
        return os.path.join(directory, tag, f"rng_rank{self.rank}.pt")

    # ---------------------------------------------------------------------------------------

    def _to_device(self, batch: TrainBatch) -> TrainBatch:
        if self.torch_device.type == "cpu":
            return batch
        return TrainBatch(
            **{
                name: value.to(self.torch_device, non_blocking=True)
                for name, value in vars(batch).items()
            }
        )


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: dict[str, Tensor], rate: float) -> None:
    """theta_T <- (1 - rate) theta_T + rate theta_S for every weight of `teacher` named in
    `student` (a state dict with the same names), in place; a tied weight once."""
    done: set[int] = set()
    for name, tensor in teacher.state_dict().items():
        if tensor.data_ptr() in done or name not in student:
            continue
        done.add(tensor.data_ptr())
        tensor.lerp_(student[name].to(tensor.device, tensor.dtype), rate)


def _teacher_view(mb: TrainBatch) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]] | None:
    """The teacher's own input when it is shown privileged context (TrainBatch.teacher_*):
    (ids, mask, the index of the loss positions in its target columns, row-major like the
    student's loss_mask), or None when it reads the student's."""
    if mb.teacher_offset.numel() == 0:
        return None
    rows, columns = mb.loss_mask.nonzero(as_tuple=True)
    at = (rows, columns + mb.teacher_offset[rows])
    return mb.teacher_input_ids, mb.teacher_attention_mask, at


def _close(got: Tensor, want: Tensor) -> bool:
    """Equal up to matmul rounding: the same output layer over a different number of rows
    may block its sums differently. A soft-cap or logit scale after it is far outside this."""
    tolerance = 1e-4 if want.dtype in (torch.float32, torch.float64) else 2e-2
    got, want = got.float(), want.float()
    return got.shape == want.shape and bool(
        ((got - want).abs() <= tolerance * (1.0 + want.abs())).all()
    )


def rng_state() -> dict[str, Any]:
    """The random streams a learner process draws from: Python's, torch's CPU and CUDA ones."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
