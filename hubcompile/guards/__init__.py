"""The guards: a replacement is kept only where it computes what the model's code
computes (numerical.py, per match, at compile time) and only where the graph then runs no
slower than under plain Inductor (performance.py, per graph and family, at the first call)."""
