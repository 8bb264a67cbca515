"""The model interface generation relies on (cogview.generation.interface.GenerativeModel),
and the one-way imports of the generation package."""

import ast
from pathlib import Path

import torch

from cogview.generation import GenerativeModel, generate_images
from cogview.generation.interface import GenerativeModel as Protocol
from cogview.modules.transformer import CogViewTransformer, TransformerConfig
from cogview.tokenization.vocab import CogViewVocab

GENERATION = Path(__file__).resolve().parents[1] / "cogview" / "generation"
# each module may import only those listed after it: the core first, drivers last
LAYERS = ["interface", "batching", "sampling", "beam", "scoring", "drivers", "completion",
          "superres"]


def test_the_transformer_has_the_interface_and_a_minimal_model_is_driven_through_it():
    model = CogViewTransformer(TransformerConfig(num_layers=1, hidden_size=32, num_heads=2,
                                                 max_positions=64, vocab_size=256))
    assert isinstance(model, GenerativeModel) and GenerativeModel is Protocol
    for name in ("setup_kv_cache", "reorder_kv_cache", "clear_kv_cache", "logits"):
        assert callable(getattr(model, name))
    assert not isinstance(torch.nn.Linear(2, 2), GenerativeModel)  # no KV cache: not one

    class Wrapped:  # only what the protocol names, delegated: generation still runs
        def __init__(self, inner):
            self.inner, self.config = inner, inner.config

        training = property(lambda self: self.inner.training)

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            if name in ("logits", "setup_kv_cache", "reorder_kv_cache", "clear_kv_cache",
                        "parameters", "train", "eval"):
                return getattr(self.inner, name)
            raise AttributeError(name)

    vocab = CogViewVocab(num_image_codes=16, text_vocab_size=64, pad_multiple=1)
    wrapped = Wrapped(CogViewTransformer(TransformerConfig(
        num_layers=1, hidden_size=32, num_heads=2, max_positions=64, vocab_size=vocab.size)))
    assert isinstance(wrapped, GenerativeModel)
    codes = generate_images(wrapped, vocab, [[1, 2, 3]], 4, [0])
    assert codes.shape == (1, 4) and int(codes.max()) < 16


def test_generation_imports_flow_one_way():
    for index, name in enumerate(LAYERS):
        tree = ast.parse((GENERATION / f"{name}.py").read_text())
        imported = {node.module.rsplit(".", 1)[-1] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("cogview.generation.")}
        later = imported & set(LAYERS[index + 1:])
        assert not later, f"generation/{name}.py imports {sorted(later)}, which build on it"
    assert set(LAYERS) == {p.stem for p in GENERATION.glob("*.py")} - {"__init__"}
