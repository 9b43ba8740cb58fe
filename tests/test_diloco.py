"""DiLoCo and Streaming DiLoCo: pure plans, and real gloo workers against references
computed by hand in this process (plain loops, no DiLoCoSync)."""
import traceback

import pytest
import torch

from conftest import cli_in_process, in_background, run_paratrain, run_workers, summary_of
from paratrain.errors import ConfigError
from paratrain.parallel.diloco import DiLoCoConfig, DiLoCoSync, fragment_ranges, pieces_of, sync_points

WORLD, BATCH, INNER_LR = 2, 8, 0.1

# name -> (DiLoCoConfig options, inner optimizer, steps)
CASES = {
    "h1_sgd_lr1": (dict(sync_every=1, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0), "sgd", 5),
    "h3_nesterov_adam": (dict(sync_every=3, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9), "adam", 7),
    "h4_f2_streaming": (dict(sync_every=4, fragments=2, outer_optimizer="nesterov", outer_lr=0.7,
                             outer_momentum=0.9), "sgd", 7),
    "h4_f1": (dict(sync_every=4, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9), "sgd", 7),
    "h2_quant8": (dict(sync_every=2, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9,
                       compression="quant:8"), "sgd", 6),
    "h2_plain": (dict(sync_every=2, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9), "sgd", 6),
}


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def batch(rank: int, step: int):
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, 5, generator=generator), torch.randn(BATCH, 2, generator=generator)


def sum_loss(model, x, y):
    return ((model(x) - y) ** 2).sum()


def inner_optimizer(name: str, model):
    cls = torch.optim.Adam if name == "adam" else torch.optim.SGD
    return cls(model.parameters(), lr=INNER_LR)


def flat(model) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


# --------------------------------------------------------------------------- reference

def nesterov_step(weights, grad, buf, *, lr, momentum, nesterov):
    """SGD with (Nesterov) momentum written out: buf = m buf + g; w -= lr (g + m buf)."""
    if momentum:
        buf.mul_(momentum).add_(grad)
        grad = grad + momentum * buf if nesterov else buf
    weights.sub_(lr * grad)


def simulate(options: dict, inner: str, steps: int):
    """Every worker in one process: inner steps, and at each fragment's sync point the
    mean pseudo-gradient through the outer rule; streaming fragments are applied
    ``period - 1`` steps after launch and merged half way. Returns each worker's flat
    parameters after every step, and after the final consolidation."""
    config = DiLoCoConfig(**options)
    models = [make_model(0) for _ in range(WORLD)]
    optimizers = [inner_optimizer(inner, m) for m in models]
    numel = flat(models[0]).numel()
    bounds = [numel * i // config.fragments for i in range(config.fragments + 1)]
    frags = list(zip(bounds[:-1], bounds[1:]))
    global_w = flat(models[0])
    bufs = [torch.zeros(b - a) for a, b in frags]
    period, delay = config.sync_every // config.fragments, config.period - 1 if config.fragments > 1 else 0
    nesterov = config.outer_optimizer == "nesterov"
    pending = {}   # apply step -> (fragment, mean pseudo-gradient)

    def outer(fragment, mean, merge):
        a, b = frags[fragment]
        nesterov_step(global_w[a:b], mean, bufs[fragment], lr=config.outer_lr, momentum=config.outer_momentum,
                      nesterov=nesterov)
        for model in models:
            local = flat(model)
            local[a:b] = 0.5 * local[a:b] + 0.5 * global_w[a:b] if merge else global_w[a:b]
            torch.nn.utils.vector_to_parameters(local, model.parameters())

    history = []
    for step in range(1, steps + 1):
        for rank, (model, optimizer) in enumerate(zip(models, optimizers)):
            sum_loss(model, *batch(rank, step)).div(BATCH).backward()
            optimizer.step()
            optimizer.zero_grad()
        if step in pending:
            outer(*pending.pop(step), merge=True)
        if step % period == 0:
            fragment = (step // period - 1) % config.fragments
            a, b = frags[fragment]
            mean = sum(global_w[a:b] - flat(m)[a:b] for m in models) / WORLD
            if delay:
                pending[step + delay] = (fragment, mean)
            else:
                outer(fragment, mean, merge=False)
        history.append([flat(m) for m in models])
    assert not pending
    if steps % config.sync_every or config.fragments > 1:
        means = [sum(global_w[a:b] - flat(m)[a:b] for m in models) / WORLD for a, b in frags]
        for fragment, mean in enumerate(means):
            outer(fragment, mean, merge=False)
    return history, [flat(m) for m in models]


# --------------------------------------------------------------------------- workers

def _init(rank, world, port):
    torch.set_num_threads(1)
    from datetime import timedelta
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=30))


