"""`rayd` command line: `rayd train CONFIG [key=value ...]` and `rayd demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo" / "onpolicy.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayd", description="Distil language models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run distillation from a YAML config")
    p_train.add_argument("config")
    p_train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p_demo = sub.add_parser("demo", help="on-policy distillation on the embedded default")
    p_demo.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)

    from rayd.train import main as train_main

    if args.command == "train":
        return train_main([args.config, *args.overrides])
    if not DEMO_CONFIG.is_file():
        print(f"rayd demo: {DEMO_CONFIG} not found (run it from a rayd checkout)", file=sys.stderr)
        return 2
    return train_main([str(DEMO_CONFIG), *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
