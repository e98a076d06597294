"""The suite on many kernels: run a selection on each (the host directly, the others under QEMU),
collect one cell per (case, kernel), write the table as text, JSON and HTML, and check the known
issues' kernel ranges against what the cells show.

cells     JUnit XML + KTAP header -> {case: Cell} for one kernel
run       run the selection on each kernel into results/matrix/<kernel>/
report    the table: text, JSON, a static HTML page
known     known-issues.toml entries whose kernel range disagrees with the cells
"""
