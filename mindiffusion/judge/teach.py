"""Training the judge: MNIST's digits against as many junk images, made afresh for
each batch."""
import io

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST
from tqdm import tqdm

from mindiffusion.judge.model import JUNK, DigitJudge, read
from mindiffusion.judge.scores import figures
from mindiffusion.training.data import explain_missing_dataset, first_of_each_class
from mindiffusion.training.files import write_or_explain


def junk(digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """As many junk images as there are (B, 1, 28, 28) digits, in [0, 1]: static,
    smooth blobs, flat grey, digits drowned in noise, two digits at once, and digits
    cut into 7x7 tiles and shuffled."""
    n = len(digits)
    shape = digits.shape

    def rand(*size):
        return torch.rand(*size, generator=generator)

    noise = torch.randn(shape, generator=generator)
    # static averaged over 7x7 windows, its deviation of 1/7 brought back to 3/7
    blobs = F.avg_pool2d(noise, 7, 1, 3) * 3 + 0.5
    grey = rand(n, 1, 1, 1).expand(shape)
    # at most 0.3 of a digit, under noise of deviation 0.5
    drowned = rand(n, 1, 1, 1) * 0.3 * digits + noise * 0.5 + 0.5
    # each digit with the next one of the batch, mirrored, drawn over it
    both = torch.maximum(digits, digits.roll(1, 0).flip(3))
    # (B, 1, 28, 28) -> (B, 16, 49): 16 tiles of 7x7, in a shuffled order
    tiles = F.unfold(digits, 7, stride=7)[:, :, torch.randperm(16, generator=generator)]
    shuffled = F.fold(tiles, (28, 28), 7, stride=7)
    kinds = torch.stack([rand(shape), noise * rand(n, 1, 1, 1) + 0.5, blobs, grey,
                         drowned, both, shuffled])
    pick = torch.randint(len(kinds), (n,), generator=generator)
    return kinds[pick, torch.arange(n)].clamp(0, 1)


def roughen(digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, 28, 28) digits in [0, 1], half of them as a sampler leaves them: on a
    background lifted by up to 0.15, under static of deviation up to 0.1, a third
    of those with strokes thickened by a pixel. Digits still, so that a judge which
    has only seen MNIST's black backgrounds does not read such samples as junk."""
    n = len(digits)

    def rand(*size):
        return torch.rand(*size, generator=generator)

    # a 3x3 maximum: every stroke a pixel wider on each side
    thick = torch.where(rand(n, 1, 1, 1) < 1 / 3, F.max_pool2d(digits, 3, 1, 1), digits)
    lift = rand(n, 1, 1, 1) * 0.15
    static = torch.randn(digits.shape, generator=generator) * rand(n, 1, 1, 1) * 0.1
    rough = (thick * (1 - lift) + lift + static).clamp(0, 1)
    return torch.where(rand(n, 1, 1, 1) < 0.5, rough, digits)


def train(data_root: str, per_class: int | None, epochs: int, out: str) -> None:
    """Train the judge on MNIST's training digits (the first per_class of each
    digit, where given) and as much junk, then say its accuracy on the test
    digits."""
    shifted = transforms.Compose([
        transforms.RandomAffine(8, translate=(0.08, 0.08)),
        transforms.ToTensor(),
    ])
    with explain_missing_dataset("MNIST", data_root, instead=None):
        digits = MNIST(data_root, train=True, download=True, transform=shifted)
        test = MNIST(data_root, train=False, transform=transforms.ToTensor())
    if per_class is not None:
        digits = first_of_each_class(digits, per_class)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    judge = DigitJudge()
    optim = torch.optim.Adam(judge.parameters(), lr=1e-3)
    loader = DataLoader(digits, 64, shuffle=True)
    # a cosine decay to 0 settles the judge: surer on digits and on junk
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, epochs * len(loader))
    for epoch in range(epochs):
        judge.train()
        for x, y in tqdm(loader, f"epoch {epoch}"):
            x = torch.cat([roughen(x, generator), junk(x, generator)])
            y = torch.cat([y, torch.full_like(y, JUNK)])
            loss = F.cross_entropy(judge(x), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
            schedule.step()
    judge.eval()
    right = sure = 0
    for x, y in DataLoader(test, 500):
        probs = read(judge, x)[0]
        right += int((probs.argmax(1) == y).sum())
        # read as their own digit, surely: the command's "drawn as asked"
        sure += figures(probs, y)["as_asked"]
    print(f"on MNIST's {len(test):,} test digits: {right / len(test):.3f} right, "
          f"{sure / len(test):.3f} read as their digit with at least 90% confidence")
    buffer = io.BytesIO()
    torch.save(dict(model=judge.state_dict()), buffer)
    write_or_explain(out, buffer.getvalue(), f"--out {out}")
    print(f"wrote {out}")
