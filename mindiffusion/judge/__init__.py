"""A digit judge: how many of a model's MNIST samples read as digits, and which.

    python -m mindiffusion.judge contents/mnist_laptop_cond.pth   # samples it, reads
    python -m mindiffusion.judge RUN/ddpm_sample_12.png --rows-are-classes
    python -m mindiffusion.judge --train --out my_judge.pth       # trains a judge

A small classifier, trained on MNIST (half of it on grey, speckled grounds, as young
models draw digits) and on junk (static, smooth blobs, blanks, two digits at once,
digits cut up and shuffled), reads each sample, which is a grid PNG of the training
scripts or of mindiffusion.sample, or a checkpoint it samples (DDIM, eta 0). It
prints the share of samples read as a digit with at least 90% confidence; how many
distinct digits those are; the digit score, the Inception Score with this classifier,
from 1 (all alike, or all junk) to 10 (sure digits, evenly spread); for a conditional
checkpoint or a grid with a row per digit, the share drawn as the digit asked for;
and, where MNIST is at hand, the Frechet distance to its test digits in the
classifier's 128 features, which suit digits better than Inception's. Its weights
ship as contents/mnist_judge.pth.
"""
