"""Fault-injection suite (issue #10, Build item 2) on the single-node topology."""
