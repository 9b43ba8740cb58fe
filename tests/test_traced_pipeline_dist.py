"""Traced pipeline stages (models that are not nn.Sequential) with real processes:
spawned workers join a gloo group on loopback, train paratrain's GPT or a transformers
GPT2LMHeadModel split by torch's tracer, and must match the same model trained in this
process, step by step."""
from __future__ import annotations

import io
import os
import traceback
import warnings

import pytest
import torch

from conftest import run_workers
from paratrain.models.gpt import build_gpt, lm_loss

VOCAB, CONTEXT, BATCH, STEPS, TAIL, HELDOUT = 64, 16, 8, 3, 6, 8
OPTIM = {"lr": 1e-2, "weight_decay": 0.1}
MAX_NORM = 0.5   # below the gradient norm at the start, so the clipping is exercised
TOLERANCE = 1e-5            # losses
PARAM_TOLERANCE = 1e-4      # weights: Adam divides by sqrt(v), so a near-zero gradient's rounding is magnified


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    if kind == "gpt":
        return build_gpt(seed=seed, n_layer=4, n_embd=32, n_head=2, context=CONTEXT, vocab_size=VOCAB)
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=CONTEXT,
                                     use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def logits(outputs):
    return outputs if isinstance(outputs, torch.Tensor) else outputs.logits


def make_data():
    generator = torch.Generator().manual_seed(1)
    samples = BATCH * STEPS + TAIL + HELDOUT
    x = torch.randint(0, VOCAB, (samples, CONTEXT), generator=generator)
    return x, torch.roll(x, -1, dims=1)


def step_bounds():
    bounds = [(s * BATCH, (s + 1) * BATCH) for s in range(STEPS)]
    return bounds + [(STEPS * BATCH, STEPS * BATCH + TAIL)]   # a short last batch


def train_reference(kind: str):
    """One process, the whole global batch per step: what the pipelines must match."""
    model, (x, y) = build(kind), make_data()
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIM)
    losses, norms = [], []
    for begin, end in step_bounds():
        optimizer.zero_grad()
        loss = lm_loss(logits(model(x[begin:end])), y[begin:end])
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        heldout = float(lm_loss(logits(model(x[-HELDOUT:])), y[-HELDOUT:]))
    return {"losses": losses, "norms": norms, "heldout": heldout, "state": model.state_dict()}


def _worker(rank: int, world: int, port: int, queue, runs: list[dict]) -> None:
    from paratrain.comm.process_group import init_process_group
    from paratrain.env import read_env
    from paratrain.train.objective import Objective
    from paratrain.train.pipeline_strategy import PipelineStrategy
    from paratrain.train.strategy import TrainSpec
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        env = read_env({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "PARATRAIN_TIMEOUT": "60"})
        init_process_group(env)
        x, y = make_data()
        results = []
        for run in runs:
            strategy = PipelineStrategy(stages=run["stages"], replicas=run.get("replicas", 1), micro_batches=4,
                                        schedule=run["schedule"], split_points=run["split_points"],
                                        example_input=x[:2], env=env)
            objective = Objective(loss_fn=lambda out, batch: lm_loss(out, batch[1]), reduction="mean")
            strategy.setup(build(run["kind"]), TrainSpec(optimizer="adamw", optimizer_params=OPTIM,
                                                         objective=objective, max_grad_norm=MAX_NORM))
            losses = []
            for begin, end in step_bounds():
                share = torch.arange(begin, end).tensor_split(strategy.data_world)[strategy.data_rank]
                losses.append(strategy.train_step((x[share], y[share]), end - begin).loss)
            mine = torch.arange(len(x) - HELDOUT, len(x)).tensor_split(strategy.data_world)[strategy.data_rank]
            heldout = strategy.evaluate([(x[mine], y[mine])])
            results.append({"losses": losses, "heldout": heldout.loss, "state": strategy.full_model_state(),
                            "split_points": strategy.counts})
            strategy.close()
        buffer = io.BytesIO()   # bytes, not tensors: a queued tensor's memory dies with this process
        torch.save(results, buffer)
        queue.put((rank, buffer.getvalue()))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def check_against_reference(results, kind: str) -> None:
    reference = train_reference(kind)
    assert min(reference["norms"]) > MAX_NORM   # every step clipped
    for rank_result in results:
        assert max(abs(a - b) for a, b in zip(rank_result["losses"], reference["losses"])) < TOLERANCE
        assert abs(rank_result["heldout"] - reference["heldout"]) < TOLERANCE
        state = rank_result["state"]
        # the tied copies got the same (summed) gradient on both stages, so they stay equal
        torch.testing.assert_close(state["transformer.wte.weight"], state["lm_head.weight"], rtol=0, atol=0)
        for name, value in reference["state"].items():
            if name in state:
                torch.testing.assert_close(state[name], value, rtol=0, atol=PARAM_TOLERANCE)


