"""The arithmetic of FID: images as the 8-bit pixels the Inception reads, the running
moments of features that give their mean and covariance, and the Fréchet distance
between the two Gaussians those make.

Purely numerical, in float64 where it sums, with no models or files:
mindiffusion.fid feeds them the features of samples and of a training set.
"""
import torch


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((sigma1 sigma2)^(1/2)) is computed as tr((A sigma2 A)^(1/2)) with A =
    sigma1^(1/2): A sigma2 A is symmetric and positive semi-definite, so both roots
    come from symmetric eigendecompositions, which stay real and exact for singular
    covariances (fewer samples than features), where scipy's sqrtm can fail.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))

    def eigen_roots(matrix):
        """The square roots of a symmetric PSD matrix's eigenvalues, and its
        eigenvectors. Eigenvalues within rounding of zero count as zero: their
        roots would add rounding noise of the size of sqrt(eps)."""
        values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
        noise = values.abs().max() * len(values) * torch.finfo(values.dtype).eps
        return torch.where(values > noise, values, 0).sqrt(), vectors

    roots, vectors = eigen_roots(sigma1)
    # A = sigma1^(1/2)
    a = vectors @ torch.diag(roots) @ vectors.T
    trace_sqrt = eigen_roots(a @ sigma2 @ a)[0].sum()
    distance = (
        (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    )
    return float(distance)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the 8-bit RGB the extractor reads: rounded as save_image
    rounds them to a PNG, and a single channel (MNIST) repeated to three."""
    pixels = x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


class Moments:
    """The running sums of features that give their mean and covariance, in float64,
    so that 50,000 samples never have to be held at once."""

    def __init__(self) -> None:
        self.n, self.sum, self.outer = 0, 0.0, 0.0

    def add(self, features: torch.Tensor) -> None:
        # to the CPU first: MPS has no float64
        features = features.cpu().double()
        self.n += len(features)
        self.sum = self.sum + features.sum(0)
        self.outer = self.outer + features.T @ features

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the unbiased covariance, as numpy's cov gives them."""
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, sigma
