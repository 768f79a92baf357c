"""``python -m cejax.jobs.sweep``: the sweep job's command line (``cejax.jobs.sweep.main``)."""

from cejax.jobs.sweep import main

main()
