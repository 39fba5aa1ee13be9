"""Evaluation of a run: the downstream classifier, features, metrics, probes and the HTML report."""
