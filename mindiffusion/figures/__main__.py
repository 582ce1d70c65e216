"""python -m mindiffusion.figures: see command.py's docstring."""
from mindiffusion.figures.command import main

if __name__ == "__main__":
    main()