def run_case(rank, options, inner, steps, *, start=None, first_step=1):
    """Train with DiLoCoSync as the Trainer drives it; return per-step parameters, the
    consolidated ones, and bytes sent after each step."""
    world = torch.distributed.get_world_size()
    model = make_model(0 if rank == 0 else 100 + rank)   # others differ: attach must broadcast rank 0's
    sync = DiLoCoSync(DiLoCoConfig(timeout_s=30, **options))
    if start is not None:
        model.load_state_dict(start["model"])
    sync.attach(list(model.parameters()))
    if start is not None:
        sync.load_state_dict(start["sync"])
    optimizer = inner_optimizer(inner, model)
    history, sent = [], []
    for step in range(first_step, first_step + steps):
        sum_loss(model, *batch(rank, step)).backward()
        sync.reduce(1.0 / (BATCH * world))     # the Trainer's scale: 1 / global batch
        optimizer.step()
        sync.after_step()
        optimizer.zero_grad()
        history.append(flat(model).tolist())
        sent.append(sync.bytes_sent)
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "sync": sync.state_dict()}
    sync.consolidate()
    final = flat(model).tolist()
    sync.close()
    return {"history": history, "final": final, "sent": sent, "payload": sync.payload_bytes,
            "outer_steps": sync.outer_steps}, state


def cases_worker(rank, world, port, queue):
    try:
        _init(rank, world, port)
        results = {name: run_case(rank, *case)[0] for name, case in CASES.items()}
        torch.distributed.destroy_process_group()
        queue.put((rank, results))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.fixture(scope="module")
def case_results():
    results = run_workers(cases_worker, WORLD, 240)
    for rank, result in enumerate(results):
        assert isinstance(result, dict), f"rank {rank} failed:\n{result}"
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["h1_sgd_lr1", "h3_nesterov_adam", "h4_f2_streaming", "h4_f1", "h2_plain"])
def test_workers_match_the_hand_computed_reference(case_results, name):
    history, final = simulate(*CASES[name])
    for rank, result in enumerate(case_results):
        mine = result[name]
        for step, (got, want) in enumerate(zip(mine["history"], history), start=1):
            assert torch.allclose(torch.tensor(got), want[rank], atol=1e-5), (name, rank, step)
        assert torch.allclose(torch.tensor(mine["final"]), final[rank], atol=1e-5), (name, rank)
    assert case_results[0][name]["final"] == case_results[1][name]["final"]   # one model after consolidate


@pytest.mark.timeout(300)
def test_h1_outer_sgd_lr1_is_allreduce_averaging(case_results):
    """H=1, outer SGD lr 1: every step is a plain average of the models, i.e. SGD on
    the allreduce-averaged gradient from the same start."""
    model = make_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    for step in range(1, CASES["h1_sgd_lr1"][2] + 1):
        for rank in range(WORLD):
            sum_loss(model, *batch(rank, step)).div(BATCH * WORLD).backward()
        optimizer.step()
        optimizer.zero_grad()
        for result in case_results:
            assert torch.allclose(torch.tensor(result["h1_sgd_lr1"]["history"][step - 1]), flat(model), atol=1e-5)


@pytest.mark.timeout(300)
def test_streaming_sends_one_fragment_per_sync_point(case_results):
    """F=2: each sync point sends half of what plain DiLoCo's sync sends."""
    def per_step(sent):
        return [b - a for a, b in zip([0] + sent[:-1], sent)]
    streaming = per_step(case_results[0]["h4_f2_streaming"]["sent"])
    plain = per_step(case_results[0]["h4_f1"]["sent"])
    assert [s > 0 for s in streaming] == [False, True, False, True, False, True, False]   # launched at 2, 4, 6
    assert [s > 0 for s in plain] == [False, False, False, True, False, False, False]
    assert max(streaming) * 2 == max(plain)
    assert case_results[0]["h4_f2_streaming"]["outer_steps"] == 3 + 2   # 3 in the loop, 2 consolidating


@pytest.mark.timeout(300)
def test_quantised_pseudo_gradients_stay_close_and_send_less(case_results):
    quant, plain = case_results[0]["h2_quant8"], case_results[0]["h2_plain"]
    assert quant["payload"] < plain["payload"] / 3
    difference = (torch.tensor(quant["final"]) - torch.tensor(plain["final"])).abs().max()
    assert 0 < difference < 2e-2
    assert case_results[1]["h2_quant8"]["final"] == quant["final"]


def resume_worker(rank, world, port, queue):
    """4 steps, save the outer state at a sync point, 4 more: against a fresh start
    from the saved state (exact), and from the model alone (outer momentum lost)."""
    try:
        _init(rank, world, port)
        options = CASES["h2_plain"][0]
        first, state = run_case(rank, options, "sgd", 4)
        straight, _ = run_case(rank, options, "sgd", 8)
        resumed, _ = run_case(rank, options, "sgd", 4, start=state, first_step=5)
        model_only, _ = run_case(rank, options, "sgd", 4, start={"model": state["model"], "sync": {
            **state["sync"], "outer_optimizers": [{"state": {}, "param_groups": o["param_groups"]}
                                                  for o in state["sync"]["outer_optimizers"]]}}, first_step=5)
        torch.distributed.destroy_process_group()
        queue.put((rank, {"straight": straight["final"], "resumed": resumed["final"],
                          "model_only": model_only["final"], "momentum_saved": bool(
                              state["sync"]["outer_optimizers"][0]["state"])}))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.mark.timeout(200)
