"""Training and sampling speed of the notes' setups, with each speed knob alone.

    python -m mindiffusion.bench --device cuda --json bench.json
    python -m mindiffusion.bench --device cpu --quick --knobs default,channels_last

Run it from the repository's root. The setups, in this order: CIFAR-10's NaiveUnet
at 32x32, MNIST's DummyEpsModel at 28x28, CelebA's NaiveUnet at 128x128, and the
small NaiveUnet of the trainer's mnist --laptop at 32x32, each at the notes' batch size.

Rows of each setup:
  train  images per second of the bare training step, on random batches already on
         the device: default (the notes' float32, Adam's foreach implementation),
         then each knob alone: bf16, fp16 (with a GradScaler), channels_last,
         compile, fused_adam, tf32 (matmuls; CUDA only); fast, the knobs --fast
         turns on for this device; best, the knobs that each reached 1.03x the
         default alone, together
  sample seconds per step of the sampler on the setup's grid: default (eager),
         compile, cuda_graphs (torch.compile's reduce-overhead mode; CUDA only)
  loop   images per second of the trainer itself, run in-process on fake
         data, read off its record's second epoch: loop_default, loop_fast (with
         the --fast flags), loop_ema (loop_default with --ema 0.999); the ratio is
         to the bare step of the same knobs, the cost of the real loop
Each train ratio is to the default; a sample ratio is the default's seconds over
the row's. A knob that fails is a row that says why. The first steps of each row
are not timed: they allocate memory, tune kernels and compile.

The rows come in three passes over the setups, so that a run cut short by a time
limit has measured the fast path of every setup: the default and fast train rows;
the default sample row and the one of `mindiffusion.sample --compile` on the device
(cuda_graphs on CUDA, compile elsewhere); then the rest, setup by setup. At the end
the tables come again, each setup's rows together.

--quick is a look of about a minute on a small CPU: is this machine set up right, and
which knobs pay here? Tiny batches, every setup's default rows, and the knobs and
the loop on the first setup alone; it leaves out, and lists, the rows that wait for
the compiler or that the device emulates.

The package: setups.py (the setups and row names), speeds.py (how a speed is
measured), rows.py (which rows, in what order), report.py (the tables and the JSON)
and command.py (the command line).
"""
