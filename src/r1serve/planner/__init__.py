"""The hardware planner behind `r1serve hw`: what serving a model costs on each chip.

catalog (chips and families, accelerators.toml), chip (sourced figures, calibration), cpu
(this machine as a chip), model (a checkpoint's shape as the roofline sees it), roofline
(one step on one device), plan (layouts, batches, the prefill/decode split), validation
(against published deployments), report (tables, JSON, chart), measure (the local engine
against peaks measured on the spot), cli (the `hw` subcommands).
"""
