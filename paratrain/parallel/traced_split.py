"""Pipeline stages for any ``nn.Module``, cut by torch's tracer at named modules.

:func:`trace_stages` exports the model with ``torch.export`` (the batch dimension of
its input dynamic where the model allows it) and splits the exported graph with
``torch.distributed.pipelining``'s ``Pipe`` at ``SplitPoint.BEGINNING`` of each named
module. Each stage is a plain ``nn.Module`` (a ``GraphModule``) whose parameters keep
the model's qualified names; it takes and returns tensors (a tuple when several:
GPT-2's stage 0 returns the hidden state, the batch size as an int and a bool mask).

What this module adds to torch's splitter, and why:

* ``pipeline()`` takes no ``dynamic_shapes`` and specialises every stage to the example
  micro-batch; we export ourselves and split with the private ``Pipe._from_traced``
  (the same two calls ``pipeline()`` makes). If the dynamic export fails the stages
  are traced at the example's shape and :attr:`TracedSplit.fixed_batch` says which
  micro-batch size they accept.
* ``pipeline()`` patches ``forward`` of the split modules in place: we split a deep copy.
* Tied parameters (an embedding shared with the output head) are deep-copied into each
  stage that uses them, and torch never combines their gradients: :attr:`TracedSplit.tied`
  records which stage holds which copy, so the runtime can sum the copies' gradients.
  A stage may also hold a copy under the other name that its graph never uses; those
  are listed in :attr:`TracedSplit.unused` and must not be trained.
* Stages traced in training mode keep dropout on after ``.eval()``; :func:`trace_stages`
  with ``also_eval=True`` traces an eval-mode twin whose parameters and buffers are the
  training stage's own tensors.
"""
from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass, field

import torch
from torch import nn

from paratrain.errors import ConfigError
from paratrain.parallel.pipeline import balance_by_cost

#: The largest micro-batch a stage traced with a dynamic batch accepts.
MAX_DYNAMIC_BATCH = 1 << 20


def repeated_blocks(model: nn.Module) -> tuple[str, list[str]]:
    """The qualified name of the model's largest ``nn.ModuleList`` (most children, then
    most parameters) and the names of its children: the repeated blocks."""
    best, best_key = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            key = (len(module), sum(p.numel() for p in module.parameters()))
            if best_key is None or key > best_key:
                best, best_key = name, key
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks to balance over; "
                          "give --split-points (qualified module names)")
    blocks = model.get_submodule(best)
    return best, [f"{best}.{index}" for index in range(len(blocks))]


def auto_split_points(model: nn.Module, num_stages: int) -> list[str]:
    """``num_stages - 1`` split points: the repeated blocks (:func:`repeated_blocks`)
    cut into runs of about equal parameter count; each name is the first block of a
    stage after the first. Embeddings and the head are not counted."""
    _, names = repeated_blocks(model)
    if not 1 <= num_stages <= len(names):
        raise ConfigError(f"stages={num_stages} must be between 1 and the model's {len(names)} repeated blocks")
    costs = [sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names]
    counts = balance_by_cost(costs, num_stages)
    starts, index = [], 0
    for count in counts[:-1]:
        index += count
        starts.append(names[index])
    return starts


def parse_split_points(text: str | None) -> list[str] | None:
    """``"a.b,c.d"`` -> ``["a.b", "c.d"]``; ``None``, ``""`` or ``"auto"`` -> None (balance automatically)."""
    if text is None or text.strip() in ("", "auto"):
        return None
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise ConfigError(f"split_points={text!r} has an empty name; give comma-separated module names")
    return names


