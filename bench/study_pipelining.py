"""Feasibility study: can ``torch.distributed.pipelining`` split models that are not
``nn.Sequential`` (paratrain's GPT, a transformers ``GPT2LMHeadModel``)?

    python bench/study_pipelining.py                      # every part
    python bench/study_pipelining.py --parts trace,chain  # some parts
    python bench/study_pipelining.py --steps 3            # fewer timed steps in ``run``

Parts (one JSON object per line on stdout; every process runs with one thread):

* ``trace``: ``pipeline(model, mb_args=(x,), split_spec={"transformer.h.2": BEGINNING})``:
  success or the error verbatim; what each stage module takes, returns and holds.
* ``tied``: how the tied embedding is treated: which stages hold it, whether the copies
  share storage, and how their gradients relate to the unsplit model's.
* ``chain``: in one process, chaining ``pipe.get_stage_module(i)`` reproduces the
  model's logits and gradients (tied gradients summed over their copies); and which
  input shapes the traced stages still accept.
* ``dynamic``: the same split from an export with a dynamic batch and length
  (``torch.export`` + the private ``Pipe._from_traced``, as ``pipeline()`` takes no
  ``dynamic_shapes``): do the stages then accept other shapes?
* ``modes``: with dropout, does ``.eval()`` on stages traced in training mode turn it off?
* ``run``: ``PipelineStage`` + ``ScheduleGPipe``/``Schedule1F1B`` in 2 spawned gloo
  processes on loopback: first loss vs one process, the loss after one AdamW step with
  and without summing the tied gradient over the two stages, and tokens/s vs one
  process (the GPT at its default size).

The models are tiny and the runs short; timings on a shared machine are rough.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import pathlib
import sys
import time
import traceback
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline  # noqa: E402

from paratrain.models.gpt import build_gpt, lm_loss  # noqa: E402

SPLIT = {"transformer.h.2": SplitPoint.BEGINNING}
TIED = ("transformer.wte.weight", "lm_head.weight")
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
JOB_TIMEOUT_S = 300


def build(kind: str, *, n_embd: int = 64, context: int = 128) -> torch.nn.Module:
    """The model under study, seeded: ``gpt`` (paratrain's), ``hf`` (GPT2LMHeadModel without
    its KV cache, wrapped to return logits) or ``hf-raw`` (GPT2LMHeadModel as configured
    in the brief, cache on, returning its ``ModelOutput``)."""
    torch.manual_seed(0)
    if kind == "gpt":
        return build_gpt(n_layer=4, n_embd=n_embd, n_head=4, context=context)
    import transformers
    transformers.logging.set_verbosity_error()
    options = {} if kind == "hf-raw" else dict(use_cache=False, bos_token_id=0, eos_token_id=0)
    config = transformers.GPT2Config(n_layer=4, n_embd=n_embd, n_head=4, vocab_size=256, n_positions=context,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **options)
    model = transformers.GPT2LMHeadModel(config)
    return model if kind == "hf-raw" else LogitsOnly(model)


class LogitsOnly(torch.nn.Module):
    """GPT2LMHeadModel returning its logits tensor, so both models share one loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def tied_names(kind: str) -> tuple[str, str]:
    prefix = "model." if kind == "hf" else ""
    return tuple(prefix + name for name in TIED)


def split(model: torch.nn.Module, kind: str, example: torch.Tensor):
    """``pipeline()`` on a deep copy: it patches the forward of the split module in place,
    and a second call on the same model fails (see the ``trace`` part)."""
    return pipeline(copy.deepcopy(model), mb_args=(example,), split_spec=split_spec_for(kind))


def describe_stage(module, outputs) -> dict:
    params = dict(module.named_parameters())
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {"type": type(module).__name__,
            "inputs": [n.target for n in module.graph.nodes if n.op == "placeholder"],
            "outputs": [f"{tuple(t.shape)} {t.dtype}" for t in outs],
            "num_params": len(params), "param_elements": sum(p.numel() for p in params.values()),
            "first_params": list(params)[:2], "last_params": list(params)[-2:]}


