"""Benchmarks: optimizer-step throughput (``cpu_step``, ``gpu_step``), per-rank memory
(``memory``, ``memory_measure``, ``memory_plot``) and the convergence demo (``convergence``)."""