def check_split_points(model: nn.Module, split_points, num_stages: int) -> list[str]:
    """The split points to use (``None``: automatic), after checking that there are
    ``num_stages - 1`` of them, each a module of ``model``, distinct and in forward order
    of the model's module tree. Starts nothing."""
    if split_points is None:
        return auto_split_points(model, num_stages)
    points = list(split_points)
    if len(points) != num_stages - 1:
        raise ConfigError(f"split_points={points} names {len(points)} modules; {num_stages} stages need "
                          f"{num_stages - 1}")
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    for name in points:
        if name not in order or name == "":
            raise ConfigError(f"split point {name!r} is not a module of {type(model).__name__} "
                              f"(names look like {_example_names(model)})")
    if len(set(points)) != len(points) or [order[n] for n in points] != sorted(order[n] for n in points):
        raise ConfigError(f"split_points={points} must be distinct and in the model's module order")
    return points


def _example_names(model: nn.Module) -> str:
    try:
        return ", ".join(repeated_blocks(model)[1][:2])
    except ConfigError:
        return ", ".join(name for name, _ in list(model.named_children())[:2])


@dataclass
class TiedGroup:
    """One parameter the model uses in several stages: ``names[stage]`` is that stage's
    name for its copy (absent where the stage holds none)."""

    names: dict[int, str]

    @property
    def stages(self) -> list[int]:
        return sorted(self.names)


@dataclass
class TracedSplit:
    """The result of :func:`trace_stages`.

    ``stages[i]``: stage ``i``'s module (training mode); ``eval_stages[i]``: its eval-mode
    twin sharing its tensors (the training stage itself where none was traced);
    ``input_is_int[i]``: per input of stage ``i``, whether the graph takes a Python int
    there (sent between processes as a 0-d int64 tensor); ``tied``; ``unused[i]``: names of
    stage ``i``'s parameters its graph never uses; ``fixed_batch``: None when the batch
    dimension is dynamic, else the only micro-batch size the stages accept."""

    split_points: list[str]
    stages: list[nn.Module]
    eval_stages: list[nn.Module]
    input_is_int: list[tuple[bool, ...]]
    tied: list[TiedGroup] = field(default_factory=list)
    unused: list[set[str]] = field(default_factory=list)
    fixed_batch: int | None = None

    def trainable(self, stage: int) -> list[nn.Parameter]:
        """Stage ``stage``'s parameters that its graph uses (what its optimizer steps)."""
        return [p for name, p in self.stages[stage].named_parameters() if name not in self.unused[stage]]


def trace_stages(model: nn.Module, example_input: torch.Tensor, split_points, num_stages: int, *,
                 dynamic_batch: bool = True, also_eval: bool | None = None) -> TracedSplit:
    """Cut ``model`` into ``num_stages`` stages at ``split_points`` (qualified module
    names, each starting a stage; ``None``: :func:`auto_split_points`).

    ``example_input``: one input batch of the model's only positional argument (its
    batch dimension first; its size does not matter with a dynamic batch, but must be
    at least 2, as export specialises sizes 0 and 1). ``also_eval``: trace an eval-mode
    twin as well; default: when the model has a module whose behaviour changes in eval
    mode (dropout with p > 0, batch norm). ``model`` itself is not modified.
    """
    points = check_split_points(model, split_points, num_stages)
    if also_eval is None:
        also_eval = _mode_dependent(model)
    example = _example_of_two(example_input) if dynamic_batch else example_input
    was_training = model.training
    try:
        pipe, fixed = _split(model.train(), example, points, dynamic_batch)
        stages = [pipe.get_stage_module(i) for i in range(pipe.num_stages)]
        eval_stages = stages
        if also_eval:
            eval_pipe, _ = _split(model.eval(), example, points, fixed is None)
            eval_stages = [eval_pipe.get_stage_module(i).eval() for i in range(eval_pipe.num_stages)]
            for train_stage, eval_stage in zip(stages, eval_stages):
                _share_tensors(train_stage, eval_stage)
    finally:
        model.train(was_training)
    if len(stages) != num_stages:
        raise ConfigError(f"split points {points} gave {len(stages)} stages, expected {num_stages}")
    _check_chain(pipe.split_gm, len(stages))
    tied = [TiedGroup({int(sub.rsplit("_", 1)[1]): name for sub, name in group.items()})
            for group in pipe.replicated_params]
    unused = [set() for _ in stages]
    for group in tied:
        every_name = set(group.names.values())
        for index, stage in enumerate(stages):
            unused[index] |= {n for n, _ in stage.named_parameters() if n in every_name
                              and group.names.get(index) != n}
    return TracedSplit(split_points=points, stages=stages, eval_stages=eval_stages,
                       input_is_int=[_input_kinds(s) for s in stages], tied=tied, unused=unused,
                       fixed_batch=fixed)


