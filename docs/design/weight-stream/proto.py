"""Prototype for rayd issue 39: stream the student's weights into a vLLM-CPU engine through
vLLM 0.32's weight-transfer API, with a gloo engine registered by the worker extension module.

    cd docs/design/weight-stream && ../../../.venv/bin/python proto.py [--bucket-bytes N] [--withhold NAME]
        [--reuse-buffer] [--skip-finalize] [--model tiny:test-student | PATH]

Main process = the engine (a vLLM `LLM`, engine core and worker in-process as rayd runs it on
CPU). A spawned child = the trainer (learner rank 0): rank 0 of a stateless gloo group, it sends
the weights of a checkpoint in buckets. Checks: teacher-forced log-probs and greedy generations
of the engine after each sync equal transformers' on the checkpoint that was sent.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import time
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = "/work/main"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAYD_CACHE", os.path.join(HERE, "cache"))
os.environ["PYTHONPATH"] = os.pathsep.join([HERE, REPO, os.environ.get("PYTHONPATH", "")])
sys.path[:0] = [HERE, REPO]

import torch  # noqa: E402

torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ordered_unique(state_dict: dict[str, torch.Tensor], withhold: str | None):
    """State-dict order (= vLLM's layerwise order for HF Llama), one of each aliased pair."""
    seen: set[int] = set()
    out = []
    for name, t in state_dict.items():
        if t.data_ptr() in seen or name == withhold:
            continue
        seen.add(t.data_ptr())
        out.append((name, t.detach().contiguous()))
    return out


# --- trainer (child process) -----------------------------------------------------------------


def trainer_main(conn, port: int, world_size: int) -> None:
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    from rayd_gloo_ext import send_buckets

    t = time.perf_counter()
    pg = stateless_init_torch_distributed_process_group(
        "127.0.0.1", port, 0, world_size, backend="gloo", timeout=timedelta(seconds=120)
    )
    conn.send(("joined", time.perf_counter() - t))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, ckpt, bucket_bytes, withhold, version, die_after = msg
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        pairs = ordered_unique(model.state_dict(), withhold)
        info = {
            "names": [n for n, _ in pairs],
            "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in pairs],
            "shapes": [list(t.shape) for _, t in pairs],
            "bucket_bytes": bucket_bytes,
            "version": version,
        }
        conn.send(("info", info))
        t = time.perf_counter()
        if die_after is not None:  # fault injection: the trainer dies after this many buckets
            from rayd_gloo_ext import plan_buckets

            plan = plan_buckets(info["dtype_names"], info["shapes"], bucket_bytes)
            for nb, _ in plan[:die_after]:
                pg.broadcast(torch.empty(nb, dtype=torch.uint8), 0).wait()
            print(f"trainer: dying after {die_after} of {len(plan)} buckets", flush=True)
            os._exit(3)
        sent, buckets = send_buckets(
            pg, [t_ for _, t_ in pairs], info["dtype_names"], info["shapes"], bucket_bytes,
            timedelta(seconds=120),
        )
        conn.send(("sent", sent, buckets, time.perf_counter() - t))


# --- engine (this process) -------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny:test-student")
    ap.add_argument("--bucket-bytes", type=int, default=1 << 20)
    ap.add_argument("--small-bucket-bytes", type=int, default=4096)
    ap.add_argument("--withhold", default=None)
    ap.add_argument("--reuse-buffer", action="store_true")
    ap.add_argument("--skip-finalize", action="store_true")
    ap.add_argument("--arch", default=None, help="layers,hidden,heads: a random Llama instead")
    ap.add_argument("--tied", action="store_true", help="with --arch: tied embeddings")
    ap.add_argument("--compare-blob", action="store_true", help="time rayd's blob path too")
    ap.add_argument("--kill-trainer", type=int, default=None,
                    help="the trainer dies after this many buckets of sync 2; then recover")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (mp executor)")
    ap.add_argument("--no-abort", action="store_true",
                    help="with --kill-trainer: resync without ending the broken session first")
    args = ap.parse_args()
    if args.skip_finalize:
        os.environ["RAYD_PROTO_SKIP_FINALIZE"] = "1"

    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from rayd.zoo import resolve_model_path

    if args.arch:
        from rayd.models import build_tiny_llama

        L, H, heads = (int(x) for x in args.arch.split(","))
        path = os.path.join(HERE, f"arch_{L}_{H}_{heads}{'_tied' if args.tied else ''}")
        if not os.path.isdir(path):
            build_tiny_llama(path, layers=L, hidden=H, heads=heads, max_positions=512,
                             tie_embeddings=args.tied)
    else:
        path = str(resolve_model_path(args.model)) if ":" in args.model else args.model
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = base.config
    print(f"model {path}: {sum(p.numel() for p in base.parameters())} params, "
          f"tied={cfg.tie_word_embeddings}, vocab={cfg.vocab_size}", flush=True)
    new_dir = os.path.join(HERE, "ckpt_new")
    new = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * (p.std() if p.numel() > 1 else 1))
    new.save_pretrained(new_dir)

    gen = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(4, cfg.vocab_size, (n,), generator=gen).tolist()  # noqa: E731
    long_prompt = rand(150)  # > one 128-token CPU KV block: a stale prefix cache would show
    sequences = [long_prompt + rand(20), rand(9)]

    @torch.no_grad()
    def hf_forced(model, seq):
        logp = model(input_ids=torch.tensor([seq])).logits[0, :-1].float().log_softmax(-1)
        return logp.gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)

    @torch.no_grad()
    def hf_greedy(model, prompt, n=8):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    t = time.perf_counter()
    llm = LLM(
        model=path, tokenizer=path, dtype="float32", enforce_eager=True, max_model_len=256,
        seed=0, kv_cache_memory_bytes=int(0.25 * 2**30), logprobs_mode="processed_logprobs",
        max_logprobs=20, enable_chunked_prefill=False, max_num_batched_tokens=4096,
        use_tqdm_on_load=False, tensor_parallel_size=args.tp,
        **({"distributed_executor_backend": "mp"} if args.tp > 1 else {}),
        worker_extension_cls="proto_both.BothExtension",
        weight_transfer_config={"backend": "rayd_gloo"},
    )
    print(f"engine up in {time.perf_counter() - t:.1f}s", flush=True)

    def engine_forced():
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params,
                            use_tqdm=False)
        return [torch.tensor([o.prompt_logprobs[i][s[i]].logprob for i in range(1, len(s))])
                for s, o in zip(sequences, outs)]

    def engine_greedy(n=8):
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=long_prompt)], params, use_tqdm=False)
        return list(outs[0].outputs[0].token_ids)

    def check(model, label) -> bool:
        ok = True
        for got, seq in zip(engine_forced(), sequences):
            want = hf_forced(model, seq)
            err = (got - want).abs().max().item()
            ok &= err < 1e-4
            print(f"  [{label}] logprob max|diff| = {err:.2e}", flush=True)
        g_e, g_h = engine_greedy(), hf_greedy(model, long_prompt)
        print(f"  [{label}] greedy engine {g_e} hf {g_h} {'==' if g_e == g_h else '!='}")
        return ok and g_e == g_h

    ok = check(base, "before sync, old weights")

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    port = free_port()
    trainer = ctx.Process(target=trainer_main, args=(child, port, 1 + args.tp), daemon=True)
    trainer.start()
    t = time.perf_counter()
    llm.init_weight_transfer_engine(
        {"init_info": {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1,
                       "world_size": 1 + args.tp, "timeout_s": 120}}
    )
    print(f"group: engine joined in {time.perf_counter() - t:.2f}s (incl. trainer start), "
          f"trainer {parent.recv()[1]:.2f}s", flush=True)

    def sync(ckpt, bucket_bytes, version, withhold=None, die_after=None):
        parent.send(("sync", ckpt, bucket_bytes, withhold, version, die_after))
        _, info = parent.recv()
        info["reuse_buffer"] = args.reuse_buffer
        t = time.perf_counter()
        llm.start_weight_update()
        llm.update_weights({"update_info": info})
        llm.finish_weight_update(weight_version=str(version))
        assert llm.reset_prefix_cache()
        wall = time.perf_counter() - t
        _, sent, buckets, send_s = parent.recv()
        reps = llm.collective_rpc("rayd_stream_report")
        if len(reps) > 1:
            print("  per-rank reports:", [(r["rank"], r["bytes"], r["missing"]) for r in reps])
        rep = reps[0]
        rep["missing"] = sorted({m for r in reps for m in r["missing"]})
        print(f"sync v{version}: bucket {bucket_bytes} B -> {buckets} buckets, {sent} B sent, "
              f"{rep['bytes']} B received; engine start->finish {rep['seconds']*1e3:.1f} ms "
              f"(receive+load {rep['recv_seconds']*1e3:.1f} ms: in broadcast {rep['wire_seconds']*1e3:.1f}"
              f", in load_weights {rep['load_seconds']*1e3:.1f}), driver wall {wall*1e3:.1f} ms,"
              f" trainer send {send_s*1e3:.1f} ms = {sent / max(send_s, 1e-9) / 1e9:.2f} GB/s;"
              f" missing {rep['missing']}; weight_version={llm.get_weight_version()}",
              flush=True)
        return rep

    rep = sync(os.path.join(HERE, "ckpt_new"), args.bucket_bytes, 1, args.withhold)
    ok &= check(new, "after sync 1, new weights") and not rep["missing"]
    if args.compare_blob:
        from rayd.weight_sync import serialize_state_dict

        for label, model in (("old", base), ("new", new)):
            t = time.perf_counter()
            blob = serialize_state_dict(model.state_dict())
            t1 = time.perf_counter()
            llm.collective_rpc("rayd_load_weights", args=(blob,))
            assert llm.reset_prefix_cache()
            t2 = time.perf_counter()
            print(f"blob path ({label}): {len(blob)} B, serialize {1e3*(t1-t):.1f} ms, "
                  f"collective_rpc load {1e3*(t2-t1):.1f} ms", flush=True)
        ok &= check(new, "after blob loads, new weights")
        # and the stream once more, to time it warm beside the blob
        rep = sync(os.path.join(HERE, "ckpt_new"), args.bucket_bytes, 1)
    if args.kill_trainer is not None:
        parent.send(("sync", path, args.small_bucket_bytes, None, 2, args.kill_trainer))
        _, info = parent.recv()
        llm.start_weight_update()
        t = time.perf_counter()
        try:
            llm.update_weights({"update_info": info})
            print("!! update_weights returned although the trainer died", flush=True)
            ok = False
        except Exception as exc:  # noqa: BLE001
            print(f"update_weights raised after {time.perf_counter() - t:.2f}s: "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
        trainer.join(30)
        if args.no_abort:
            print("no abort: straight to a new group and a full resync", flush=True)
        else:
            llm.collective_rpc("rayd_abort_stream")
            assert llm.reset_prefix_cache()
            print("engine after abort (what arrived is loaded, the rest old):", flush=True)
            check(new, "after abort, vs new")
        parent, child = ctx.Pipe()
        port = free_port()
        trainer = ctx.Process(target=trainer_main, args=(child, port, 1 + args.tp), daemon=True)
        trainer.start()
        llm.init_weight_transfer_engine(
            {"init_info": {"master_address": "127.0.0.1", "master_port": port,
                           "rank_offset": 1, "world_size": 1 + args.tp, "timeout_s": 120}}
        )
        parent.recv()
        print("new group formed after the fault", flush=True)
    rep = sync(path, args.small_bucket_bytes, 2)
    ok &= check(base, "after sync 2 (tiny buckets), old weights") and not rep["missing"]
    rep = sync(os.path.join(HERE, "ckpt_new"), args.small_bucket_bytes, 3)
    ok &= check(new, "after sync 3 (tiny buckets), new weights") and not rep["missing"]
    parent.send(("stop",))
    trainer.join(30)
    llm.shutdown_weight_transfer_engine()
    print("PROTOTYPE", "OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
