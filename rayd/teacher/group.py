"""The driver's handle on the teachers: one actor pool per teacher (`start_teachers` builds
them from their `EngineSpec`s), and how several are combined into the one signal per sample the
learners take (`Teachers`); `LearnerTeacher` when the learners hold the teacher themselves.

One teacher (`models.teacher`): every call goes to its pool unchanged.
Several (`models.teachers`), by `teacher.combine`:
- ensemble: every pool scores every sample, side by side; each sample's signal is the mixture
  sum_i w_i p_i (rayd/mixture.py). With the transformers backend the driver then has every
  teacher score the union of their supports exactly (`score_ids`: a second forward pass per
  teacher), so nothing in the mixture is estimated; with vLLM only each teacher's own top-k is
  known and an id outside it gets that teacher's tail spread evenly (mixture.py says why).
- route: each sample is scored by one teacher, chosen by its prompt (`teacher.route_field`, or
  a hash of the prompt index with the weights as proportions); the groups are scored side by
  side, one `map_chunks` per pool, and put back in the samples' order.
The held-out eval uses the same combination for eval/reverse_kl and also reports each teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from rayd.cluster import WorkerPool, side_by_side
from rayd.config import TeacherConfig, TeacherSpec, TrainerConfig
from rayd.data.prompts import Prompt
from rayd.mixture import hash_route, mix_scores, union_support
from rayd.rollout.group import start_pool
from rayd.rollout.spec import EngineSpec
from rayd.teacher.scorer import TeacherSignalError
from rayd.teacher.worker import TeacherWorker
from rayd.types import Sample, TeacherScore, collate


@dataclass
class Scored:
    """The combined signal per pair, and what each teacher said on its own (for metrics)."""

    scores: list[TeacherScore]
    # Per teacher, in config order: the pairs it scored (positions) and its token log-probs there.
    own: list[tuple[list[int], list[torch.Tensor]]]

    @classmethod
    def concat(cls, parts: Sequence[Scored]) -> Scored:
        """The parts' pairs one after the other, as if scored in one call (positions shifted)."""
        scores: list[TeacherScore] = []
        own: list[tuple[list[int], list[torch.Tensor]]] = []
        for part in parts:
            if not own:
                own = [([], []) for _ in part.own]
            for (rows, logprobs), (part_rows, part_logprobs) in zip(own, part.own, strict=True):
                rows.extend(len(scores) + j for j in part_rows)
                logprobs.extend(part_logprobs)
            scores.extend(part.scores)
        return cls(scores, own)


