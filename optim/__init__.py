from .bayesbinn import BayesBiNN
from .binary_optimizer import BinaryWeightOptimizer, has_memory, is_binary, without_memory
from .recalibration import recalibrate
from .schedule import learning_rate
from .ste import STE
from .vispa import VISPA, project_to_sphere
