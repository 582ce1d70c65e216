"""The trainer: the notes' loop with every feature a long run needs, each a line or
an `if` on this page, in the order it runs.

    python -m mindiffusion.train mnist --laptop          # digits in minutes on a CPU
    python -m mindiffusion.train cifar10 --cond --ema 0.999
    python -m mindiffusion.train cifar10 --resume        # go on after a stop
    torchrun --nproc_per_node=4 -m mindiffusion.train cifar10   # on 4 GPUs

DATASET names a recipe: the settings of the notes' script of that name
(training/recipes.py). With no flag, the trainer trains number for number as that
script does, and writes the files it writes into --out: MNIST's grids
OUT/ddpm_sample_{epoch}.png (CIFAR-10's ddpm_sample_cifar{epoch}.png, CelebA's
ddpm_sample_celeba{epoch:03d}.png) and its checkpoint OUT/ddpm_mnist.pth
(ddpm_cifar.pth, ddpm_celeba.pth), which also holds all that --resume needs; beside
them, the record of each epoch, OUT/ddpm_mnist_log.csv. A stop signal (Ctrl-C,
SIGTERM, SLURM's SIGUSR1) saves after the step under way and stops.
"""
import contextlib
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from mindiffusion.ddpm import DDPM
from mindiffusion.training import cli, grids, signals
from mindiffusion.training.checkpoints import Checkpoint
from mindiffusion.training.data import (
    EpochOrder,
    UnreadableImage,
    class_names,
    first_of_each_class,
)
from mindiffusion.training.devices import (
    autocast_dtype,
    cuda_of,
    distribute,
    fast_settings,
    gather,
    init_processes,
    largest,
    precision_of,
    process_rank,
    resolve_device,
    say,
    shared_seed,
    split_batch,
    world_size,
)
from mindiffusion.training.files import hold_lock, output_folder, release
from mindiffusion.training.files import remove_temporaries
from mindiffusion.training.flags import UserError, as_flags
from mindiffusion.training.recipes import (
    RECIPES,
    image_size,
    load_dataset,
    make_ddpm,
    recipe_of,
    transform,
)
from mindiffusion.training.signals import Stopped, ignore_stop_signals
from mindiffusion.training.steps import Guard, averaged_copy

# under torchrun, the steps between the ranks' checks for a stop signal: a stop comes
# at most SIGNAL_EVERY - 1 steps later, and the collective is paid once in so many
SIGNAL_EVERY = 10


def main(argv: list[str] | None = None) -> None:
    """The command line: train, and end a mistake or a stop in one sentence."""
    parser, settings = cli.parse(sys.argv[1:] if argv is None else argv, __doc__)
    try:
        train(**settings)
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except Stopped as stop:
        parser.exit(128 + stop.signum, f"{stop}\n" if process_rank() == 0 else None)
    except KeyboardInterrupt:
        # a Ctrl-C while the run trains is a stop signal that saves; this one came
        # before training began or after it ended, and each save is whole or absent
        parser.exit(130, f"\ninterrupted: {settings['out']} holds what the saves "
                    f"before it wrote, each file whole\n")


