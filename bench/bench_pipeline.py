"""Pipeline parallelism: transport latency, the pipeline bubble, and throughput.

    python bench/bench_pipeline.py                      # all three parts, 7 repeats
    python bench/bench_pipeline.py --parts bubble --repeats 5
    python bench/bench_pipeline.py --quick              # small sizes, a smoke run

Parts:

* ``transport``: one-way time per tensor between two processes (ping-pong, half the
  round trip), gloo send/recv vs the ZeroMQ PAIR link of ``paratrain.parallel.p2p``.
* ``bubble``: a balanced 2-stage pipeline (GPipe), M in {1, 2, 4, 8}: each stage's
  measured idle fraction (the part of the step's makespan it spent not computing:
  blocked in a receive, or done early) next to the theoretical (S-1)/(M+S-1).
  Medians over ``--repeats`` steps.
* ``memory``: measured peak activation bytes per stage, GPipe vs 1F1B, M in {4, 8}.
* ``throughput``: samples/s of the same balanced model as a 2-stage pipeline (1F1B,
  M=8) and in one process, median step time over ``--repeats`` steps.

Every process runs with one thread. Results go to stdout and ``bench/results/pipeline.json``.
The figures mean most on an otherwise idle machine with a core per process.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

JOB_TIMEOUT_S = 300


def build_model(width: int, blocks: int) -> nn.Sequential:
    """``blocks`` x (Linear, ReLU), all equal, so an even cut balances the stages;
    the last block's ``width`` outputs are the class logits."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def _env(rank: int, world: int, port: int):
    from paratrain.env import read_env
    return read_env({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port), "PARATRAIN_STORE_HOSTED": "1", "PARATRAIN_TIMEOUT": "60"})


# ---------------------------------------------------------------- workers


def transport_worker(rank: int, port: int, args: dict, queue) -> None:
    from paratrain.comm.process_group import connect_store, init_process_group
    from paratrain.parallel.p2p import open_channel
    torch.set_num_threads(1)
    env = _env(rank, 2, port)
    init_process_group(env)
    results = {}
    for transport in ("gloo", "zmq"):
        channel = open_channel(transport, connect_store(env), f"bench/{transport}", rank=rank, peer=1 - rank,
                               timeout_s=60)
        for numel in args["sizes"]:
            tensor = torch.randn(numel)
            for i in range(args["warmup"] + args["round_trips"]):
                if i == args["warmup"]:
                    start = time.perf_counter()
                if rank == 0:
                    channel.send(tensor, tag=i)
                    channel.flush()
                    channel.recv(expected_tag=i)
                else:
                    received = channel.recv(expected_tag=i)
                    channel.send(received, tag=i)
                    channel.flush()
            one_way = (time.perf_counter() - start) / (2 * args["round_trips"])
            results[f"{transport}/{numel * 4}"] = one_way
        channel.close()
    dist.barrier()
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def pipeline_worker(rank: int, port: int, args: dict, queue) -> None:
    from paratrain.comm.process_group import init_process_group
    from paratrain.train.pipeline_strategy import PipelineStrategy
    from paratrain.train.strategy import TrainSpec
    torch.set_num_threads(1)
    env = _env(rank, 2, port)
    init_process_group(env)
    x = torch.randn(args["batch"], args["width"])
    y = torch.randint(0, args["width"], (args["batch"],))
    results = {}
    for schedule, micro in args["configs"]:
        strategy = PipelineStrategy(stages=2, micro_batches=micro, schedule=schedule, balance="uniform", env=env)
        strategy.setup(build_model(args["width"], args["blocks"]),
                       TrainSpec(optimizer="sgd", optimizer_params={"lr": 0.01}))
        steps = []
        for step in range(args["warmup"] + args["repeats"]):
            dist.barrier()   # both stages start each step together
            start = time.perf_counter()
            strategy.train_step((x, y), args["batch"])
            if step >= args["warmup"]:
                timing = strategy.last_timing
                steps.append((time.perf_counter() - start, timing.schedule_s, timing.wait_s,
                              timing.peak_activation_bytes))
        results[f"{schedule}/{micro}"] = steps
        strategy.close()
    gathered = [None, None]
    dist.all_gather_object(gathered, results)
    if rank == 0:
        queue.put(gathered)
    dist.destroy_process_group()


