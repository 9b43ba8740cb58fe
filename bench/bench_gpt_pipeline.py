"""The GPT in 2 pipeline stages: paratrain's pipeline strategy vs
``torch.distributed.pipelining`` run directly, with the same cut, schedule and micro-batches.

    python bench/bench_gpt_pipeline.py --repeats 5              # the measurement
    python bench/bench_gpt_pipeline.py --quick                  # tiny sizes, a smoke run

Both sides train paratrain's GPT (4 layers, 128 wide, context 128, dropout 0, seeded
alike) cut before ``transformer.h.2`` by torch's tracer, 1F1B with M=4 micro-batches of
a 16-sequence global batch, AdamW on each stage, the tied embedding's two copies'
gradients summed. Each side runs in 2 spawned processes (gloo process group on
loopback, a free port, one thread each, the same environment); paratrain's activations
travel over ``--transport`` (its default ``zmq``), torch's over gloo send/recv.

Per repeat, each side is started afresh, runs ``--warmup`` steps, then ``--steps``
timed steps, each begun by a barrier. The sides alternate order from one repeat to
the next. Reported: medians over repeats of tokens/s (timed steps' tokens over their
wall time) and of the ratio paratrain/torch within a repeat; and per stage the idle
fraction of a step against (S-1)/(M+S-1): ``1 - (schedule_s - wait_s) / makespan``,
the makespan being the longer stage's schedule run (bench_pipeline.py's bubble rule).
``wait_s`` is time blocked in a receive for paratrain (the stage runner's timing),
and in torch's ``_wait_batch_p2p`` (its p2p waits: receives and send completions)
for torch, timed by wrapping that private function in the benchmark's process. Losses
of the first and last timed step are reported for both, which should agree.

Results go to stdout and ``bench/results/gpt_pipeline.json``. On a shared machine the
figures are noisy; report its load with them.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import traceback
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench_pipeline import _env, run_two  # noqa: E402
from study_pipelining import batches_for, build, split, tied_names  # noqa: E402
from paratrain.atomic import write_json_atomic  # noqa: E402
from paratrain.models.gpt import lm_loss  # noqa: E402

SPLIT_POINT = "transformer.h.2"
STAGES, MICRO_BATCHES = 2, 4


def _steps(args: dict, rank: int, step_fn) -> dict:
    """Run ``step_fn(x, y) -> (schedule_s, wait_s, loss or None)`` over warm-up and timed
    steps, each after a barrier; this stage's per-step records and the timed wall time."""
    data = batches_for(args, args["warmup"] + args["steps"])
    records, losses = [], []
    start = 0.0
    for index, (x, y) in enumerate(data):
        dist.barrier()
        if index == args["warmup"]:
            start = time.perf_counter()
        schedule_s, wait_s, loss = step_fn(x, y)
        if index >= args["warmup"]:
            records.append((schedule_s, wait_s))
            if loss is not None:
                losses.append(loss)
    dist.barrier()
    return {"rank": rank, "records": records, "losses": losses, "timed_s": time.perf_counter() - start}


def _worker(rank: int, port: int, args: dict, queue, body) -> None:
    from paratrain.comm.process_group import init_process_group
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    init_process_group(_env(rank, STAGES, port))
    try:
        result = body(rank, args)
    except Exception:
        result = {"rank": rank, "error": traceback.format_exc()[-2000:]}
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


