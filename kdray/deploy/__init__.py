"""From a trained student to a deployed one: the branch to ship, an export folder (program, state
dict, ``export.json``) with its accuracy re-checked and its latency measured, and the MLflow champion."""
