"""Worker for test_training's two-process gloo run (launched by torch.distributed.run)."""

import sys

import torch
import torch.distributed as dist

import fluxc
from fluxc.training import RouterTrainer, TrainConfig

from hf_models import tiny_model

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(100 + rank)  # different router init and Gumbel noise per rank: rank 0's routers are broadcast
model = tiny_model("llama", "sdpa", layers=2)
cfg = fluxc.FluxConfig(sink=2, window=4, block=2, router_hidden=(16, 16, 16, 8), pool_size=4)
trainer = RouterTrainer(model, cfg, TrainConfig(steps=3, router_lr=1e-2, lambda_lr=5e-2,
                                                targets={"holistic": 1.0, "retrieval": 0.0}))
g = torch.Generator().manual_seed(rank)  # each rank sees its own data
for _ in range(3):
    ids = torch.randint(1, 128, (2, 12), generator=g)
    trainer.step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                  "task": ["holistic", "retrieval"]})
flat = torch.cat([p.detach().flatten() for p in trainer.module.routers.parameters()] +
                 [trainer.penalty.lambda1.detach()])
gathered = [torch.empty_like(flat) for _ in range(2)]
dist.all_gather(gathered, flat)
if rank == 0:
    same = torch.equal(gathered[0], gathered[1])
    with open(sys.argv[1], "w") as fh:
        fh.write(f"same={same} lambda={trainer.penalty.lambda1.tolist()}\n")
dist.destroy_process_group()
