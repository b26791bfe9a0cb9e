"""The `gguf` kernel of the declared `QuantizedEmbedding` layer: token rows read from packed GGUF blocks.

A GGUF checkpoint keeps its token embedding as the file stores it (`qweight`, uint8 `[vocab,
bytes_per_row]` blocks of a served ggml type), so the table takes the file's size in memory; a tied
output projection multiplies by the same blocks (`GgufLinear`). This kernel unpacks only the rows a
forward's ids name (`gguf_quant.py`: the AVX2 unpacking in C where it is built, torch's otherwise;
`kernelhub::gguf_get_rows` inside graphs), giving gguf-py's float32 values bit for bit, then cast to
the model's dtype as the reference does.

    >>> import torch
    >>> from kernelhub.declare.reference_layers import QuantizedEmbedding
    >>> emb = QuantizedEmbedding(4, 32, 8)
    >>> torch.equal(GgufEmbedding.forward(emb, torch.tensor([1, 2])), emb(torch.tensor([1, 2])))
    True
"""

from __future__ import annotations

import torch

from kernelhub.backends.gguf_quant import get_rows_eager


class GgufEmbedding(torch.nn.Module):
    """forward(self, input_ids) for a host embedding holding packed GGUF blocks: `qweight` (uint8
    `[num_embeddings, bytes_per_row]`), `ggml_type` (int), `embedding_dim` and `dtype_anchor` (an
    empty tensor of the output dtype). The result is `[*input_ids.shape, embedding_dim]`."""

    has_backward = False  # the table is not a float parameter; nothing here has a gradient
    can_torch_compile = True
    devices = ("cpu",)

    def forward(self, input_ids):
        dtype = self.dtype_anchor.dtype
        if torch.compiler.is_compiling():  # graphs record the op (opaque, with a fake: no graph break)
            return torch.ops.kernelhub.gguf_get_rows(self.qweight, input_ids, self.ggml_type, self.embedding_dim,
                                                     dtype)
        return get_rows_eager(self.qweight, input_ids, self.ggml_type, self.embedding_dim, dtype)
