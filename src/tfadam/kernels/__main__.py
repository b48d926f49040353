"""``python -m tfadam.kernels``: which CPU kernels run here, and the levels this CPU runs."""

from . import native, which

print(f"tfadam CPU kernels: {which()}")
print(f"x86-64 levels this CPU runs: {', '.join(native.cpu_levels()) or 'none'}")
