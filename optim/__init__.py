from .schedule import learning_rate
from .vispa import VISPA, project_to_sphere
from .recalibration import recalibrate
