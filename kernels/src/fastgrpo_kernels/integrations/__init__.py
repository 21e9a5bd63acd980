"""Drop-ins for other trainers. Each submodule imports its trainer's library; importing fastgrpo_kernels itself
never does (it depends on torch and triton alone)."""
