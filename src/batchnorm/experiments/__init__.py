"""Experiments that reproduce the BN paper's results, each a pure function -> results."""
