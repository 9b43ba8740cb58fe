"""Training: the Gluon-style Trainer, the fit loop, strategies and callbacks."""
from paratrain.train.build import STRATEGIES, build_strategy
from paratrain.train.callbacks import Callback, FitState, MetricsLogger, ProgressBar, Speedometer
from paratrain.train.fit import fit
from paratrain.train.objective import Objective, StepResult
from paratrain.train.strategy import Strategy, TrainSpec
from paratrain.train.trainer import Trainer

__all__ = ["Trainer", "fit", "Strategy", "TrainSpec", "StepResult", "Objective", "build_strategy", "STRATEGIES",
           "Callback", "FitState", "Speedometer", "ProgressBar", "MetricsLogger"]