def test_outer_state_survives_a_checkpoint():
    results = run_workers(resume_worker, WORLD, 150)
    for rank, result in enumerate(results):
        assert isinstance(result, dict), f"rank {rank} failed:\n{result}"
        assert result["momentum_saved"]
        assert result["resumed"] == result["straight"], rank
        assert result["model_only"] != result["straight"], rank


@pytest.mark.timeout(400)
def test_cli_resume_continues_the_outer_optimizer(tmp_path):
    """2 epochs straight vs 1 epoch, then --resume for the second: one checksum.
    Inner SGD without momentum: only rank 0's inner state is checkpointed."""
    common = ["train", "--workers", "2", "--strategy", "diloco", "--model", "mlp", "--sync-every", "4",
              "--momentum", "0", "--json", "--no-progress", "--seed", "3"]
    straight = in_background(run_paratrain, *common, "--epochs", "2", timeout=180)
    directory = str(tmp_path / "ck")
    summary_of(run_paratrain(*common, "--epochs", "1", "--checkpoint-dir", directory, timeout=180))
    resumed = summary_of(run_paratrain(*common, "--epochs", "2", "--checkpoint-dir", directory, "--resume",
                                       timeout=180))
    assert resumed["param_checksum"] == summary_of(straight.result())["param_checksum"]
    assert resumed["strategy"] == "diloco"


# --------------------------------------------------------------------------- pure

def test_sync_points_stagger_fragments_and_apply_after_the_overlap():
    config = DiLoCoConfig(sync_every=8, fragments=4)    # period 2, overlap 1
    plan = {step: sync_points(step, config) for step in range(1, 11)}
    assert [plan[s][0] for s in range(1, 11)] == [None, 0, None, 1, None, 2, None, 3, None, 0]
    assert [plan[s][1] for s in range(1, 11)] == [None, None, 0, None, 1, None, 2, None, 3, None]
    plain = DiLoCoConfig(sync_every=3)
    assert plain.overlap_steps == 0
    assert [sync_points(s, plain) for s in (1, 3, 6)] == [(None, None), (0, 0), (0, 0)]


def test_fragments_cut_the_flat_parameters_evenly():
    assert fragment_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert pieces_of([4, 2, 6], 3, 8) == [(0, 3, 1), (1, 0, 2), (2, 0, 2)]
    with pytest.raises(ConfigError, match="only 2 parameters"):
        fragment_ranges(2, 3)


@pytest.mark.parametrize("options, match", [
    (dict(sync_every=0), "sync_every"), (dict(sync_every=6, fragments=4), "must divide"),
    (dict(outer_optimizer="adam"), "outer_optimizer"), (dict(outer_lr=0), "outer_lr"),
    (dict(outer_momentum=1.0), "outer_momentum"), (dict(outer_momentum=0.0), "nesterov"),
    (dict(compression="topk"), "pseudo-gradients"), (dict(compression="2bit"), "pseudo-gradients"),
    (dict(sync_every=4, fragments=2, overlap_steps=2), "overlap_steps"), (dict(merge_alpha=1.5), "merge_alpha"),
])
def test_bad_configs_are_refused_by_name(options, match):
    with pytest.raises(ConfigError, match=match):
        DiLoCoConfig(**options)


def test_single_worker_never_talks_and_keeps_its_model_at_sync_points():
    model = make_model(0)
    sync = DiLoCoSync(DiLoCoConfig(sync_every=2, outer_optimizer="sgd", outer_lr=1.0, outer_momentum=0.0))
    sync.attach(list(model.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    for step in range(1, 5):
        sum_loss(model, *batch(0, step)).backward()
        sync.reduce(1.0 / BATCH)
        before = flat(model)
        optimizer.step()
        sync.after_step()
        optimizer.zero_grad()
        assert not torch.equal(flat(model), before)
    assert sync.bytes_sent == 0 and sync.outer_steps == 2
    assert torch.allclose(sync.global_fragments[0], flat(model))   # outer SGD lr 1 lands on the local model


def test_cli_refuses_codecs_and_fragments_before_launch():
    for extra, match in ((["--compression", "powersgd"], "pseudo-gradients"),
                         (["--sync-every", "6", "--fragments", "4"], "--fragments 4 must divide --sync-every 6"),
                         (["--outer-lr", "0.5"], "diloco")):
        strategy = [] if extra[0] == "--outer-lr" else ["--strategy", "diloco"]
        code, _, stderr = cli_in_process("train", "--workers", "2", *strategy, *extra)
        assert code == 2, (extra, stderr[-1000:])
        assert match in stderr, (extra, stderr[-1000:])