def train(dataset: str, **given) -> DDPM:
    """Train on `dataset` with the settings `given`, the others the recipe's or off
    (training/cli.py), and return the DDPM trained: the command line's run, for a
    notebook or a test too."""
    args = SimpleNamespace(**cli.settings_of(dataset, **given))
    recipe = RECIPES[dataset]
    with contextlib.ExitStack() as stack:
        # torchrun's processes, each on its device and seeded with its rank
        stack.callback(lambda: dist.is_initialized() and dist.destroy_process_group())
        device = init_processes(resolve_device(args.device))
        if args.seed is not None:
            torch.manual_seed(args.seed + process_rank())
        output_folder(args.out)
        path = os.path.join(args.out, recipe.checkpoint)
        if args.resume and not os.path.exists(path):
            raise UserError(f"--resume: there is no checkpoint at {path}")
        if args.fast:
            take_fast_path(args, device)
        stack.enter_context(signals.stop_on_signals())

        tf = transform(recipe, args.eps_model)
        data = load_dataset(dataset, args.data_root, tf, args.fake_data)
        # --cond: a class for each label (an image folder's subfolders), and the null
        n_classes = len(class_names(data)) if args.cond else None
        ddpm = make_ddpm(recipe, args.eps_model, args.n_feat, args.n_T, n_classes,
                         args.p_uncond)
        ddpm.to(device)
        size = image_size(recipe, args.eps_model)
        # --per-class: the first N images of each class
        train_set = data
        if args.per_class:
            train_set = first_of_each_class(data, args.per_class)
        # --batch-size is the global batch, shared out among torchrun's ranks, each
        # of which takes its share of one order
        batch = split_batch(args.batch_size)
        # one process draws each epoch's shuffle as the notes' loader does; torchrun's
        # ranks share a seed
        seed = shared_seed(args.seed) if world_size() > 1 else None
        order = EpochOrder(train_set, batch, seed)
        dataloader = DataLoader(
            train_set, batch_size=batch, sampler=order, num_workers=args.num_workers,
            worker_init_fn=ignore_stop_signals, pin_memory=device.type == "cuda",
        )
        optim = torch.optim.Adam(ddpm.parameters(), lr=args.lr)

        if args.channels_last:
            # channels_last weights return channels_last activations
            ddpm.to(memory_format=torch.channels_last)
        # --ema: a copy whose weights follow a moving average of ddpm's
        ema = averaged_copy(ddpm, args.ema, args.ema_warmup) if args.ema else None
        if args.compile:
            # compiled in place, so that the state_dict keeps the notes' names
            ddpm.eps_model.compile()
            say("--compile: the noise model compiles in the first training step and "
                "again in the first grid, each a minute or more on a small CPU")
        # --amp: the forward's dtype; float16 scales its loss, so that small
        # gradients do not round to zero, and a disabled scaler passes all through
        dtype = autocast_dtype(args.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        say(f"training on {device} in {precision_of(dtype)}")

        if process_rank() == 0:
            # while this run lasts, no other run can take the same checkpoint
            stack.callback(release, hold_lock(path))
            for stale in remove_temporaries(path):
                say(f"removed {stale}, the temporary file of a save that a kill "
                    f"interrupted")
        settings = dict(batch_size=args.batch_size, ema=args.ema, amp=args.amp,
                        ema_warmup=args.ema_warmup, seed=args.seed,
                        dataset_size=len(train_set))
        checkpoint = Checkpoint(path, ddpm, optim, recipe_of(ddpm, data, size), ema,
                                scaler, settings, order, recipe.grids)
        start = checkpoint.resume_or_start(args.resume, args.n_epoch)
        # under torchrun, DistributedDataParallel averages the ranks' gradients
        model = distribute(ddpm, device)
        guard = Guard(optim, scaler.is_enabled())
        # the grids: of the model or its --ema average, by DDPM or DDIM
        shown = ema.module if ema is not None else ddpm
        sampler, n_sample, c_grid = grids.sampler_for(shown, args, recipe.normalize,
                                                      recipe.n_sample, device)
        # the training steps this run has taken, and the step and time of its last
        # grid, for --grid-minutes and the grid after a stop
        steps, drawn_at, drawn_clock = 0, None, time.monotonic()

        try:
            for i in range(start.epoch, args.n_epoch):
                ddpm.train()
                order.set_epoch(i)
                # a resumed epoch drew its DataLoader's seed before the save: the
                # loader draws it again from a generator of its own, not torch's
                resumed = i == start.epoch and start.batches > 0
                dataloader.generator = torch.Generator() if resumed else None
                batches = start.batches if resumed else 0
                say(f"Epoch {i} : ")
                checkpoint.record.start_epoch()

                pbar = tqdm(dataloader)
                loss_ema = None
                for x, c in pbar:
                    optim.zero_grad()
                    x = x.to(device)
                    # the labels, which only a --cond model reads
                    c = c.to(device) if args.cond else None
                    with torch.autocast(device.type, dtype, enabled=bool(dtype)):
                        loss = model(x, c)
                    # the plain loss.backward(), unless float16 scales the loss
                    scaler.scale(loss).backward()
                    # a running average, only to make the progress bar readable
                    if loss_ema is None:
                        loss_ema = loss.item()
                    else:
                        loss_ema = 0.9 * loss_ema + 0.1 * loss.item()
                    pbar.set_description(f"loss: {loss_ema:.4f}")
                    # the guard: stop if the loss or a gradient is not finite, read
                    # on the gradients as they are, unscaled
                    scaler.unscale_(optim)
                    loss_value = guard.check(loss, i, batches + 1)
                    if args.grad_clip:
                        weights = ddpm.parameters()
                        torch.nn.utils.clip_grad_norm_(weights, args.grad_clip)
                    # optim.step(); under float16, skipped if gradients overflowed
                    scaler.step(optim)
                    scaler.update()
                    if ema is not None:
                        ema.update_parameters(ddpm)
                    checkpoint.record.add(loss_value, len(x) * world_size())
                    batches, steps = batches + 1, steps + 1
                    # the epoch's last step leaves its save and grid to its end
                    if batches == order.batches_per_epoch:
                        continue
                    if args.save_every and steps % args.save_every == 0:
                        checkpoint.save(i, batches)
                    # under torchrun, the ranks meet only every SIGNAL_EVERY steps
                    if world_size() > 1 and steps % SIGNAL_EVERY:
                        continue
                    # --grid-minutes: once M minutes have passed, a grid of this
                    # step's weights, saved first; drawn from forked generators, so
                    # that the run trains the same whenever its grids come
                    minutes = (time.monotonic() - drawn_clock) / 60
                    due = bool(args.grid_minutes) and minutes >= args.grid_minutes
                    due = due and not signals.received
                    # under torchrun, the ranks meet for it only under --grid-minutes
                    if args.grid_minutes and largest(int(due)):
                        checkpoint.save(i, batches)
                        if process_rank() == 0:
                            grid = grids.step_path(recipe.grids, args.out, i, batches)
                            sampler.eval()
                            with torch.random.fork_rng(devices=cuda_of(device)):
                                grids.of_weights(
                                    sampler, c_grid, size, recipe.normalize, device,
                                    args.guide_w, grid, path, "its step",
                                    stopping(f"during the grid of epoch {i}, step "
                                             f"{batches}: saved in {path}"),
                                )
                            ddpm.train()
                        drawn_at, drawn_clock = steps, time.monotonic()
                    # a stop signal: save, unless this step is saved already, and stop
                    if signum := largest(signals.received):
                        if checkpoint.saved_at != (i, batches):
                            checkpoint.save(i, batches)
                        where = f"after epoch {i}, step {batches}: saved in {path}"
                        raise Stopped(signum, stopping(where, signum))

                # every --grid-every epochs and the last, on rank 0, unless a second
                # stop signal came, which skips it
                last = i + 1 == args.n_epoch
                due = (i + 1) % args.grid_every == 0 or last
                due = due and process_rank() == 0 and signals.count < 2
                # the notes' torch.save(ddpm.state_dict(), ...), with all --resume
                # needs, before the grid: a stop while it is drawn loses no training.
                # It keeps the random state the grid will leave, which only a walk
                # of the sampler knows, so that a resume draws what this run does
                rng = None
                if due:
                    rng = grids.random_state_after(sampler, n_sample, size, device,
                                                   c_grid, args.guide_w)
                checkpoint.save(i + 1, rng=rng)
                if due:
                    # the notes' ddpm.eval(), on what draws the grid
                    sampler.eval()
                    where = f"during the grid of epoch {i}: the epoch is saved in "
                    where += path
                    xh = grids.walk(sampler, n_sample, size, device, c_grid,
                                    args.guide_w, stopping(where), "its epoch")
                    # CIFAR-10's and CelebA's 8 real images of the last batch
                    real = x[:8] if recipe.real_in_grid else None
                    grid = grids.image(xh, real)
                    grids.write(os.path.join(args.out, recipe.grids.format(i)), grid,
                                path)
                    drawn_at, drawn_clock = steps, time.monotonic()
                # under torchrun, the other ranks wait here for rank 0's grid
                gather(None)
                signum = largest(signals.received)
                if signum and last:
                    say(f"{signals.name(signum)} came as the last epoch ended: the run "
                        f"is finished, saved in {path}")
                elif signum:
                    raise Stopped(signum, stopping(f"after epoch {i}: saved in {path}",
                                                   signum))
        except UnreadableImage as err:
            # an image of the folder that cannot be read: the epoch's steps before
            # it are saved, then the file is named. The error's traceback holds the
            # loader's iterator, whose workers, deaf to SIGTERM, would outlive it
            err.__traceback__ = None
            if checkpoint.saved_at != (i, batches):
                checkpoint.save(i, batches)
            raise UserError(
                f"{err.path()} is not an image that can be read: replace it with one "
                f"that can, then go on with --resume (saved in {path})"
            ) from None
        except Stopped as stop:
            if checkpoint.saved_at == (args.n_epoch, 0):
                say(f"stopped by {signals.name(stop.signum)} during the last grid: the "
                    f"run is finished, saved in {path}, and only that grid is missing")
                return ddpm
            # the grid of the weights just saved, unless a second signal skips it:
            # training may have stopped long before the next grid was due
            epoch, batches = checkpoint.saved_at
            shown_epoch = epoch - 1 if batches == 0 else epoch
            grid = grids.step_path(recipe.grids, args.out, shown_epoch, batches)
            fresh = drawn_at != steps and not os.path.exists(grid)
            if signals.count < 2 and fresh and process_rank() == 0:
                print("drawing the grid of the weights saved (a second signal "
                      "skips it)")
                sampler.eval()
                where = f"during the final grid: the run is saved in {path}"
                grids.of_weights(sampler, c_grid, size, recipe.normalize, device,
                                 args.guide_w, grid, path, None, stopping(where))
            raise
    return ddpm


def stopping(where: str, signum: int | None = None) -> str:
    """The sentence of a stop by signal `signum` (None: "{signal}", filled in when
    it comes), `where` it stopped and what it saved."""
    name = "{signal}" if signum is None else signals.name(signum)
    return f"stopped by {name} {where}; run the same command with --resume to go on"


def take_fast_path(args: SimpleNamespace, device: torch.device) -> None:
    """Turn on what --fast takes on this device, leaving a flag given as well as it
    is, and say what that is."""
    defaults = cli.DEFAULTS
    for name, value in fast_settings(device).items():
        if getattr(args, name) == defaults[name]:
            setattr(args, name, value)
    # the speed flags now on, as the command line writes them: --amp auto
    taken = as_flags({
        name: value for name in ("amp", "channels_last", "compile")
        if (value := getattr(args, name)) != defaults[name]
    }) or "nothing, for nothing measured pays there yet"
    say(f"--fast on {device.type}: {taken}")


if __name__ == "__main__":
    main()
