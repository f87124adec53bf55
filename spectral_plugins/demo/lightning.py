"""The demo's LightningModule: next-character prediction with a :class:`~.model.CharGPT`."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

from .model import CharGPT, GPTConfig


class CharGPTModule(LightningModule):
    """Trains a :class:`CharGPT` with AdamW and a linear warm-up; logs ``train/loss``.

    Args:
        config: the model's shape.
        lr: peak learning rate.
        weight_decay: AdamW weight decay (matrices only).
        warmup_steps: linear warm-up length in optimizer steps.
    """

    def __init__(self, config: GPTConfig | None = None, lr: float = 3e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 20) -> None:
        super().__init__()
        self.config = config or GPTConfig()
        self.save_hyperparameters({"n_layer": self.config.n_layer, "d_model": self.config.d_model,
                                   "n_head": self.config.n_head, "block_size": self.config.block_size,
                                   "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps})
        self.model = CharGPT(self.config)
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of character ids ``(batch, time)``."""
        return self.model(input_ids)[0]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.lr,
                                      betas=(0.9, 0.95))
        warmup = max(1, self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
