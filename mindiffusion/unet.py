"""The notes' `NaiveUnet` (section 4) and its building blocks.

The classes and submodule names are exactly the notes' own, so a state_dict written by
the notes' code loads here unchanged.
"""
import torch
import torch.nn as nn


class Conv3(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, is_res: bool = False):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1),
            nn.GroupNorm(8, out_channels),
            nn.ReLU(),
        )
        self.conv = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
            nn.GroupNorm(8, out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
            nn.GroupNorm(8, out_channels),
            nn.ReLU(),
        )
        self.is_res = is_res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.main(x)
        if self.is_res:
            x = x + self.conv(x)
            # the sum of two unit-variance branches has variance 2: scale by ~1/sqrt(2)
            return x / 1.414
        else:
            return self.conv(x)


class UnetDown(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # (B, in, H, W) -> (B, out, H/2, W/2)
        self.model = nn.Sequential(
            Conv3(in_channels, out_channels),
            nn.MaxPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetUp(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # in_channels counts x and the skip together, since forward concatenates them
        # (B, in, H, W) -> (B, out, 2H, 2W)
        self.model = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 2, 2),
            Conv3(out_channels, out_channels),
            Conv3(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat((x, skip), 1)
        x = self.model(x)
        return x


class TimeSiren(nn.Module):
    def __init__(self, emb_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(1, emb_dim, bias=False)
        self.lin2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one normalised timestep per image: (B,) or (B, 1) -> (B, 1)
        x = x.view(-1, 1)
        x = torch.sin(self.lin1(x))
        x = self.lin2(x)
        return x


class NaiveUnet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_feat: int = 256,
        n_classes: int | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_feat = n_feat

        self.init_conv = Conv3(in_channels, n_feat, is_res=True)

        self.down1 = UnetDown(n_feat, n_feat)
        self.down2 = UnetDown(n_feat, 2 * n_feat)
        self.down3 = UnetDown(2 * n_feat, 2 * n_feat)

        self.to_vec = nn.Sequential(nn.AvgPool2d(4), nn.ReLU())

        self.timeembed = TimeSiren(2 * n_feat)
        if n_classes is not None:
            # classifier-free guidance: a vector for each class and one for the null
            # class (the last), joined to the time embedding
            self.classembed = nn.Embedding(n_classes + 1, 2 * n_feat)

        self.up0 = nn.Sequential(
            nn.ConvTranspose2d(2 * n_feat, 2 * n_feat, 4, 4),
            nn.GroupNorm(8, 2 * n_feat),
            nn.ReLU(),
        )

        self.up1 = UnetUp(4 * n_feat, 2 * n_feat)
        self.up2 = UnetUp(4 * n_feat, n_feat)
        self.up3 = UnetUp(2 * n_feat, n_feat)
        self.out = nn.Conv2d(2 * n_feat, self.out_channels, 3, 1, 1)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None
    ) -> torch.Tensor:
        # three halvings and the 4x4 average pool divide each side by 32; any other
        # size fails deep inside with a shape error, so say it here
        height, width = x.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(
                f"NaiveUnet needs height and width that are multiples of 32, "
                f"got {height}x{width}"
            )
        # (B, C, H, W) -> (B, n_feat, H, W)
        x = self.init_conv(x)

        # (B, n_feat, H/2, W/2), (B, 2n_feat, H/4, W/4), (B, 2n_feat, H/8, W/8)
        down1 = self.down1(x)
        down2 = self.down2(down1)
        down3 = self.down3(down2)

        # (B, 2n_feat, H/32, W/32)
        thro = self.to_vec(down3)
        # (B, 2n_feat) -> (B, 2n_feat, 1, 1), to broadcast over every pixel
        temb = self.timeembed(t).view(-1, self.n_feat * 2, 1, 1)
        if c is not None:
            # with classes, temb carries the class too, everywhere the notes add it
            temb = temb + self.classembed(c).view(-1, self.n_feat * 2, 1, 1)

        # back to (B, 2n_feat, H/8, W/8)
        thro = self.up0(thro + temb)

        up1 = self.up1(thro, down3) + temb
        up2 = self.up2(up1, down2)
        up3 = self.up3(up2, down1)

        # (B, 2n_feat, H, W) -> (B, out_channels, H, W)
        out = self.out(torch.cat((up3, x), 1))
        return out
