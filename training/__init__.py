"""Router training on the rewritten graph (installed as ``fluxc.training``; see issue 5).

Depends on ``fluxc.ops`` and the router only, never on the passes' internals.
"""
