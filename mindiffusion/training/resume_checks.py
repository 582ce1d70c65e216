"""What a --resume refuses and what it says: a checkpoint that cannot go on, such
as an export, one whose recipe differs from this run's, and the flags that this run
changes."""
from mindiffusion.training.distributed import say
from mindiffusion.training.errors import UserError

# the recipe's entries that a flag sets, for the sentence that refuses a resume
RECIPE_FLAGS = {
    "n_T": "--n-T",
    "betas": "the betas",
    "eps_model": "the model",
    "eps_model_args": "the model's arguments",
    "n_classes": "--cond's class count",
    "classes": "the classes",
    "p_uncond": "--p-uncond",
}


def refuse_an_export(path: str, state: dict) -> None:
    """An export holds the weights alone: no optimizer, no random state to resume."""
    if "optimizer" not in state:
        raise UserError(
            f"--resume: {path} is an export (mindiffusion.export), which holds "
            f"the weights alone and cannot be resumed: resume the checkpoint it "
            f"was exported from"
        )


def check_recipe(path: str, saved: dict, recipe: dict) -> None:
    """Refuse, in one sentence that names them, settings that differ from the run
    the checkpoint at `path` comes from: they cannot change halfway."""
    # a model with classes and one without differ in their very weights
    with_cond = saved.get("n_classes") is not None
    if with_cond != (recipe.get("n_classes") is not None):
        trained = "with --cond" if with_cond else "without --cond"
        raise UserError(
            f"--resume: {path} was trained {trained}: resume {trained}, or choose "
            f"another --out"
        )
    differences = [
        f"{RECIPE_FLAGS.get(key, key)} {saved[key]} (this run: {recipe[key]})"
        for key in recipe
        if key in saved and as_lists(saved[key]) != as_lists(recipe[key])
    ]
    if differences:
        raise UserError(
            f"--resume: {path} was trained with {', '.join(differences)}: resume "
            f"with the checkpoint's settings, or choose another --out"
        )


def as_lists(value):
    """`value` with every tuple in it made a list, so that (1, 2) equals [1, 2]."""
    if isinstance(value, (list, tuple)):
        return [as_lists(item) for item in value]
    return value


def say_changed_settings(path: str, saved: dict, now: dict, batches: int) -> None:
    """Refuse a --batch-size or a dataset's size that would change the middle of
    an epoch, and say in one line each which other flags this run, whose settings
    are `now`, changes or overrides from those `saved` in the checkpoint at `path`."""
    for key in ("batch_size", "dataset_size", "ema", "ema_warmup", "amp", "seed"):
        if key not in saved or saved[key] == now.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if key == "batch_size" and batches:
            raise UserError(
                f"--resume: {path} stopped in the middle of an epoch at "
                f"{flag} {saved[key]} (this run: {now[key]}): resume with "
                f"{flag} {saved[key]}, or change it at an epoch's end"
            )
        if key == "dataset_size" and batches:
            raise UserError(
                f"--resume: {path} stopped in the middle of an epoch of "
                f"{saved[key]} images, and the dataset now holds {now[key]}: "
                f"resume on the same images, or from a save at an epoch's end"
            )
        if key == "dataset_size":
            say(f"the dataset: the checkpoint trained on {saved[key]} images; "
                f"this run trains on {now[key]}")
        elif key == "seed":
            if now.get(key) is not None:
                seed = saved[key]
                seeded = "unseeded" if seed is None else f"--seed {seed}"
                say(f"--seed: a resume goes on from the checkpoint's random "
                    f"state ({seeded}); this run's {now[key]} is not used")
        elif key == "ema" and None not in (saved[key], now.get(key)):
            say(f"--ema: the checkpoint averaged with decay {saved[key]}; this "
                f"run goes on with {now[key]}")
        elif key == "ema_warmup" and now.get("ema") is not None:
            were, are = ("with" if saved[key] else "without",
                         "with" if now[key] else "without")
            say(f"--ema: the checkpoint averaged {were} the warm-up; this run goes "
                f"on {are} it")
        elif key not in ("ema", "ema_warmup"):
            before, after = (
                f"{flag} {value}" if value is not None else f"no {flag}"
                for value in (saved[key], now[key])
            )
            say(f"{flag}: the checkpoint trained with {before}; this run goes "
                f"on with {after}")
