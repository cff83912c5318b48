"""Derived artifacts, trained through the graph forward (graph/training.py): the distilled draft
(draft.py), from the one data pipeline of the target's own generations (data.py). Above runtime:
nothing in kernels/graph/loaders/runtime imports this package."""
