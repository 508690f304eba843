"""Benchmarks: the main job (python -m resnet_fused.bench) and its suites."""
