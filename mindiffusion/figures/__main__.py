"""python -m mindiffusion.figures: see command.py's docstring."""
from mindiffusion.figures.command import main
from mindiffusion.training.flags import run_command

if __name__ == "__main__":
    run_command(main, "python -m mindiffusion.figures")
