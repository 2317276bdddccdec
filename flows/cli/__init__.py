"""The `train-food` console script: one subcommand per stage, flags generated from the stage configs."""
