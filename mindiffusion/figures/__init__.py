"""python -m mindiffusion.figures: the lesson's figures, as PNGs to drop into slides.

command.py holds the command (its docstring lists the figures), lesson.py the
figures of DDPM itself, and deterministic.py those that only DDIM's deterministic
walk draws.
"""
