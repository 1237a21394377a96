"""Tuning: search launch configs on this GPU, check them against the reference, save the table.

Modules, bottom to top: budget (time limit, progress), timing (profiler, CUDA graphs),
workloads (random inputs and runnable passes), compile (ahead-of-time variant compiles), verify
(reference checks), search (the search itself: `tune` and `warm_build`). Each imports only the
ones before it. This package imports none of them itself, so the runtime can use the lower ones
(the decode cache's occupancy probe records launches with `compile.recording`) without pulling
in the search.
"""
