"""The user's entry points: the Prefect flow `train-food`, its parameters, and the `train-food` console script."""
