"""Evaluate a checkpoint on one split: the report's contract, its metrics, its figures and the stage."""