@pytest.fixture(scope="module")
def two_stage_results():
    pytest.importorskip("transformers")
    runs = [{"kind": "gpt", "stages": 2, "schedule": "1f1b", "split_points": "transformer.h.2"},
            {"kind": "hf", "stages": 2, "schedule": "gpipe", "split_points": None}]
    return finished(run_workers(_worker, 2, 300, runs))


def finished(results) -> list:
    for result in results:
        assert not isinstance(result, str), result
    return [torch.load(io.BytesIO(result)) for result in results]


def test_two_stage_gpt_matches_one_process(two_stage_results):
    check_against_reference([rank[0] for rank in two_stage_results], "gpt")


def test_two_stage_gpt2_lm_head_model_matches_one_process(two_stage_results):
    assert two_stage_results[0][1]["split_points"] == ["transformer.h.2"]   # balanced over its 4 blocks
    check_against_reference([rank[1] for rank in two_stage_results], "hf")


@pytest.mark.skipif(os.environ.get("PARATRAIN_SKIP_HYBRID") == "1", reason="4 processes")
def test_hybrid_2x2_gpt_matches_one_process():
    runs = [{"kind": "gpt", "stages": 2, "replicas": 2, "schedule": "1f1b", "split_points": "transformer.h.2"}]
    results = finished(run_workers(_worker, 4, 400, runs))
    check_against_reference([rank[0] for rank in results], "gpt")


# ------------------------------------------------------------------------ the CLI

CLI_RUN = ("train", "--model", "gpt", "--dataset", "factory_example:text", "--n-layer", "2", "--n-embd", "32",
           "--n-head", "2", "--batch-size", "16", "--epochs", "1", "--json")


def cli_env():
    from conftest import REPO, clean_env
    return clean_env(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")


def test_cli_two_stage_gpt_matches_one_process():
    """13 steps, the last one short (198 windows at batch 16), clipped at norm 1 (the GPT default)."""
    from conftest import run_paratrain, summary_of
    single = summary_of(run_paratrain(*CLI_RUN, "--strategy", "local", timeout=200, env=cli_env()))
    split = summary_of(run_paratrain(*CLI_RUN, "--strategy", "pipeline", "--workers", "2",
                                     "--split-points", "transformer.h.1", timeout=300, env=cli_env()))
    assert split["steps"] == single["steps"] == 13
    assert abs(split["final_loss"] - single["final_loss"]) < TOLERANCE
    assert abs(split["heldout_loss"] - single["heldout_loss"]) < TOLERANCE


def test_cli_refuses_a_split_point_the_model_does_not_have():
    from conftest import run_paratrain
    result = run_paratrain(*CLI_RUN, "--strategy", "pipeline", "--workers", "2", "--split-points", "blocks.1",
                           timeout=120, env=cli_env())
    assert result.returncode == 2
    assert "split point 'blocks.1' is not a module of GPT (names look like transformer.h.0, transformer.h.1)" \
        in result.stderr


def test_cli_two_stage_gpt_resumes_in_the_same_layout_bitwise(tmp_path):
    from conftest import run_paratrain, summary_of
    run = (*CLI_RUN, "--strategy", "pipeline", "--workers", "2")
    straight = summary_of(run_paratrain(*run, "--epochs", "2", "--checkpoint-dir", str(tmp_path / "a"),
                                        timeout=300, env=cli_env()))
    summary_of(run_paratrain(*run, "--checkpoint-dir", str(tmp_path / "b"), timeout=300, env=cli_env()))
    resumed = summary_of(run_paratrain(*run, "--epochs", "2", "--checkpoint-dir", str(tmp_path / "b"), "--resume",
                                       timeout=300, env=cli_env()))
    from paratrain.train.checkpoint import manifest_shards
    assert manifest_shards(tmp_path / "b") == ["stage0", "stage1"]   # one sealed checkpoint per stage
    assert resumed["param_checksum"] == straight["param_checksum"] and resumed["steps"] == straight["steps"] == 26
