"""An MXNet-style updater function made a server rule (updater_rule), registered at
import: the servers load it through PARATRAIN_SERVER_IMPORTS."""
from paratrain.optimizers import register_optimizer, updater_rule


def halve_towards_gradient(grad, weight):
    """weight = (weight + grad) / 2, in place."""
    weight.add_(grad).mul_(0.5)


register_optimizer("halve", server=updater_rule(halve_towards_gradient, name="halve"))
