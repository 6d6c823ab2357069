"""Worker of test_ddp_world_sizes: `fluxc train` in which process 1 hangs at step 2 (a stuck rank), so process 0
waits in a collective until run.collective_timeout_s. argv: the `fluxc train` arguments."""

import sys
import time

import fluxc.cli
import fluxc.training.run as run

real = run.training_batch


def stuck_batch(cfg, tokenizer, step, rank=0, world=1):
    if rank == 1 and step == 1:
        print(f"rank {rank}: hanging at step {step + 1}", flush=True)
        time.sleep(600)
    return real(cfg, tokenizer, step, rank, world)


run.training_batch = stuck_batch
sys.exit(fluxc.cli.main(sys.argv[1:]))
