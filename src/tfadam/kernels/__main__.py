"""``python -m tfadam.kernels``: which CPU kernels run here, and the levels this CPU runs."""

from . import native, which


def main() -> None:
    print(f"tfadam CPU kernels: {which()}")
    print(f"x86-64 levels this CPU runs: {', '.join(native.cpu_levels()) or 'none'}")


if __name__ == "__main__":
    main()