def _split(model: nn.Module, example: torch.Tensor, points: list[str], dynamic: bool):
    """(Pipe, fixed micro-batch size or None) for a deep copy of ``model``."""
    from torch.distributed.pipelining import SplitPoint
    from torch.distributed.pipelining._IR import MultiUseParameterConfig, Pipe, annotate_split_points
    copied = copy.deepcopy(model)
    annotate_split_points(copied, {name: SplitPoint.BEGINNING for name in points})
    program, fixed = None, None
    if dynamic:
        argument = next(iter(inspect.signature(copied.forward).parameters))
        batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
        try:
            program = torch.export.export(copied, (example,), dynamic_shapes={argument: {0: batch}})
        except Exception:  # the model fixes its batch somewhere: fall back to the example's shape
            program = None
    if program is None:
        fixed = int(example.shape[0])
        try:
            program = torch.export.export(copied, (example,))
        except Exception as error:
            raise ConfigError(f"torch.export cannot capture {type(model).__name__} as one graph "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); a traced "
                              "pipeline needs a model without graph breaks") from error
    return Pipe._from_traced(copied, program, MultiUseParameterConfig.REPLICATE), fixed


def _check_chain(split_gm, num_stages: int) -> None:
    """Every stage must take exactly the previous stage's outputs, in order (stage 0:
    the model's inputs); a value skipping a stage is not supported."""
    nodes = {n.name: n for n in split_gm.graph.nodes}
    for stage in range(1, num_stages):
        call = nodes[f"submod_pp_{stage}"]
        previous = nodes[f"submod_pp_{stage - 1}"]
        args = list(call.args)
        direct = args == [previous]
        indexed = all(a.target is operator.getitem and a.args == (previous, i) for i, a in enumerate(args)) \
            and len(previous.users) == len(args)
        if not (direct or indexed):
            raise ConfigError(f"stage {stage} takes values that do not all come from stage {stage - 1} in order; "
                              "choose split points where the model's data flow is a chain")


def _input_kinds(stage: nn.Module) -> tuple[bool, ...]:
    kinds = []
    for node in stage.graph.nodes:
        if node.op == "placeholder":
            kinds.append(isinstance(node.meta.get("val"), (int, torch.SymInt)))
    return tuple(kinds)


def _example_of_two(example: torch.Tensor) -> torch.Tensor:
    """An example of batch 2 (export specialises a dimension of size 0 or 1)."""
    if example.shape[0] >= 2:
        return example[:2]
    return torch.cat([example[:1], example[:1]])


def _mode_dependent(model: nn.Module) -> bool:
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return True
    return False


def _share_tensors(source: nn.Module, target: nn.Module) -> None:
    """Make ``target``'s parameters and buffers ``source``'s objects (same names)."""
    sources = dict(source.named_parameters(remove_duplicate=False))
    buffers = dict(source.named_buffers(remove_duplicate=False))
    for name, _ in list(target.named_parameters(remove_duplicate=False)):
        parent, leaf = _parent(target, name)
        parent.register_parameter(leaf, sources[name])
    for name, _ in list(target.named_buffers(remove_duplicate=False)):
        parent, leaf = _parent(target, name)
        parent.register_buffer(leaf, buffers[name], persistent=leaf not in parent._non_persistent_buffers_set)


def _parent(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf
