"""A transformers GPT-2 trained with paratrain.fit on bytes of Python's own standard
library: dict batches, the model's own loss, clipping and a cosine schedule.

    python examples/gpt2_fit.py                                   # one process
    paratrain launch -n 2 examples/gpt2_fit.py --strategy allreduce
    paratrain launch -n 2 --servers 1 examples/gpt2_fit.py --strategy dist_sync
    torchrun --nproc-per-node 2 examples/gpt2_fit.py --strategy allreduce

Nothing is downloaded: the model is built from a small GPT2Config.
"""
from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset

import paratrain


class StdlibBytes(Dataset):
    """Windows of ``context + 1`` bytes of the stdlib's ``.py`` files (sorted, so every
    machine with this Python reads the same text), as GPT-2 wants them: a dict with
    ``input_ids`` and ``labels`` (the model shifts the labels itself)."""

    def __init__(self, context: int = 64, max_bytes: int = 60_000, skip_bytes: int = 0) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        text = bytearray()
        for path in sorted(root.glob("*.py")):
            text += path.read_bytes()
            if len(text) >= skip_bytes + max_bytes:
                break
        data = torch.frombuffer(bytearray(text[skip_bytes:skip_bytes + max_bytes]), dtype=torch.uint8).long()
        self.windows = data[:len(data) // context * context].view(-1, context)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        window = self.windows[index]
        return {"input_ids": window, "labels": window}


def build_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 64, context: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=context, n_embd=n_embd, n_layer=n_layer, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="local")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-bytes", type=int, default=60_000)
    parser.add_argument("--compression", default=None)
    parser.add_argument("--sync-every", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_gpt2()
    train = StdlibBytes(max_bytes=args.max_bytes)
    heldout = StdlibBytes(max_bytes=8_000, skip_bytes=args.max_bytes)
    options = {key: value for key, value in (("compression", args.compression), ("sync_every", args.sync_every))
               if value is not None}
    optimizer = "adamw" if args.strategy not in ("dist_async", "dist_ssp") else "adam"
    summary = paratrain.fit(model, train, heldout=heldout, strategy=paratrain.train.build_strategy(args.strategy,
                                                                                                   **options),
                            epochs=args.epochs, batch_size=args.batch_size, optimizer=optimizer,
                            optimizer_params={"lr": 3e-3}, step_fn=lambda m, b: m(**b).loss, loss_reduction="mean",
                            max_grad_norm=1.0, scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
                                opt, T_max=args.epochs * len(train) // args.batch_size))
    tied = model.lm_head.weight is model.transformer.wte.weight
    print("SUMMARY " + json.dumps({**summary, "tied": tied}), flush=True)


if __name__ == "__main__":
    main()
