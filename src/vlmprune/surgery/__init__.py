"""The cut: apply a PruningPlan to a model in place (``apply``) and keep rows/columns of a linear
layer (``rows``). It stands below the stage runners and the planners and knows nothing of them."""
