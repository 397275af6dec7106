"""Suite-wide settings: one torch thread per test process (2-core CI; spawned ranks set their own)."""

import torch

torch.set_num_threads(1)
