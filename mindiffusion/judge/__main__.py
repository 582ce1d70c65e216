"""python -m mindiffusion.judge: see the package's docstring."""
from mindiffusion.judge.command import main

if __name__ == "__main__":
    main()
