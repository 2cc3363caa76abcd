"""`launcher export`: the same plan that `up` runs, written for another orchestrator."""