def summarise(stages: list[dict], key: str) -> dict:
    """Per-step idle fractions on a common clock, then medians over the steps.

    Both stages start a step together (barrier); the step's makespan is the longer
    of the two schedule runs, and a stage is idle for whatever part of it it was not
    computing: ``1 - (schedule_s - wait_s) / makespan``. Measuring each stage
    against its own end would hide the tail where the last stage waits for the
    first one's final backward, which the theoretical bubble counts.
    """
    idle = [[] for _ in stages]
    for per_stage in zip(*(s[key] for s in stages)):
        makespan = max(step[1] for step in per_stage)
        for index, (_, schedule_s, wait_s, _) in enumerate(per_stage):
            idle[index].append(1.0 - (schedule_s - wait_s) / makespan)
    return {"stage_idle": [statistics.median(i) for i in idle],
            "step_s": statistics.median(max(step[0] for step in per_stage)
                                        for per_stage in zip(*(s[key] for s in stages))),
            "peak_activation_bytes": [max(step[3] for step in s[key]) for s in stages]}


def run_two(target, args: dict):
    """Run ``target`` on two spawned processes around a store this process hosts."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, store.port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=JOB_TIMEOUT_S)
        for p in procs:
            p.join(30)
        return result
    finally:
        for p in procs:   # only what this script started
            if p.is_alive():
                p.kill()
                p.join(5)


def single_process_step_s(args: dict) -> float:
    """Median step time of the whole model in this process, same batch and update."""
    torch.set_num_threads(1)
    model = build_model(args["width"], args["blocks"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    x = torch.randn(args["batch"], args["width"])
    y = torch.randint(0, args["width"], (args["batch"],))
    times = []
    for step in range(args["warmup"] + args["repeats"]):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        for p in model.parameters():
            p.grad /= args["batch"]
        optimizer.step()
        if step >= args["warmup"]:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="transport,bubble,memory,throughput")
    parser.add_argument("--repeats", type=int, default=7, help="measured steps (medians); >= 5")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4, help="Linear+ReLU blocks; 2 stages split them evenly")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline.json"))
    options = parser.parse_args(argv)
    if options.repeats < 5 and not options.quick:
        parser.error(f"--repeats={options.repeats}: medians need >= 5")
    if options.quick:
        options.width, options.batch, options.repeats = 64, 32, 5
    parts = options.parts.split(",")
    report: dict = {"argv": sys.argv[1:], "width": options.width, "blocks": options.blocks,
                    "batch": options.batch, "repeats": options.repeats}
    common = {"width": options.width, "blocks": options.blocks, "batch": options.batch,
              "repeats": options.repeats, "warmup": 2}

    if "transport" in parts:
        sizes = [256, 16384, 262144] if not options.quick else [256]
        latency = run_two(transport_worker, {"sizes": sizes, "warmup": 20,
                                             "round_trips": 50 if options.quick else 200})
        report["transport_one_way_s"] = latency
        print("transport: one-way seconds per tensor (median of ping-pong, half round trip)")
        for size in sizes:
            print(f"  {size * 4:>9} bytes   gloo {latency[f'gloo/{size * 4}'] * 1e3:7.3f} ms"
                  f"   zmq {latency[f'zmq/{size * 4}'] * 1e3:7.3f} ms")

    if "bubble" in parts:
        from paratrain.parallel.pipeline import theoretical_bubble
        micros = [1, 2, 4, 8]
        stages = run_two(pipeline_worker, {**common, "configs": [("gpipe", m) for m in micros]})
        report["bubble"] = {m: {"theory": theoretical_bubble(2, m), **summarise(stages, f"gpipe/{m}")}
                            for m in micros}
        print("bubble (S=2, GPipe): idle fraction per stage vs (S-1)/(M+S-1)")
        for m in micros:
            row = report["bubble"][m]
            print(f"  M={m}: theory {row['theory']:.3f}   stage0 {row['stage_idle'][0]:.3f}"
                  f"   stage1 {row['stage_idle'][1]:.3f}   step {row['step_s'] * 1e3:.1f} ms")

    if "memory" in parts:
        configs = [(schedule, m) for m in (4, 8) for schedule in ("gpipe", "1f1b")]
        stages = run_two(pipeline_worker, {**common, "configs": configs})
        report["memory"] = {f"{s}/{m}": summarise(stages, f"{s}/{m}")["peak_activation_bytes"] for s, m in configs}
        print("memory (S=2): measured peak activation bytes per stage")
        for (schedule, m) in configs:
            peaks = report["memory"][f"{schedule}/{m}"]
            print(f"  {schedule:>5} M={m}: stage0 {peaks[0]:>10}   stage1 {peaks[1]:>10}")

    if "throughput" in parts:
        single = single_process_step_s(common)
        stages = run_two(pipeline_worker, {**common, "configs": [("1f1b", 8)]})
        pipeline = summarise(stages, "1f1b/8")["step_s"]
        report["throughput"] = {"single_samples_per_s": options.batch / single,
                                "pipeline_samples_per_s": options.batch / pipeline}
        print(f"throughput: one process {options.batch / single:.0f} samples/s, "
              f"2-stage pipeline (1F1B, M=8) {options.batch / pipeline:.0f} samples/s, "
              f"speed-up {single / pipeline:.2f}x")

    out = pathlib.Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
