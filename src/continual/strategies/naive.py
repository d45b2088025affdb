"""Fine-tuning on each new increment only: shows catastrophic forgetting."""
from src.continual.strategies.base import Strategy


class Naive(Strategy):
    name = "naive"
