"""python -m mindiffusion.judge: see the package's docstring."""
from mindiffusion.judge.command import main
from mindiffusion.training.flags import run_command

if __name__ == "__main__":
    run_command(main, "python -m mindiffusion.judge")
