"""Write a small checkpoint to share: the weights that draw, and the recipe.

    python -m mindiffusion.export contents/ddpm_mnist.pth contents/mnist_small.pth

A training checkpoint also keeps the optimizer's moments, the raw weights beside
their --ema average, the random states and the record: all that --resume needs,
three to four times the size of the weights. The export keeps the --ema average
(or, without --ema, the weights) and the recipe, so that `mindiffusion.sample` and
`mindiffusion.fid` load it as they load the training checkpoint and draw the same
images; it cannot be resumed.
"""
import io
import os

import torch

from mindiffusion.training.files import (
    load_checkpoint,
    weights_alone,
    write_atomically,
)
from mindiffusion.training import flags
from mindiffusion.training.flags import UserError

# the prefix of the averaged model's names in an AveragedModel's state_dict
AVERAGED = "module."


def weights_only(state: dict) -> dict:
    """The checkpoint `state` reduced to the weights that draw and the recipe."""
    # an export of an export keeps its word on what its weights are
    averaged = state.get("ema") is not None or bool(state.get("averaged"))
    if state.get("ema") is not None:
        # AveragedModel's names are the model's under "module.", beside its count
        model = {
            name[len(AVERAGED):]: tensor
            for name, tensor in state["ema"].items()
            if name.startswith(AVERAGED)
        }
    else:
        model = state["model"]
    return {"model": model, "recipe": state.get("recipe"), "averaged": averaged}


def main(argv: list[str] | None = None) -> None:
    parser = flags.command_parser("python -m mindiffusion.export", __doc__)
    parser.add_argument(
        "checkpoint", help="a checkpoint of the trainer (python -m mindiffusion.train)"
    )
    parser.add_argument("out", help="the small checkpoint to write; never replaced")
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.out):
            raise UserError(f"{args.out} already exists: choose another name")
        state = load_checkpoint(args.checkpoint)
        if weights_alone(state):
            raise UserError(
                f"{args.checkpoint} holds the weights alone, as a notes' script saves "
                f"them: it is as small as an export, and mindiffusion.sample reads it"
            )
        if not state.get("recipe"):
            raise UserError(
                f"{args.checkpoint} has no recipe for its model, so an export of it "
                f"could not be sampled"
            )
        small = weights_only(state)
        buffer = io.BytesIO()
        torch.save(small, buffer)
        write_atomically(args.out, buffer.getbuffer())
    except OSError as err:
        parser.exit(2, f"{parser.prog}: error: cannot write {args.out} "
                    f"({err.strerror})\n")
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    which = "averaged weights" if small["averaged"] else "weights (no --ema average)"
    size = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.out}: the {which} and the recipe, {size:.2f} MiB")


if __name__ == "__main__":
    flags.run_command(main, "python -m mindiffusion.export")
