"""paratrain: distributed training on PyTorch, with MXNet's classic strategies.

    import paratrain
    trainer = paratrain.Trainer(model, "sgd", {"lr": 0.1}, kvstore="allreduce")
    paratrain.fit(model, train, heldout=test, strategy="allreduce", epochs=5)
"""
from paratrain import kvstore
from paratrain.train import Trainer, fit

__version__ = "0.1.0"
__all__ = ["Trainer", "fit", "kvstore", "__version__"]
