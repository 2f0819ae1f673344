"""Networks only: nn.Modules and their config dataclasses, no training logic."""
