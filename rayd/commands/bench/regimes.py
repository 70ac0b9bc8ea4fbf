"""Measure the regimes of the addition variant (docs/experiments/regimes.md): a measurement
script beside the benches, not a `rayd bench` section.

    python -m rayd.commands.bench.regimes [--parts a,b,c] [--json out.json]

One process, plain transformers, no Ray: the teacher pre-trained on the variant
(tiny:repair-teacher, task options {digits: 3, swap: 0.5, repair: 0.1}) is measured for
 (a) several rationales: its choice between the two operand orders at each column step (the
     entropy in bits of its probabilities of the two digits, renormalised) along its own samples
     at temperature 1, and the distinct valid rationales among k samples per prompt;
 (b) repair: from held-out prefixes whose last column total was replaced by a wrong value, how
     often its greedy next tokens are the repair marker and the right total, and its final
     accuracy from those prefixes, against the plain addition teacher (tiny:addition-teacher);
 (c) a student too small to match it: the teacher's greedy held-out accuracy against students
     trained by rationale SFT on the teacher's verified greedy traces (rayd.pretrain's loop, as
     the teacher itself was trained) for a few step budgets, each a full run of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rayd.tasks import AdditionTask, make_task
from rayd.tasks.arithmetic import REPAIR_MARKER
from rayd.tasks.base import Example
from rayd.zoo import PRESETS, resolve_model_path

VARIANT: dict[str, Any] = {"digits": 3, "swap": 0.5, "repair": 0.1}
MAX_NEW_TOKENS = 64  # 3 steps of at most 12 characters with a repair, the answer, EOS


def _operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.removesuffix("=").split("+")
    return int(a), int(b)


def _load(path: str) -> tuple[Any, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # generation continues every row from its last column
    return model, tokenizer


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prefixes: Sequence[str],
    *,
    temperature: float = 0.0,
    batch: int = 256,
    seed: int = 0,
) -> list[str]:
    """The completion of each prefix (up to EOS), greedy at temperature 0."""
    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prefixes), batch):
        chunk = list(prefixes[start : start + batch])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        ids = model.generate(
            **enc,
            max_new_tokens=MAX_NEW_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        new = ids[:, enc.input_ids.shape[1] :]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


@torch.no_grad()
def next_token_probs(
    model: Any, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch: int = 256
) -> torch.Tensor:
    """Each text's next-token distribution (rows of probabilities over the vocabulary)."""
    rows = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(
            list(texts[start : start + batch]),
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        # Left padding: the last column is every row's last real token.
        logits = model(**enc).logits[:, -1]
        rows.append(torch.softmax(logits.float(), dim=-1))
    return torch.cat(rows)


def _accuracy(task: AdditionTask, examples: Sequence[Example], completions: Sequence[str]) -> float:
    good = sum(task.is_correct(c, e.answer) for e, c in zip(examples, completions, strict=True))
    return good / max(len(examples), 1)


def part_a(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Example], k: int):
    """Operand-order entropy along the teacher's own samples, and distinct valid rationales."""
    task = make_task("addition", **VARIANT)
    assert isinstance(task, AdditionTask)
    prefixes = [e.prompt for e in prompts for _ in range(k)]
    samples = generate(model, tokenizer, prefixes, temperature=1.0, seed=1)
    # The decision points: the start of each column step of each sample, where the teacher
    # chooses which operand to write first (only columns whose two digits differ).
    points: list[str] = []
    options: list[tuple[str, str]] = []
    steps_seen = repairs = swapped = ordered = 0
    distinct, possible, valid_samples, correct = [], [], 0, 0
    for i, e in enumerate(prompts):
        a, b = _operands(e.prompt)
        da, db = str(a)[::-1], str(b)[::-1]
        kept: set[str] = set()
        for completion in samples[i * k : (i + 1) * k]:
            correct += task.is_correct(completion, e.answer)
            rationale = task.rationale_of(completion)
            if not AdditionTask.check_rationale(a, b, rationale):
                continue
            valid_samples += 1
            kept.add(rationale)
            steps = rationale.split(";")[:-1]
            head = e.prompt
            for col, step in enumerate(steps):
                steps_seen += 1
                repairs += REPAIR_MARKER in step
                if da[col] != db[col]:
                    points.append(head)
                    options.append((da[col], db[col]))
                    ordered += step[0] == da[col]
                    swapped += step[0] == db[col]
                head += step + ";"
        distinct.append(len(kept))
        possible.append(2 ** sum(x != y for x, y in zip(da, db, strict=True)))
    probs = next_token_probs(model, tokenizer, points)
    entropies, mass = [], []
    for row, (x, y) in zip(probs, options, strict=True):
        px = row[tokenizer.convert_tokens_to_ids(x)].item()
        py = row[tokenizer.convert_tokens_to_ids(y)].item()
        mass.append(px + py)
        p = px / max(px + py, 1e-30)
        entropies.append(-sum(q * math.log2(q) for q in (p, 1 - p) if q > 0))
    greedy = generate(model, tokenizer, [e.prompt for e in prompts])
    greedy_repairs = sum(task.rationale_of(c).count(REPAIR_MARKER) for c in greedy)
    return {
        "prompts": len(prompts),
        "samples_per_prompt": k,
        "temperature": 1.0,
        "sample_accuracy": correct / len(samples),
        "valid_rationale_rate": valid_samples / len(samples),
        "order_entropy_bits_mean": sum(entropies) / max(len(entropies), 1),
        "order_entropy_bits_p10": sorted(entropies)[len(entropies) // 10] if entropies else None,
        "order_points": len(entropies),
        "order_mass_on_the_two_digits": sum(mass) / max(len(mass), 1),
        "swapped_share_in_samples": swapped / max(swapped + ordered, 1),
        "distinct_valid_rationales_per_prompt": sum(distinct) / len(distinct),
        "possible_orderings_per_prompt": sum(possible) / len(possible),
        "repair_rate_per_step_t1": repairs / max(steps_seen, 1),
        "greedy_repairs": greedy_repairs,
        "greedy_accuracy": _accuracy(task, prompts, greedy),
    }


def corrupted_prefixes(prompts: Sequence[Example], seed: int = 0) -> list[dict[str, Any]]:
    """For each prompt: the plain gold rationale up to a random column step whose total is
    replaced by a wrong value (never a prefix of the right total, which would not yet be
    wrong), with what a repair must write next."""
    rng = random.Random(f"{seed}:corrupt")
    rows = []
    for e in prompts:
        a, b = _operands(e.prompt)
        steps = AdditionTask.make(a, b).rationale.split(";")[:-1]
        col = rng.randrange(len(steps))
        head, right = steps[col].split("=")
        wrongs = [v for v in range(20) if not right.startswith(str(v))]
        wrong = rng.choice(wrongs)
        done = "".join(s + ";" for s in steps[:col])
        # The other kind of error: an operand digit copied wrong, summed consistently. It is
        # the small students' commonest error on this task (rationale-onpolicy-vs-sft.md),
        # and the repair data never shows it: does the teacher's check reach it anyway?
        x, rest = head.split("+", 1)
        y, carry = rest.split("+")
        slip = rng.choice([d for d in range(10) if d != int(x)])
        slipped = slip + int(y) + int(carry)
        if str(right).startswith(str(slipped)):
            slipped_text = None  # its total would read as a prefix of the right one
        else:
            slipped_text = e.prompt + done + f"{slip}+{y}+{carry}={slipped}"
        rows.append(
            {
                "example": e,
                "prefix": e.prompt + done + f"{head}={wrong}",
                "clean": e.prompt + done + f"{head}={right}",
                "slip": slipped_text,
                "repair": f"{REPAIR_MARKER}{right};",
                "near": abs(wrong - int(right)) == 1,  # an off-by-one slip, as a carry error
            }
        )
    return rows


def part_b(path: str, prompts: Sequence[Example]) -> dict[str, Any]:
    """Repair from corrupted prefixes: the marker and right total next, and the final answer."""
    model, tokenizer = _load(path)
    task = make_task("addition", **VARIANT)
    rows = corrupted_prefixes(prompts)
    marker_id = tokenizer.convert_tokens_to_ids(REPAIR_MARKER)
    after_wrong = next_token_probs(model, tokenizer, [r["prefix"] for r in rows])[:, marker_id]
    after_right = next_token_probs(model, tokenizer, [r["clean"] for r in rows])[:, marker_id]
    tails = generate(model, tokenizer, [r["prefix"] for r in rows])
    clean_tails = generate(model, tokenizer, [r["clean"] for r in rows])
    repaired = [t.startswith(r["repair"]) for t, r in zip(tails, rows, strict=True)]
    examples = [r["example"] for r in rows]
    # The whole completion is the prefix's rationale part plus the continuation.
    whole = [r["prefix"].split("=", 1)[1] + t for r, t in zip(rows, tails, strict=True)]
    clean_whole = [r["clean"].split("=", 1)[1] + t for r, t in zip(rows, clean_tails, strict=True)]
    near = [i for i, r in enumerate(rows) if r["near"]]
    slips = [r for r in rows if r["slip"]]
    after_slip = next_token_probs(model, tokenizer, [r["slip"] for r in slips])[:, marker_id]
    slip_tails = generate(model, tokenizer, [r["slip"] for r in slips])
    slip_whole = [r["slip"].split("=", 1)[1] + t for r, t in zip(slips, slip_tails, strict=True)]
    slip_repaired = [t.startswith(r["repair"]) for t, r in zip(slip_tails, slips, strict=True)]
    return {
        "model": path,
        "prefixes": len(rows),
        "p_marker_after_wrong_total": after_wrong.mean().item(),
        "p_marker_after_right_total": after_right.mean().item(),
        "greedy_repairs_marker_and_right_total": sum(repaired) / len(rows),
        "greedy_repairs_off_by_one_only": sum(repaired[i] for i in near) / max(len(near), 1),
        "off_by_one_prefixes": len(near),
        "accuracy_from_wrong_prefix": _accuracy(task, examples, whole),
        "accuracy_from_clean_prefix": _accuracy(task, examples, clean_whole),
        "operand_slip_prefixes": len(slips),
        "p_marker_after_operand_slip": after_slip.mean().item() if slips else None,
        "greedy_repairs_operand_slip": sum(slip_repaired) / max(len(slips), 1),
        "accuracy_from_operand_slip_prefix": _accuracy(
            task, [r["example"] for r in slips], slip_whole
        ),
    }


def teacher_traces(
    model: Any, tokenizer: PreTrainedTokenizerBase, task: AdditionTask, count: int
) -> tuple[list[Example], int]:
    """The teacher's verified greedy rationales for `count` training prompts (as the demo's
    `rayd generate configs/demo/traces.yaml` makes them: temperature 0, answer verified)."""
    prompts = task.examples("train", count)
    completions = generate(model, tokenizer, [e.prompt for e in prompts])
    kept = [
        Example(prompt=e.prompt, rationale=task.rationale_of(c), answer=e.answer)
        for e, c in zip(prompts, completions, strict=True)
        if task.is_correct(c, e.answer)
    ]
    return kept, len(prompts)


def part_c(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    held_out: Sequence[Example],
    students: Sequence[str],
    budgets: Sequence[int],
    trace_count: int,
) -> dict[str, Any]:
    from rayd.models import count_params
    from rayd.pretrain import train_on_examples

    task = make_task("addition", **VARIANT)
    assert isinstance(task, AdditionTask)
    started = time.monotonic()
    traces, asked = teacher_traces(model, tokenizer, task, trace_count)
    trace_s = time.monotonic() - started
    teacher_acc = _accuracy(
        task, held_out, generate(model, tokenizer, [e.prompt for e in held_out])
    )
    result: dict[str, Any] = {
        "teacher_greedy_accuracy": teacher_acc,
        "teacher_params": count_params(model),
        "traces_kept": len(traces),
        "traces_asked": asked,
        "traces_with_repair": sum(REPAIR_MARKER in t.rationale for t in traces),
        "trace_seconds": round(trace_s, 1),
        "held_out": len(held_out),
        "students": {},
    }
    for name in students:
        base = resolve_model_path(f"tiny:{name}")
        curve = []
        for steps in budgets:
            with tempfile.TemporaryDirectory(prefix=f"regimes-{name}-") as tmp:
                work = Path(tmp) / "model"
                shutil.copytree(base, work)  # the cached random init stays untouched
                t0 = time.monotonic()
                # The demo student's recipe (configs/demo/student.yaml): 64 rows a step, lr 3e-3
                # decaying linearly (here to a tenth, rayd.pretrain's schedule).
                losses = train_on_examples(work, traces, steps=steps, batch_size=64, lr=3e-3)
                train_s = time.monotonic() - t0
                student, stok = _load(str(work))
                acc = _accuracy(
                    task, held_out, generate(student, stok, [e.prompt for e in held_out])
                )
                curve.append(
                    {
                        "steps": steps,
                        "held_out_accuracy": acc,
                        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                        "train_seconds": round(train_s, 1),
                    }
                )
                print(f"  (c) {name} {steps} steps: {acc:.1%} ({train_s:.0f} s)", file=sys.stderr)
                params = count_params(student)
        result["students"][name] = {"params": params, "arch": PRESETS[name]["arch"], "sft": curve}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayd.commands.bench.regimes")
    parser.add_argument("--teacher", default="tiny:repair-teacher")
    parser.add_argument("--plain-teacher", default="tiny:addition-teacher")
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts for (a), (b)")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt for (a)")
    parser.add_argument("--students", default="addition-student,regime-student")
    parser.add_argument("--steps", default="250,500,1000")
    parser.add_argument("--traces", type=int, default=4000)
    parser.add_argument("--eval", type=int, default=500, help="held-out prompts for (c)")
    parser.add_argument("--json", default=None, help="also write the report here")
    # One thread: these models are tiny, and on a shared 2-core machine two threads spin against
    # other jobs (a teacher step took 2 s with two threads there, 0.5 s with one).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bars would bury the report
    torch.manual_seed(0)
    task = make_task("addition", **VARIANT)
    teacher_path = resolve_model_path(args.teacher)
    model, tokenizer = _load(teacher_path)
    report: dict[str, Any] = {"task_options": VARIANT, "teacher": args.teacher}
    if "a" in parts:
        report["a"] = part_a(model, tokenizer, task.examples("eval", args.prompts), args.samples)
        print(json.dumps({"a": report["a"]}, indent=1), file=sys.stderr)
    if "b" in parts:
        prompts = task.examples("eval", args.prompts)
        report["b"] = {"variant_teacher": part_b(teacher_path, prompts)}
        if args.plain_teacher:
            # Built only if missing: the demo's teacher, cached by `make demo`.
            plain = resolve_model_path(args.plain_teacher)
            report["b"]["plain_teacher"] = part_b(plain, prompts)
        print(json.dumps({"b": report["b"]}, indent=1), file=sys.stderr)
    if "c" in parts:
        report["c"] = part_c(
            model,
            tokenizer,
            task.examples("eval", args.eval),
            [s for s in args.students.split(",") if s],
            [int(s) for s in args.steps.split(",")],
            args.traces,
        )
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
