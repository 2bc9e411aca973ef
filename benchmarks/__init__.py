"""Side-by-side benchmarks of the appliance and the software users would otherwise run.

Run them all with ``python -m benchmarks`` (see benchmarks/README.md); they are not part of
the test pass. Results go to ``benchmarks/results/`` as Markdown and JSON.
"""
