"""The image history pool of Shrivastava et al., used to update the discriminators."""

from __future__ import annotations

import torch


class ImagePool:
    """Keeps up to ``size`` generated images and mixes old ones into the discriminator's batch.

    Per image: while the pool is not full, store the new image and return it. Once full, with
    probability 0.5 return a random stored image and store the new one in its place; otherwise
    return the new image. ``size == 0`` returns the batch unchanged. Draws come from the pool's own
    seeded generator, so a pool is reproducible and its state is checkpointed.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
                continue
            if torch.rand((), generator=self.generator).item() > 0.5:
                i = int(torch.randint(self.size, (), generator=self.generator))
                out.append(self.images[i].to(image.device, image.dtype))
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict:
        stored = torch.stack([im.cpu() for im in self.images]) if self.images else torch.empty(0)
        return {"size": self.size, "images": stored, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if state["size"] != self.size:
            raise ValueError(
                f"loss.pool_size: checkpoint pool has size {state['size']}, config {self.size}"
            )
        self.images = [im.to(device) for im in state["images"]]
        self.generator.set_state(state["generator"])
