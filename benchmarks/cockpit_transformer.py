"""Whether Cockpit's "economy" configuration can watch peers.py's transformer language model at all.

Cockpit computes its quantities from BackPACK's per-example gradients, and BackPACK extends only the modules
it knows; the transformer has LayerNorm and attention as functional ops. This script extends the model
and the loss as Cockpit asks, runs steps under Cockpit, and prints either the step time or how the first
step failed. Run it in the Cockpit venv (see BENCHMARKS.md):

    benchmarks/.venv-cockpit/bin/python -W ignore benchmarks/cockpit_transformer.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402


def main() -> int:
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils import schedules
    from cockpit.utils.configuration import configuration

    torch.set_num_threads(1)
    model, opt, batch = peers.lm_task("cpu")
    model = extend(model)
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    per_example = torch.nn.CrossEntropyLoss(reduction="none")
    cockpit = Cockpit(list(model.parameters()), quantities=configuration("economy", track_schedule=schedules.linear(1)))
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x, y = batch(g)
        logits, targets = model(x).reshape(-1, peers.LM_VOCAB), y.reshape(-1)
        loss = loss_fn(logits, targets)
        opt.zero_grad()
        start = time.process_time()
        info = {"batch_size": logits.shape[0], "individual_losses": per_example(logits, targets), "loss": loss,
                "optimizer": opt}
        try:
            with cockpit(step, info=info):
                loss.backward(create_graph=cockpit.create_graph(step))
        except Exception as error:  # what Cockpit raises is the finding
            cause = error.__context__ or error
            print(f"step {step}: Cockpit failed: {type(error).__name__}: {error} "
                  f"(while handling {type(cause).__name__}: {cause})")
            without = [n for n, p in model.named_parameters() if getattr(p, "grad_batch", None) is None]
            print(f"parameters BackPACK gave no per-example gradient: {len(without)} of "
                  f"{len(list(model.parameters()))}, e.g. {', '.join(without[:4])}")
            return 1
        opt.step()
        print(f"step {step}: {time.process_time() - start:.3f} s of backward under Cockpit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
