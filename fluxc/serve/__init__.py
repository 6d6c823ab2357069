"""Serving: the decode engine (`DecodeEngine`, `FluxCache`, transformers' `generate` with a FluxCache) and
`fluxc.generate`. Uses the compiled module, the ops and the router; never the pass's internals.

Importing the package imports nothing: `engine` needs transformers, which loads on first use.
"""
