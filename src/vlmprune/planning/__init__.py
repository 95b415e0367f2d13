"""Planning in one place: the plan format (``plan``, torch-free: the CLI reads plans lean), the
solvers that turn scores into a plan (``solve``), size and latency targets (``targets``) and the
depth-vs-width search (``search``). Importing this package imports no torch."""
