"""Decisions under budgets as pure functions: no Ray, no gRPC (see base.py)."""
