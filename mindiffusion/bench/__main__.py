"""python -m mindiffusion.bench: see the package's docstring."""
from mindiffusion.bench.command import main

if __name__ == "__main__":
    main()
