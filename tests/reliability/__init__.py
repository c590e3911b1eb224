"""Fault, load and bad-input suites (issue 7). Figures go to test-artifacts/reliability-*.json.

See docs/reliability.md for what each scenario proves and the measured results.
"""
