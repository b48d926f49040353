"""``python -m tfadam.kernels``: the CPU kernels here, this CPU's levels, the address reader."""

from . import addresses, native, which


def main() -> None:
    print(f"tfadam CPU kernels: {which()}")
    print(f"x86-64 levels this CPU runs: {', '.join(native.cpu_levels()) or 'none'}")
    addresses.reader(wait=True)
    print(f"tensor addresses (a reused plan's checks): {addresses.status()}")


if __name__ == "__main__":
    main()