class Teachers:
    """The teacher pools of a run and their combination; `faults` and `shutdown` cover all."""

    def __init__(
        self,
        pools: list[WorkerPool],
        names: list[str],
        weights: list[float],
        *,
        combine: str = "ensemble",
        backend: str = "hf",
        vocab_size: int = 0,
    ) -> None:
        if not (len(pools) == len(names) == len(weights)) or not pools:
            raise ValueError("one pool, one name and one weight per teacher")
        if len(pools) > 1 and vocab_size <= 0:
            raise ValueError("an ensemble needs the vocabulary size (its tail estimate)")
        self.pools, self.names, self.weights = pools, names, weights
        self.combine, self.backend, self.vocab_size = combine, backend, vocab_size

    @classmethod
    def single(cls, pool: WorkerPool) -> Teachers:
        return cls([pool], ["teacher"], [1.0])

    @property
    def several(self) -> bool:
        return len(self.pools) > 1

    @property
    def faults(self) -> int:
        return sum(pool.faults for pool in self.pools)

    def ready(self) -> None:
        """Waits until every pool's actors have loaded their models (they load in parallel)."""
        side_by_side([lambda pool=pool: pool.call_all("ready") for pool in self.pools])

    def shutdown(self) -> None:
        for pool in self.pools:
            pool.shutdown()

    def route(self, prompt: Prompt) -> int:
        """The teacher (index) of a prompt under teacher.combine=route."""
        if prompt.route is not None:
            return self.names.index(prompt.route)  # check_routes vetted the names
        return hash_route(prompt.index, self.weights)

    def score(
        self,
        method: str,
        pairs: list[Any],
        *inputs: list[Any],
        prompts: Sequence[Prompt] = (),
        mix_support: bool = True,
        **kwargs: Any,
    ) -> Scored:
        """`method` ("score" or "score_ids") of the teacher actors on `pairs` (with per-pair
        `inputs`, e.g. the ids to score), combined per teacher.combine. `prompts`: the prompt
        of each pair (routing); `mix_support=False` when only the sampled tokens' log-probs are
        wanted (the eval), which skips the ensemble's exact pass over the union support."""
        try:
            return self._score(method, pairs, inputs, prompts, mix_support, kwargs)
        except ray.exceptions.RayTaskError as exc:
            # A teacher that answered with no usable signal (a served teacher gone, missing
            # log-probs) is one line for the user, not the actor's traceback.
            if isinstance(exc.cause, TeacherSignalError):
                raise TeacherSignalError(f"teacher: {exc.cause}") from None
            raise

    def _score(
        self,
        method: str,
        pairs: list[Any],
        inputs: tuple[list[Any], ...],
        prompts: Sequence[Prompt],
        mix_support: bool,
        kwargs: dict[str, Any],
    ) -> Scored:
        if not self.several:
            got = self.pools[0].map_chunks(method, pairs, *inputs, **kwargs) if pairs else []
            return Scored(got, [(list(range(len(pairs))), [g.token_logprobs for g in got])])
        if self.combine == "route":
            if len(prompts) != len(pairs):
                raise ValueError(f"routing needs the prompt of each of the {len(pairs)} pairs")
            return self._routed(method, pairs, inputs, [self.route(p) for p in prompts], kwargs)
        return self._ensemble(method, pairs, inputs, mix_support, kwargs)

    def _routed(
        self,
        method: str,
        pairs: list[Any],
        inputs: tuple[list[Any], ...],
        routes: list[int],
        kwargs: dict[str, Any],
    ) -> Scored:
        groups = [[j for j, r in enumerate(routes) if r == i] for i in range(len(self.pools))]

        def call(i: int) -> list[TeacherScore]:
            rows = groups[i]
            if not rows:
                return []
            picked = [[items[j] for j in rows] for items in (pairs, *inputs)]
            return self.pools[i].map_chunks(method, *picked, **kwargs)

        got = side_by_side([lambda i=i: call(i) for i in range(len(self.pools))])
        scores: list[TeacherScore | None] = [None] * len(pairs)
        for rows, part in zip(groups, got, strict=True):
            for j, score in zip(rows, part, strict=True):
                scores[j] = score
        own = [
            (rows, [s.token_logprobs for s in part]) for rows, part in zip(groups, got, strict=True)
        ]
        return Scored(scores, own)  # type: ignore[arg-type]  # every row has its teacher

    def _ensemble(
        self,
        method: str,
        pairs: list[Any],
        inputs: tuple[list[Any], ...],
        mix_support: bool,
        kwargs: dict[str, Any],
    ) -> Scored:
        def everyone(method: str, *args: Any, **kw: Any) -> list[list[TeacherScore]]:
            return side_by_side(
                [lambda pool=pool: pool.map_chunks(method, *args, **kw) for pool in self.pools]
            )

        if not pairs:
            return Scored([], [([], []) for _ in self.pools])
        got = everyone(method, pairs, *inputs, **kwargs)
        own = [(list(range(len(pairs))), [s.token_logprobs for s in part]) for part in got]
        per_pair = list(zip(*got, strict=True))  # [pair][teacher]
        if _same_supports(per_pair):  # teacher.support=student_topk: exact, k ids as they are
            support = [scores[0].topk_ids for scores in per_pair]
        else:
            support = [union_support([s.topk_ids for s in scores]) for scores in per_pair]
            if mix_support and self.backend == "hf":
                # Every teacher's exact log-probs at every id of the union: nothing estimated.
                again = everyone("score_ids", pairs, support, add_top_k=0)
                per_pair = list(zip(*again, strict=True))
        mixed = [
            mix_scores(scores, self.weights, self.vocab_size, ids)
            for scores, ids in zip(per_pair, support, strict=True)
        ]
        return Scored(mixed, own)

    def metrics(self, samples: Sequence[Sample], scored: Scored, prefix: str) -> dict[str, float]:
        """Per teacher (several only): `<prefix><name>/reverse_kl`, the sampled-token estimate
        mean(behaviour_lp - teacher_lp) over the student's own samples it scored, and under
        routing `<prefix><name>/samples`, how many samples it scored."""
        if not self.several:
            return {}
        out: dict[str, float] = {}
        for name, (rows, logprobs) in zip(self.names, scored.own, strict=True):
            if self.combine == "route":
                out[f"{prefix}{name}/samples"] = float(len(rows))
            gap, tokens = 0.0, 0
            for j, lp in zip(rows, logprobs, strict=True):
                if samples[j].on_policy:  # dataset rows have no behaviour log-probs
                    gap += sum(samples[j].logprobs) - float(lp.sum())
                    tokens += len(samples[j].completion_ids)
            if tokens:
                out[f"{prefix}{name}/reverse_kl"] = gap / tokens
        return out


