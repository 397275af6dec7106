"""Benchmark programs behind `rnq-ep bench ...`: each prints ratios against a baseline run alongside."""
