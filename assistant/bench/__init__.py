"""Benchmarks run from ``somnus bench``: how good a model is, and how fast each engine serves it."""
