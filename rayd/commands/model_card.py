"""The model cards `rayd export` writes (README.md of an export folder), from the templates in
rayd/commands/templates/: this module only gathers the facts the template shows.

The full card: what the student was distilled from and how, a prompt exactly as the student
expects it with its expected output, transformers and vLLM snippets that print that output
(tests/e2e/test_export.py runs them as written), the run's evals, provenance and config. The
adapter card (`rayd export --adapter`): how to load a LoRA adapter on its base model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayd.config import RunConfig

TEMPLATES = Path(__file__).parent / "templates"


def _render(name: str, facts: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,  # a fact the template names but nobody gave: an error
        autoescape=False,  # markdown and code, not HTML
    )
    env.filters["pyrepr"] = repr
    env.filters["percent"] = lambda v: (
        f"{v:.1%}" if isinstance(v, float) else "not measured (no task verifier)"
    )
    return env.get_template(name).render(**facts)


def model_card(record: dict[str, Any], cfg: RunConfig, path: str = ".") -> str:
    """The card of an export folder at `path`, from its `rayd_export.json` record and the run's
    config."""
    import yaml

    from rayd.commands.eval import EXPORT_RECORD

    teacher = cfg.models.teacher.path if cfg.models.teacher else "none (trained on a dataset)"
    if cfg.models.self_taught:
        teacher = f"self (the student's own {cfg.teacher.weights} weights)"
    if cfg.models.teachers:  # several: name=path (weight), combined per teacher.combine
        listed = ", ".join(f"{t.name}={t.path} ({t.weight:g})" for t in cfg.models.teachers)
        teacher = f"{cfg.teacher.combine} of {listed}"
    facts: dict[str, Any] = {
        "name": cfg.name,
        "algorithm": cfg.algorithm.name,
        "student": cfg.models.student.path,
        "teacher": teacher,
        "data_source": cfg.data.source,
        "train_dataset": cfg.data.train_dataset,
        "run": record["run"],
        "weights": record["weights"],
        "exported": record["exported"],
        "provenance": record["provenance"],
        "quantization": record.get("quantization"),
        "example": record.get("example"),
        "eval_in_run": record.get("eval_in_run"),
        "accuracy": record.get("accuracy"),
        "provenance_json": json.dumps(record["provenance"], indent=2),
        "config_yaml": yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip(),
        "path": path,
        "export_record": EXPORT_RECORD,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "max_model_len": cfg.rollout.max_model_len,
    }
    if record.get("example"):
        facts.update(_usage_facts(record, cfg))
    return _render("model_card.md", facts)


def _usage_facts(record: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """What the card's "Use" section says: where prompts come from and in which form, the
    lines that build the prompt in the snippets, and the other tasks the student learned."""
    ex, settings, algo = record["example"], record["eval"], cfg.algorithm
    if settings.get("task"):
        options = ", ".join(f"{k}={v}" for k, v in settings["options"].items())
        source = f"task `{settings['task']}`" + (f" ({options})" if options else "")
    else:
        source = f"`{cfg.data.source}`"
    if ex["chat_template"]:
        form = "a user turn in the tokenizer's chat template (`data.chat_template: auto`)"
        make_prompt = [
            "# as the student was trained: a user turn in its chat template",
            "prompt = tokenizer.apply_chat_template(",
            '    [{"role": "user", "content": question}], add_generation_prompt=True, '
            "tokenize=False",
            ")",
        ]
    else:
        never = cfg.data.chat_template == "never"
        why = "`data.chat_template: never`" if never else "the tokenizer has no chat template"
        form = f"plain text ({why})"
        make_prompt = ["prompt = question  # plain text, as the student was trained"]
    verdict = {True: " (the output's answer is right)", False: " (the output's answer is wrong)"}
    return {
        "prompt_source": source,
        "prompt_form": form,
        "make_prompt": make_prompt,
        "verdict": verdict.get(ex.get("correct"), ""),
        "rationale_prefix": algo.rationale_prefix if algo.name == "step_by_step" else None,
        "label_prefix": algo.label_prefix if algo.label_weight > 0 else None,
    }


def adapter_card(record: dict[str, Any], path: str) -> str:
    """The card of a LoRA adapter export (`rayd export --adapter`) at `path`."""
    return _render(
        "adapter_card.md",
        {
            "lora": record["lora"],
            "weights": record["weights"],
            "algorithm": record["algorithm"],
            "path": path,
        },
    )
