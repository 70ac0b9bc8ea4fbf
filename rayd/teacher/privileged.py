"""What the teacher is shown besides the student's prompt (teacher.privileged_context): each
sample's teacher prompt, set by the driver as the sample arrives, before the teacher scores it.

- completion, rationale, answer (SDFT's demonstration, a task's gold rationale or answer): the
  row's own teacher prompt, written once when the data is loaded (`Prompt.teacher_ids`);
- feedback (SDPO's successful sibling): a correct sample of the same prompt from the same step,
  other than the sample itself, as the task's verifier judges it; a sample whose prompt has none
  gets no teacher signal (`Sample.unscored`), as in TRL's SDPO, and neither does one whose
  teacher prompt would not fit the teacher's window.

The rows of one prompt arrive together: a rollout worker samples all `rollout.n` of a prompt in
one call, so the siblings are in the sample's own chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rayd.config import TeacherConfig
from rayd.data.prompts import Prompt, encode_prompt
from rayd.tasks.base import Task
from rayd.types import Sample


class PrivilegedContext:
    """Sets the teacher prompt of every sample the teacher scores (`attach`)."""

    def __init__(
        self,
        kind: str,
        template: str,
        prompts: Sequence[Prompt],
        task: Task | None,
        tokenizer: Any,
        *,
        chat_template: bool,
        max_len: int,
    ) -> None:
        if kind == "none":
            raise ValueError("no privileged context to attach (teacher.privileged_context=none)")
        self.kind, self.template, self.prompts = kind, template, prompts
        self.task = task or Task.default()
        self.tokenizer, self.chat_template, self.max_len = tokenizer, chat_template, max_len

    @classmethod
    def of(
        cls,
        section: TeacherConfig,
        prompts: Sequence[Prompt],
        task: Task | None,
        tokenizer: Any,
        *,
        chat_template: bool,
        completion_room: int,
    ) -> PrivilegedContext | None:
        """The privileged context of a teacher: section, over `prompts` (a run's training or
        eval prompts); None without one. `completion_room`: the tokens a teacher prompt
        leaves for the completion."""
        if section.privileged_context == "none":
            return None
        return cls(
            section.privileged_context,
            section.prompt_template,
            prompts,
            task,
            tokenizer,
            chat_template=chat_template,
            max_len=section.max_model_len - completion_room,
        )

    def attach(self, samples: list[Sample]) -> None:
        """Each of `samples` (one rollout worker's chunk, or a step's dataset rows) gets its
        teacher prompt, or is marked unscored."""
        for sample in samples:
            if sample.hard_target:  # cross-entropy on the gold answer: no teacher
                continue
            if self.kind != "feedback":
                sample.teacher_prompt_ids = self.prompts[sample.prompt_index].teacher_ids
                continue
            solution = self._correct_sibling(sample, samples)
            if solution is None:
                sample.unscored = True
                continue
            prompt = self.prompts[sample.prompt_index]
            text = self.template.format(prompt=prompt.text, privileged_context=solution.text)
            ids = encode_prompt(self.tokenizer, text, self.chat_template)
            if len(ids) > self.max_len:
                sample.unscored = True
                continue
            sample.teacher_prompt_ids = ids

    def _correct_sibling(self, sample: Sample, chunk: list[Sample]) -> Sample | None:
        """The first sample of the same prompt, not `sample` itself, that the verifier accepts."""
        answer = self.prompts[sample.prompt_index].answer
        if answer is None:
            return None
        for other in chunk:
            if (
                other is not sample
                and other.on_policy
                and not other.hard_target
                and other.prompt_index == sample.prompt_index
                and self.task.is_correct(other.text, answer)
            ):
                return other
        return None
