"""Character-level language model (``model=charlm``): embedding → stacked LSTM → linear logits.

For ``dataset=text``: inputs are (B, T) character indices, outputs (B, T, V) logits of the next character
at every position, trained with :class:`~ksd.losses.SequenceCrossEntropy` (mean over positions, so the
loss is in nats per character and ``exp(loss)`` is the perplexity per character). One ``nn.LSTM`` per
entry of ``widths``, so the layers may differ in width; the state starts at zero for every window.
"""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn

DEFAULT_WIDTHS = [256]


class CharLM(nn.Module):
    def __init__(self, vocabulary_size: int, embedding: int, widths: list[int]) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary_size, embedding)
        self.lstms = nn.ModuleList(nn.LSTM(i, o, batch_first=True) for i, o in pairwise([embedding, *widths]))
        self.head = nn.Linear(widths[-1], vocabulary_size)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.embedding(inputs)
        for lstm in self.lstms:
            hidden, _ = lstm(hidden)
        return self.head(hidden)
