"""annsnn: optimal ANN-SNN conversion (Ding et al., IJCAI 2021) as a small, tested PyTorch package."""
from .baselines import activation_thresholds, convert_relu
from .convert import IFNeuron, convert, fold_batchnorm, reset, set_steps
from .data import Dataset, Split, batches, load_dataset
from .models import build_model
from .rnl import RNL, lock_max, replace_relu, share_scale, thresholds
from .simulate import SimResult, simulate
from .theory import fit_bound, fit_curve, if_rate_constant, if_step, omega, simulate_if
from .train import (OmegaProbe, Stage1Config, Stage2Config, evaluate, load_model, load_point, train_stage1,
                    train_stage2)
from .utils import device, seed
from . import energy, interop, pipeline, plots, qcfs, widgets  # noqa: E402  (annsnn.pipeline etc. after `import annsnn`)

__version__ = "0.1.0"
