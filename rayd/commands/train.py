"""`rayd train CONFIG [key=value ...]` (also `python -m rayd train`, the Ray job entry point):
one distillation run of any algorithm; the loop itself is rayd/driver.py."""

from __future__ import annotations

import json
import sys

from rayd.checkpoint import CheckpointError
from rayd.cli import config_parser
from rayd.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    args = config_parser("rayd train", __doc__.split("\n")[0]).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    # The config is sound: now the stack (torch, Ray, vLLM, DeepSpeed) is worth importing.
    from rayd import cluster
    from rayd.driver import NumericsError, train
    from rayd.learner.group import LearnerFailure
    from rayd.teacher.scorer import TeacherSignalError

    try:
        summary = train(cfg)
    except KeyboardInterrupt:  # Ctrl-C during set-up, or a second one: no checkpoint taken
        print(
            "rayd: interrupted; the run folder holds what the last checkpoint saved "
            "(run the same command again to resume from it)",
            file=sys.stderr,
        )
        return 130
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 2
    except (
        NumericsError,
        LearnerFailure,
        TeacherSignalError,
        cluster.WorkerLost,
        cluster.RemoteCallTimeout,
    ) as exc:
        print(f"rayd: stopped: {exc}", file=sys.stderr)
        return 1

    if summary["preempted"]:  # not finished; the same command resumes
        return 130 if summary["stopped_by"] == "SIGINT" else 143  # 128 + the signal's number
    print(json.dumps({"initial": summary["initial"], "final": summary["final"]}, indent=2))
    print(f"rayd: student saved to {summary['student']}; metrics in {summary['metrics']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