def part_trace(kind: str) -> dict:
    model, x = build(kind), torch.randint(0, 256, (2, 32))
    try:
        pipe = split(model, kind, x)
    except Exception as error:    # the finding is the error itself
        return {"part": "trace", "model": kind, "ok": False, "error": f"{type(error).__name__}: {error}",
                "cause": repr(error.__cause__)[:400]}
    stages, value = [], (x,)
    for index in range(pipe.num_stages):   # chain_stages, keeping each stage's outputs
        out = pipe.get_stage_module(index)(*value)
        stages.append(describe_stage(pipe.get_stage_module(index), out))
        value = out if isinstance(out, tuple) else (out,)
    patched = copy.deepcopy(model)
    pipeline(patched, mb_args=(x,), split_spec=split_spec_for(kind))
    try:
        pipeline(patched, mb_args=(x,), split_spec=split_spec_for(kind))
        second = "ok"
    except Exception as error:
        second = f"{type(error).__name__}: {str(error)[:120]} / cause {error.__cause__!r}"[:300]
    return {"part": "trace", "model": kind, "ok": True, "num_stages": pipe.num_stages,
            "replicated_params": pipe.replicated_params, "stages": stages,
            "second_pipeline_call_on_same_model": second}


def split_spec_for(kind: str) -> dict:
    return {("model." if kind == "hf" else "") + key: value for key, value in SPLIT.items()}


def wrapped_cache_on() -> dict:
    """Does wrapping alone (logits out, cache left on) let the tracer through?"""
    model = LogitsOnly(build("hf-raw"))
    try:
        pipeline(model, mb_args=(torch.randint(0, 256, (2, 32)),), split_spec={"model.transformer.h.2": SPLIT[
            "transformer.h.2"]})
        return {"part": "trace", "model": "hf-raw wrapped to logits", "ok": True}
    except Exception as error:
        return {"part": "trace", "model": "hf-raw wrapped to logits", "ok": False,
                "error": f"{type(error).__name__}: {error}", "cause": repr(error.__cause__)[:400]}


def stage_grads_vs_model(kind: str, batch: int = 2, length: int = 32) -> dict:
    """One forward + backward through the chained stages and through the model."""
    model = build(kind)
    x, y = torch.randint(0, 256, (batch, length)), torch.randint(0, 256, (batch, length))
    pipe = split(model, kind, x)
    stages = [pipe.get_stage_module(i) for i in range(pipe.num_stages)]
    logits, reference = chain_stages(stages, x), model(x)
    lm_loss(logits, y).backward()
    lm_loss(reference, y).backward()
    return {"model": model, "stages": stages, "logits": logits, "reference": reference}


def part_tied(kind: str) -> dict:
    run = stage_grads_vs_model(kind)
    model, stages = run["model"], run["stages"]
    embed_name, head_name = tied_names(kind)
    original = dict(model.named_parameters())[embed_name]
    first, last = dict(stages[0].named_parameters()), dict(stages[-1].named_parameters())
    embed_copy, head_copy = first[embed_name], last[head_name]
    stray = first.get(head_name)
    summed = embed_copy.grad + head_copy.grad
    return {"part": "tied", "model": kind, "tied_in_model": model_is_tied(model, kind),
            "stage0_embedding_shares_storage_with_last_stage_head":
                embed_copy.untyped_storage().data_ptr() == head_copy.untyped_storage().data_ptr(),
            "copies_equal_at_start": torch.equal(embed_copy, head_copy),
            "stage0_also_holds_head_name": stray is not None,
            "stage0_head_name_is_a_third_tensor": stray is not None and stray is not embed_copy
                                                   and stray is not head_copy,
            "stage0_head_name_gets_a_grad": stray is not None and stray.grad is not None,
            "max_diff_stage0_grad_vs_model": (embed_copy.grad - original.grad).abs().max().item(),
            "max_diff_sum_of_copies_vs_model": (summed - original.grad).abs().max().item()}


