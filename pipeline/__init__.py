"""Orchestration: CLI, stages, config."""
