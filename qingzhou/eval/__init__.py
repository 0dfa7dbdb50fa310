"""Evaluation: perplexity, the task harness (lm-eval request types), speed/memory bench, reports.

Submodules are imported on use (`from qingzhou.eval.harness import evaluate`) so that importing
this package stays torch-free."""