def model_is_tied(model, kind: str) -> bool:
    inner = model.model if kind == "hf" else model
    return inner.lm_head.weight is inner.transformer.wte.weight


def part_chain(kind: str) -> dict:
    run = stage_grads_vs_model(kind)
    model, stages = run["model"], run["stages"]
    reference = dict(model.named_parameters())
    worst = 0.0
    for stage in stages:
        for name, param in stage.named_parameters():
            if name not in tied_names(kind) and param.grad is not None:
                worst = max(worst, (param.grad - reference[name].grad).abs().max().item())
    shapes = {}
    for batch, length in ((4, 32), (2, 16), (1, 32)):
        x = torch.randint(0, 256, (batch, length))
        try:
            shapes[f"{batch}x{length}"] = "equal" if torch.equal(chain_stages(stages, x), model(x)) else "differs"
        except Exception as error:
            shapes[f"{batch}x{length}"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return {"part": "chain", "model": kind, "traced_shape": "2x32",
            "logits_bitwise_equal": torch.equal(run["logits"], run["reference"]),
            "max_abs_logit_diff": (run["logits"] - run["reference"]).abs().max().item(),
            "max_abs_grad_diff_untied": worst, "other_shapes": shapes}


def chain_stages(stages, x: torch.Tensor) -> torch.Tensor:
    value = (x,)
    for stage in stages:
        out = stage(*value)
        value = out if isinstance(out, tuple) else (out,)
    return value[0]


def part_dynamic(kind: str) -> dict:
    from torch.distributed.pipelining._IR import MultiUseParameterConfig, Pipe, annotate_split_points
    from torch.export import Dim
    model = build(kind)
    patched = copy.deepcopy(model)
    annotate_split_points(patched, split_spec_for(kind))
    dims = {0: Dim("batch", min=1, max=1024), 1: Dim("length", min=2, max=128)}
    program = torch.export.export(patched, (torch.randint(0, 256, (2, 32)),), dynamic_shapes={"input_ids": dims})
    pipe = Pipe._from_traced(patched, program, MultiUseParameterConfig.REPLICATE)
    stages = [pipe.get_stage_module(i) for i in range(pipe.num_stages)]
    results = {}
    for batch, length in ((5, 32), (3, 17), (1, 128)):
        x = torch.randint(0, 256, (batch, length))
        results[f"{batch}x{length}"] = "equal" if torch.equal(chain_stages(stages, x), model(x)) else "differs"
    return {"part": "dynamic", "model": kind, "traced_shape": "2x32 (batch, length dynamic)",
            "other_shapes": results}


def part_modes(kind: str) -> dict:
    if kind != "gpt":
        return {"part": "modes", "model": kind, "skipped": "dropout is 0 in the hf config under study"}
    torch.manual_seed(0)
    model, x = build_gpt(n_layer=4, n_embd=64, n_head=4, context=32, dropout=0.2), torch.randint(0, 256, (2, 32))
    stages = [stage.eval() for stage in (split(model, kind, x).get_stage_module(i) for i in range(2))]
    first, second = chain_stages(stages, x), chain_stages(stages, x)
    return {"part": "modes", "model": kind, "dropout": 0.2, "traced_in": "train mode",
            "eval_stages_deterministic": torch.equal(first, second),
            "eval_stages_equal_model_eval": torch.equal(first, model.eval()(x))}


# ---------------------------------------------------------------- two processes


def stage_worker(rank: int, port: int, args: dict, queue) -> None:
    """One pipeline stage: build, split, run the schedule; report losses and time."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=_timeout())
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=_timeout())
    try:
        queue.put((rank, run_stage(rank, args)))
    except Exception:
        queue.put((rank, {"error": traceback.format_exc()[-2000:]}))
    finally:
        dist.destroy_process_group()


def _timeout():
    from datetime import timedelta
    return timedelta(seconds=120)


def batches_for(args: dict, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    shape = (args["batch"], args["context"])
    return [(torch.randint(0, 256, shape, generator=generator), torch.randint(0, 256, shape, generator=generator))
            for _ in range(count)]


def run_stage(rank: int, args: dict) -> dict:
    kind = args["model"]
    model = build(kind, n_embd=args["n_embd"], context=args["context"])
    data = batches_for(args, 2 + args["steps"])
    micro = data[0][0][: args["batch"] // args["microbatches"]]
    pipe = split(model, kind, micro)
    module = pipe.get_stage_module(rank)
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))
    schedule = SCHEDULES[args["schedule"]](stage, n_microbatches=args["microbatches"], loss_fn=lm_loss)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    own_tied = dict(module.named_parameters()).get(tied_names(kind)[rank])
    result = {"losses": []}

    def step(x, y, sum_tied: bool) -> None:
        losses = []
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=losses)
        if sum_tied:   # the one thing we would add: the two copies' gradients summed
            dist.all_reduce(own_tied.grad)
        optimizer.step()
        if losses:
            result["losses"].append(torch.stack(losses).mean().item())

    step(*data[0], args["sum_tied"])
    step(*data[1], args["sum_tied"])
    dist.barrier()
    tic = time.perf_counter()
    for x, y in data[2:]:
        step(x, y, args["sum_tied"])
    result["step_s"] = (time.perf_counter() - tic) / args["steps"]
    return result


def single_process(args: dict) -> dict:
    """The same batches and updates in one process, on the unsplit model."""
    torch.set_num_threads(1)
    model = build(args["model"], n_embd=args["n_embd"], context=args["context"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, data = [], batches_for(args, 2 + args["steps"])
    tic = 0.0
    for index, (x, y) in enumerate(data):
        if index == 2:
            tic = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "step_s": (time.perf_counter() - tic) / args["steps"]}


def run_two(args: dict) -> list[dict]:
    """Both stages' results, in rank order, from two spawned processes on loopback."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=stage_worker, args=(rank, store.port, args, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        results = dict(queue.get(timeout=JOB_TIMEOUT_S) for _ in procs)
        return [results[0], results[1]]
    finally:
        for proc in procs:   # only what this script started, by handle
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def part_run(kind: str, steps: int) -> list[dict]:
    rows = []
    configs = [dict(schedule=s, sum_tied=t, n_embd=64, context=64, batch=8, steps=1)
               for s in ("gpipe", "1f1b") for t in (False, True)]
    configs.append(dict(schedule="1f1b", sum_tied=True, n_embd=128, context=128, batch=16, steps=steps))
    for config in configs:
        args = dict(config, model=kind, microbatches=4)
        staged, reference = run_two(args), single_process(args)
        if "error" in staged[0] or "error" in staged[1]:
            rows.append({"part": "run", **args, "error": staged[0].get("error") or staged[1].get("error")})
            continue
        losses = staged[1]["losses"]
        tokens = args["batch"] * args["context"]
        rows.append({"part": "run", **args,
                     "first_loss_diff": abs(losses[0] - reference["losses"][0]),
                     "second_loss_diff": abs(losses[1] - reference["losses"][1]),
                     "pipeline_tokens_per_s": round(tokens / max(s["step_s"] for s in staged)),
                     "one_process_tokens_per_s": round(tokens / reference["step_s"])})
    return rows


PARTS = ("trace", "tied", "chain", "dynamic", "modes", "run")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--models", default="gpt,hf", help="gpt, hf (hf also traces the raw GPT2LMHeadModel)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps in the 'run' part")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    single = {"trace": part_trace, "tied": part_tied, "chain": part_chain, "dynamic": part_dynamic,
              "modes": part_modes}
    parts = args.parts.split(",")
    if "trace" in parts and "hf" in args.models.split(","):    # the brief's config as it is, first
        for row in (part_trace("hf-raw"), wrapped_cache_on()):
            print(json.dumps(row, default=str), flush=True)
    for kind in args.models.split(","):
        for part in parts:
            rows = part_run(kind, args.steps) if part == "run" else [single[part](kind)]
            for row in rows:
                print(json.dumps(row, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