class LearnerTeacher:
    """The teacher inside the learners (teacher.support=full) where the driver needs the
    teacher itself: the held-out eval's log-probs of sampled tokens, from learner rank 0. No
    teacher actor starts, so a GPU cluster holds the teacher once per learner, not once more."""

    several = False
    faults = 0  # a learner that dies is the learner group's business (LearnerFailure)

    def __init__(self, learners: Any) -> None:
        self.learners = learners

    def ready(self) -> None:
        """The learners built the teacher in their constructors."""

    def shutdown(self) -> None:
        """The learner group owns the model and shuts it down."""

    def score(
        self,
        method: str,
        pairs: Sequence[tuple[list[int], list[int]]],
        *inputs: Any,
        prompts: Sequence[Prompt] = (),
        mix_support: bool = True,
        **kwargs: Any,
    ) -> Scored:
        """`Teachers.score("score", pairs)`'s token log-probs (the top-k fields are empty: the
        learners take the whole vocabulary themselves)."""
        if method != "score" or inputs:
            raise ValueError(f"the in-learner teacher serves 'score' only, not {method!r}")
        samples = [
            Sample(list(p), list(c), [0.0] * len(c), prompt_index=i)
            for i, (p, c) in enumerate(pairs)
        ]
        empty = [TeacherScore.empty(len(c)) for _, c in pairs]
        logprobs = self.learners.teacher_logprobs(collate(samples, empty, pad_id=0))
        scores = []
        for row, ((prompt, completion), score) in enumerate(zip(pairs, empty, strict=True)):
            start = len(prompt) - 1  # completion token j is predicted at column start + j
            own = logprobs[row, start : start + len(completion)].clone()
            scores.append(TeacherScore(own, score.topk_ids, score.topk_logprobs))
        return Scored(scores, [(list(range(len(scores))), [s.token_logprobs for s in scores])])

    def metrics(self, samples: Sequence[Sample], scored: Scored, prefix: str) -> dict[str, float]:
        return {}


def _same_supports(per_pair: Sequence[Sequence[TeacherScore]]) -> bool:
    """Whether every teacher scored the same ids at every position (teacher.support=
    student_topk): then the mixture is exact as it stands."""
    for scores in per_pair:
        first = scores[0].topk_ids.sort(-1).values
        if any(not torch.equal(first, s.topk_ids.sort(-1).values) for s in scores[1:]):
            return False
    return True


def start_teachers(
    specs: Sequence[EngineSpec],
    teachers: Sequence[TeacherSpec],
    section: TeacherConfig,
    trainer: TrainerConfig,
    *,
    vocab_size: int,
) -> Teachers | None:
    """One pool of `teacher.num_workers` actors per teacher (`specs`: their `EngineSpec`s;
    `teachers`: their names and weights, config order), combined per teacher.combine; None
    when there is none. Not yet waited for (`ready()`); on a failed start the pools already
    started are shut down."""
    pools: list[WorkerPool] = []
    several = len(specs) > 1
    try:
        for spec, teacher in zip(specs, teachers, strict=True):
            name = f"teacher[{teacher.name}]" if several else "teacher"
            pools.append(
                start_pool(TeacherWorker, [spec] * section.num_workers, section, trainer, name)
            )
        if not pools:
            return None
        return Teachers(
            pools,
            [t.name for t in teachers],
            [t.weight for t in teachers],
            combine=section.combine,
            backend=section.backend,
            vocab_size=vocab_size,
        )
    except BaseException:
        for pool in pools:
            pool.shutdown()
        raise
