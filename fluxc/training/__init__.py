"""Router training on the rewritten graph (installed as ``fluxc.training``).

Depends on the public API and ``fluxc.ops`` (router, recorder), never on the passes' internals.
`train` and `evaluate` are what `fluxc train` and `fluxc eval` run; matplotlib is imported only to draw
the evaluation heatmap.
"""

from fluxc.training.config import DataSpec, EvalSpec, ModelSpec, RunConfig, RunSpec, load_run_config
from fluxc.training.evaluation import evaluate
from fluxc.training.run import train
from fluxc.training.trainer import RouterTrainer, SparsityLagrangian, TrainConfig, lm_loss, temperature

__all__ = ["DataSpec", "EvalSpec", "ModelSpec", "RouterTrainer", "RunConfig", "RunSpec", "SparsityLagrangian",
           "TrainConfig", "evaluate", "lm_loss", "load_run_config", "temperature", "train"]