def paratrain_side(rank: int, args: dict) -> dict:
    from paratrain.train.objective import Objective
    from paratrain.train.pipeline_strategy import PipelineStrategy
    from paratrain.train.strategy import TrainSpec
    model = build("gpt", n_embd=args["n_embd"], context=args["context"])
    example = batches_for(args, 1)[0][0][: args["batch"] // MICRO_BATCHES]
    strategy = PipelineStrategy(stages=STAGES, micro_batches=MICRO_BATCHES, schedule="1f1b",
                                split_points=SPLIT_POINT, example_input=example, transport=args["transport"],
                                env=_env(rank, STAGES, args["port"]))
    objective = Objective(loss_fn=lambda logits, batch: lm_loss(logits, batch[1]), reduction="mean")
    strategy.setup(model, TrainSpec(optimizer="adamw", optimizer_params={"lr": args["lr"]}, objective=objective))

    def step(x, y):
        result = strategy.train_step((x, y), args["batch"])
        timing = strategy.last_timing
        return timing.schedule_s, timing.wait_s, result.loss if rank == STAGES - 1 else None

    try:
        return _steps(args, rank, step)
    finally:
        strategy.close()


def torch_side(rank: int, args: dict) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.distributed.pipelining import schedules
    model = build("gpt", n_embd=args["n_embd"], context=args["context"])
    example = batches_for(args, 1)[0][0][: args["batch"] // MICRO_BATCHES]
    module = split(model, "gpt", example).get_stage_module(rank)
    stage = PipelineStage(module, rank, STAGES, torch.device("cpu"))
    schedule = Schedule1F1B(stage, n_microbatches=MICRO_BATCHES, loss_fn=lm_loss)
    optimizer = torch.optim.AdamW(module.parameters(), lr=args["lr"])
    own_tied = dict(module.named_parameters())[tied_names("gpt")[rank]]
    waited = [0.0]
    original_wait = schedules._wait_batch_p2p

    def timed_wait(work):
        tic = time.perf_counter()
        original_wait(work)
        waited[0] += time.perf_counter() - tic

    schedules._wait_batch_p2p = timed_wait   # the schedule looks it up per call

    def step(x, y):
        losses: list = []
        optimizer.zero_grad(set_to_none=True)
        waited[0] = 0.0
        tic = time.perf_counter()
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=losses)
        schedule_s = time.perf_counter() - tic
        dist.all_reduce(own_tied.grad)   # each copy of the tied weight gets the sum, as paratrain does
        optimizer.step()
        return schedule_s, waited[0], torch.stack(losses).mean().item() if losses else None

    return _steps(args, rank, step)


def run_side(side: str, args: dict) -> list[dict]:
    body = paratrain_side if side == "paratrain" else torch_side
    return run_two(_side_target, {**args, "side": side, "body": body.__name__})


def _side_target(rank: int, port: int, args: dict, queue) -> None:
    args = {**args, "port": port}
    _worker(rank, port, args, queue, globals()[args["body"]])


def summarise(stages: list[dict], tokens_per_step: int) -> dict:
    """Tokens/s of the timed steps and each stage's median idle fraction per step."""
    idle = [[] for _ in stages]
    for per_stage in zip(*(s["records"] for s in stages)):
        makespan = max(schedule_s for schedule_s, _ in per_stage)
        for index, (schedule_s, wait_s) in enumerate(per_stage):
            idle[index].append(1.0 - (schedule_s - wait_s) / makespan)
    steps = len(stages[0]["records"])
    losses = stages[-1]["losses"]
    return {"tokens_per_s": tokens_per_step * steps / max(s["timed_s"] for s in stages),
            "stage_idle": [statistics.median(i) for i in idle],
            "first_loss": losses[0], "last_loss": losses[-1]}


def main(argv=None) -> int:
    from paratrain.parallel.pipeline import theoretical_bubble
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh runs per side (medians); >= 5")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--batch", type=int, default=16, help="global batch, sequences (M=4 micro-batches)")
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--transport", default="zmq", choices=("zmq", "gloo"), help="paratrain's activation links")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpt_pipeline.json"))
    options = parser.parse_args(argv)
    if options.quick:
        options.n_embd, options.context, options.batch, options.steps, options.warmup = 32, 32, 8, 3, 1
        options.repeats = min(options.repeats, 2)
    elif options.repeats < 5:
        parser.error(f"--repeats={options.repeats}: medians need >= 5")
    if options.batch % MICRO_BATCHES:
        parser.error(f"--batch={options.batch} must be a multiple of {MICRO_BATCHES} micro-batches")
    args = {"batch": options.batch, "n_embd": options.n_embd, "context": options.context, "steps": options.steps,
            "warmup": options.warmup, "lr": options.lr, "transport": options.transport}
    tokens = options.batch * options.context
    runs: dict[str, list[dict]] = {"paratrain": [], "torch": []}
    for repeat in range(options.repeats):
        order = ("paratrain", "torch") if repeat % 2 == 0 else ("torch", "paratrain")
        for side in order:
            stages = run_side(side, args)
            errors = [s["error"] for s in stages if "error" in s]
            if errors:
                print(f"{side} failed:\n{errors[0]}", file=sys.stderr)
                return 1
            row = summarise(stages, tokens)
            runs[side].append(row)
            print(json.dumps({"repeat": repeat, "side": side, **row}), flush=True)
    theory = theoretical_bubble(STAGES, MICRO_BATCHES)
    ratios = [p["tokens_per_s"] / t["tokens_per_s"] for p, t in zip(runs["paratrain"], runs["torch"])]
    report = {"argv": sys.argv[1:], **args, "split_point": SPLIT_POINT, "micro_batches": MICRO_BATCHES,
              "schedule": "1f1b", "theoretical_bubble": theory, "runs": runs,
              "ratio_median": statistics.median(ratios), "ratios": ratios}
    print(f"GPT 2 stages at {SPLIT_POINT}, 1F1B, M={MICRO_BATCHES}, batch {options.batch}x{options.context} "
          f"tokens, {options.repeats} repeats x {options.steps} timed steps (medians)")
    for side in ("paratrain", "torch"):
        rows = runs[side]
        idle = [statistics.median(r["stage_idle"][i] for r in rows) for i in range(STAGES)]
        report[side] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows), "stage_idle": idle}
        print(f"  {side:>9}: {report[side]['tokens_per_s']:8.0f} tokens/s   idle stage0 {idle[0]:.3f}"
              f"  stage1 {idle[1]:.3f}  (theory {theory:.3f})   loss first {rows[0]['first_loss']:.5f}"
              f" last {rows[0]['last_loss']:.5f}")
    print(f"  ratio paratrain/torch: median {report['ratio_median']:.3f}  (per repeat "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")
    pathlib.Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_json_atomic(options.out, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
