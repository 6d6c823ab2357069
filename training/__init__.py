"""Router training on the rewritten graph (installed as ``fluxc.training``).

Depends on the public API and ``fluxc.ops`` (router, recorder), never on the passes' internals.
"""

from fluxc.training.trainer import RouterTrainer, SparsityLagrangian, TrainConfig, lm_loss, temperature

__all__ = ["RouterTrainer", "SparsityLagrangian", "TrainConfig", "lm_loss", "temperature"]
